"""Early-exit drafts for causal language models (SPEC section 5)."""
