"""Early-exit draft at layer l: the target's blocks 0..l and final norm (shared, frozen) and an untied copy of
its LM head (trained). Option B (`tune_block`) also trains an untied copy of block l. Nothing the draft trains
is a target tensor, so tuning can never change the target.

The draft is a model of the target's own class with `num_hidden_layers = l + 1` whose modules are the target's,
so it runs with the usual KV cache and works as a Hugging Face `assistant_model`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from specctl.core.checkpoint import CONFIG, WEIGHTS, load_config, load_weights
from specctl.core.errors import SpecctlError
from specctl.llm.lm import LM, check_exit_layer, tokenizer_fingerprint

KIND = "early_exit_draft"


@dataclass
class Draft:
    model: nn.Module
    layer: int
    tune_block: bool
    target: LM

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def weights(self) -> dict[str, torch.Tensor]:
        """Only the trained parts (head, and block l under option B): what a draft checkpoint stores."""
        return {n: p.detach() for n, p in self.trainable().items()}

    def config(self) -> dict:
        """The JSON reference to the target that a draft checkpoint stores beside its weights."""
        return {"kind": KIND, "target": self.target.path, "exit_layer": self.layer, "tune_block": self.tune_block,
                "target_layers": self.target.n_layers, "vocab_size": self.target.vocab_size,
                "tokenizer": tokenizer_fingerprint(self.target.tokenizer)}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits from the output of block l: lm_head(norm(h))."""
        return self.model.get_output_embeddings()(self.target.parts.norm(hidden))


def draft_config(lm: LM, layer: int):
    cfg = copy.deepcopy(lm.model.config)
    cfg.num_hidden_layers = layer + 1
    cfg.tie_word_embeddings = False
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: layer + 1]
    return cfg


def build_draft(lm: LM, layer: int, tune_block: bool = False) -> Draft:
    """The draft at exit layer `layer` with the head initialised from the target's (the 'logit lens')."""
    check_exit_layer(layer, lm.n_layers)
    parts = lm.parts
    with torch.device("meta"):
        model = type(lm.model)(draft_config(lm, layer))
    last = copy.deepcopy(parts.layers[layer]).requires_grad_(True) if tune_block else parts.layers[layer]
    trunk = nn.ModuleList([*parts.layers[:layer], last])
    base = getattr(model, model.base_model_prefix)
    for name, child in parts.base.named_children():
        setattr(base, name, trunk if name == parts.layers_name else child)
    source = parts.head
    head = nn.Linear(source.in_features, source.out_features, bias=source.bias is not None,
                     device=source.weight.device, dtype=source.weight.dtype)
    head.load_state_dict(source.state_dict())
    model.set_output_embeddings(head.requires_grad_(True))
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise SpecctlError(f"{type(lm.model).__name__}: cannot build an early-exit draft, these tensors are not "
                           f"shared with the target: {', '.join(left[:5])}")
    model.generation_config = copy.deepcopy(lm.model.generation_config)
    return Draft(model.eval(), layer, tune_block, lm)


def resolve_draft(ref: str | Path, layer: int) -> Path:
    """A draft folder; or a folder with `layer{l}/` (finetune-head's save_to); or a finetune-head run."""
    path = Path(ref)
    for candidate in (path, path / f"layer{layer}", path / "checkpoints" / f"layer{layer}" / "best",
                      path / f"layer{layer}" / "best"):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    raise SpecctlError(f"no draft checkpoint for exit layer {layer} at {path} (looked for {CONFIG} + {WEIGHTS} "
                       f"in it, in layer{layer}/ and in checkpoints/layer{layer}/best/)")


def load_draft(folder: Path, lm: LM) -> Draft:
    """A trained draft checkpoint for this target; a SpecctlError if it was made for another vocabulary."""
    cfg = load_config(folder)
    if cfg.get("kind") != KIND:
        raise SpecctlError(f"{folder}: not an early-exit draft checkpoint (kind {cfg.get('kind')!r})")
    mine = (lm.vocab_size, tokenizer_fingerprint(lm.tokenizer))
    theirs = (cfg["vocab_size"], cfg["tokenizer"])
    if mine != theirs:
        raise SpecctlError(f"tokenizer/vocab mismatch between target and draft: draft {folder} was trained for "
                           f"vocab {theirs[0]} (tokenizer {theirs[1]}), target {lm.path} has vocab {mine[0]} "
                           f"(tokenizer {mine[1]})")
    draft = build_draft(lm, int(cfg["exit_layer"]), bool(cfg["tune_block"]))
    weights = load_weights(folder, lm.device)
    expected = draft.trainable()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise SpecctlError(f"{folder}: draft weights do not fit target {lm.path} (stored: "
                           f"{sorted(weights)[:4]}, expected: {sorted(expected)[:4]})")
    draft.model.load_state_dict(weights, strict=False)
    return draft


def pair_logits(draft: Draft, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft logits [B, L, V] in one target pass when the draft shares every block (option A)."""
    target = draft.target.model
    if draft.tune_block:
        with torch.no_grad():
            teacher = target(input_ids=ids, attention_mask=mask).logits
        return teacher, draft.model(input_ids=ids, attention_mask=mask).logits
    seen: dict[str, torch.Tensor] = {}
    hook = draft.target.parts.layers[draft.layer].register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            teacher = target(input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    return teacher, draft.head(seen["h"])
