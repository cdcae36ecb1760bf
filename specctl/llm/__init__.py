"""Early-exit speculative decoding for causal LMs: a truncated target with a KL-tuned head as the draft."""
