"""specctl: speculative decoding for time-series foundation models and early-exit LLMs."""

__version__ = "0.1.0"
