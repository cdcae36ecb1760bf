"""Time-series speculative decoding: Timer-XL targets and drafts proposing continuous patch tokens."""
