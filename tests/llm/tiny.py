"""Tiny chat models for the LLM tests: a byte-level BPE with ChatML special tokens and a system prompt in its chat
template (like SmolLM2's), and random Llamas sized to it."""

from __future__ import annotations

from pathlib import Path

import torch

from specctl.llm.pretrain import train_bpe
from tests.llm.gguf_file import CHATML

SYSTEM = "You are a helpful assistant."
CHATML_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + SYSTEM
                 + "<|im_end|>\\n' }}{% endif %}" + CHATML)
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "dog", "ran", "to", "park", "where", "birds", "sing",
         "what", "is", "two", "plus", "four"]
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(60)]


def chat_tokenizer(vocab: int = 300):
    """ChatML with <|im_end|> as end of turn (eos and pad), and a default system prompt."""
    tokenizer = train_bpe(TEXTS, vocab)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_SYSTEM
    return tokenizer


def tiny_llama(tokenizer, layers: int = 2, seed: int = 0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)
    return LlamaForCausalLM(cfg).eval()


def save_target(folder: Path, layers: int = 3, seed: int = 0) -> Path:
    """A random tiny chat Llama and its tokenizer as a Hugging Face folder."""
    tokenizer = chat_tokenizer()
    tiny_llama(tokenizer, layers, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
