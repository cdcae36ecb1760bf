"""The target: a Hugging Face causal LM (a folder, a hub id, a .gguf file or a packaged file: target.py), its
tokenizer, and its decoder parts.

Llama-family layout first (`model.model.layers`, `model.model.norm`, `model.lm_head`); other decoders are
recognised when their base model holds the blocks under one of LAYER_NAMES and the final norm under NORM_NAMES.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specctl.core.errors import SpecctlError
from specctl.llm.target import Target, resolve_target

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
    path: str  # llm.target as written
    parts: Parts
    stored_dtype: torch.dtype | None = None  # the dtype its weights are saved in (drafts are stored in it)

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


def eos_ids(lm: LM) -> frozenset[int]:
    """The tokens that end a reply: the generation config's and the tokenizer's end-of-sequence tokens."""
    ids = lm.model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return frozenset(i for i in [*ids, lm.tokenizer.eos_token_id] if i is not None)


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


def load_tokenizer(ref: str, local_files_only: bool | None = None):
    """A tokenizer folder or hub id (local files only for a folder, by default)."""
    from transformers import AutoTokenizer

    local = Path(ref).exists() if local_files_only is None else local_files_only
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=local)
    except (OSError, ValueError) as e:
        raise SpecctlError(f"cannot load a tokenizer from '{ref}': {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stored_dtype(target: Target) -> torch.dtype | None:
    """The dtype config.json records for the weights (None where it records none)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(target.location, local_files_only=target.local_files_only)
    name = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return getattr(torch, name) if isinstance(name, str) else name


def load_lm(ref: str | None, device: torch.device, tokenizer: str | None = None, dtype: str = "fp32",
            offline: bool = False) -> LM:
    """A frozen target in eval mode: every parameter has requires_grad False (tuning never changes it)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    target = resolve_target(ref, offline)
    try:
        native = stored_dtype(target)
        model = AutoModelForCausalLM.from_pretrained(target.location, dtype=DTYPES[dtype],
                                                     local_files_only=target.local_files_only)
    except (OSError, ValueError) as e:
        hint = " (llm.offline / HF_HUB_OFFLINE: only the local Hugging Face cache is read)" if (
            target.local_files_only and target.location == ref) else ""
        raise SpecctlError(f"cannot load a causal LM from '{ref}': {str(e).splitlines()[0]}{hint}") from None
    model.to(device).eval().requires_grad_(False)
    parts = find_parts(model)
    own = tokenizer in (None, *BUILT_TOKENIZERS)
    tok = load_tokenizer(target.location, target.local_files_only) if own else load_tokenizer(tokenizer)
    check_vocab(tok, parts.head.weight.shape[0], f"target {ref}")
    return LM(model, tok, str(ref), parts, native)


@contextmanager
def block_outputs(blocks: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """The hidden states [B, T, H] that `blocks` output during the forwards inside the `with`, in call order."""
    states: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
             for b in blocks]
    try:
        yield states
    finally:
        for hook in hooks:
            hook.remove()
