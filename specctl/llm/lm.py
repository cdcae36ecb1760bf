"""The target: a Hugging Face causal LM from a local folder, its tokenizer, and its decoder parts.

Llama-family layout first (`model.model.layers`, `model.model.norm`, `model.lm_head`); other decoders are
recognised when their base model holds the blocks under one of LAYER_NAMES and the final norm under NORM_NAMES.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specctl.core.errors import SpecctlError

LAYER_NAMES = ("layers", "h", "blocks", "block")
NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")
BUILT_TOKENIZERS = ("bpe", "gpt2")  # llm.tokenizer values that `pretrain` builds; elsewhere: the target's own
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Parts:
    """Where a causal LM keeps what an early exit needs."""

    base: nn.Module  # the decoder stack (embeddings, blocks, final norm)
    layers_name: str  # attribute of `base` holding the block list
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module


@dataclass
class LM:
    model: nn.Module  # a transformers PreTrainedModel with a causal-LM head
    tokenizer: object  # a transformers tokenizer
    path: str
    parts: Parts

    @property
    def n_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def vocab_size(self) -> int:
        return self.parts.head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.parts.head.weight.device


def autocast(device: torch.device, dtype: str):
    """Mixed precision at llm.dtype (off for fp32)."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def _children(module: nn.Module) -> str:
    return ", ".join(f"{n} ({type(c).__name__})" for n, c in module.named_children()) or "no submodules"


def find_parts(model: nn.Module) -> Parts:
    """The base model, its block list, final norm and LM head; a SpecctlError naming what was found otherwise."""
    name = type(model).__name__
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(base, nn.Module):
        raise SpecctlError(f"{name}: no base model found (children: {_children(model)})")
    layers_name = next((n for n in LAYER_NAMES if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    if layers_name is None:
        raise SpecctlError(f"{name}: no recognisable decoder-layer list (looked for {', '.join(LAYER_NAMES)}; "
                           f"found {_children(base)})")
    norm = next((getattr(base, n) for n in NORM_NAMES if isinstance(getattr(base, n, None), nn.Module)), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or not isinstance(head, nn.Linear):
        raise SpecctlError(f"{name}: no final norm ({', '.join(NORM_NAMES)}) or linear LM head found "
                           f"(found {_children(base)}; head {type(head).__name__})")
    return Parts(base, layers_name, getattr(base, layers_name), norm, head)


def check_exit_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise SpecctlError(f"exit layer {layer} out of range: the target has {n_layers} decoder layers "
                           f"(valid exit layers 0..{n_layers - 1})")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (token -> id), to tell tokenizers apart."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]


def check_vocab(tokenizer, vocab_size: int, what: str) -> None:
    """Every token id the tokenizer can produce must have a row in the LM head."""
    if len(tokenizer) > vocab_size:
        raise SpecctlError(f"tokenizer/vocab mismatch: the tokenizer has {len(tokenizer)} tokens but {what} "
                           f"has {vocab_size} output rows")


def quiet_transformers() -> None:
    """No download/loading progress bars from transformers (the commands draw their own)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=Path(ref).exists())
    except (OSError, ValueError) as e:
        raise SpecctlError(f"cannot load a tokenizer from '{ref}': {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lm(ref: str | None, device: torch.device, tokenizer: str | None = None, dtype: str = "fp32") -> LM:
    """A frozen target in eval mode: every parameter has requires_grad False (tuning never changes it)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if not ref:
        raise SpecctlError("no target model: set llm.target to a Hugging Face model folder (e.g. the one "
                           "`specctl pretrain` writes for an llm profile)")
    if not Path(ref).exists() and ref.count("/") != 1:  # neither a folder nor a hub id (owner/name)
        raise SpecctlError(f"target model not found: {ref}")
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=DTYPES[dtype], local_files_only=Path(ref).exists())
    except (OSError, ValueError) as e:
        raise SpecctlError(f"cannot load a causal LM from '{ref}': {str(e).splitlines()[0]}") from None
    model.to(device).eval().requires_grad_(False)
    parts = find_parts(model)
    tok = load_tokenizer(ref if tokenizer in (None, *BUILT_TOKENIZERS) else tokenizer)
    check_vocab(tok, parts.head.weight.shape[0], f"target {ref}")
    return LM(model, tok, str(ref), parts)
