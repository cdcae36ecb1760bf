"""Drafts made of the target's own blocks.

- Early exit at layer l: the target's blocks 0..l and final norm (shared, frozen), then either an untied copy of its
  LM head (llm.draft_head = "copy", trained) or the target's frozen head behind an adapter (= "adapter": a
  zero-initialised affine map h + W h + b before the frozen final norm, trained; it starts as the untuned exit).
  Option B (`tune_block`) also trains an untied copy of block l.
- Layer skip (self-speculation, Draft & Verify / SWIFT): the target with some middle blocks left out, its own
  final norm and head; nothing is trained.

Nothing a draft trains is a target tensor, so tuning can never change the target. A draft is a model of the
target's own class whose modules are the target's, so it runs with the usual KV cache, on the static decode path,
and as a Hugging Face `assistant_model` (early exits: their blocks keep their layer indices 0..l).
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
from specctl.llm.lm import LM, block_outputs, check_exit_layer, find_parts, tokenizer_fingerprint

KIND = "early_exit_draft"


class Adapter(nn.Module):
    """An affine map of the residual stream that works in whitened coordinates: with D = diag(s), s = 1 / the RMS
    of each dimension over the training states (`fit_scale`, a fixed buffer), h -> h + D^-1 (W D h + b), W and b
    zero-initialised (the identity until trained). Mid-depth streams carry a few dimensions of ~10^4 that swamp
    the final norm; in whitened coordinates removing one is W_jj = -1, not a weight of ~10^4, and no dimension
    dominates Adam's steps."""

    def __init__(self, size: int, like: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(size, size, device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("scale", torch.ones(size, device=like.device, dtype=like.dtype))

    @torch.no_grad()
    def fit_scale(self, states: torch.Tensor) -> None:
        self.scale.copy_(states.float().pow(2).mean(0).add(1e-6).rsqrt())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h * self.scale) / self.scale


class AdaptedNorm(nn.Module):
    """The target's final norm (frozen) after an adapter: it stands where the draft's norm is, so every forward
    path (Hugging Face, static, assisted generation) runs the adapter."""

    def __init__(self, adapter: Adapter, norm: nn.Module) -> None:
        super().__init__()
        self.adapter, self.norm = adapter, norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.adapter(h))


@dataclass
class Draft:
    model: nn.Module
    layer: int  # early exit: the exit layer; layer skip: the last block (the target's last)
    tune_block: bool
    target: LM
    head_kind: str = "copy"  # "copy", "adapter", or "target" (layer skip: the target's own head)
    skip: tuple[int, ...] = ()  # layer skip: the target blocks left out

    @property
    def kind(self) -> str:
        return "layer_skip" if self.skip else "early_exit"

    @property
    def shares_trunk(self) -> bool:
        """Its blocks are the target's 0..l, so the target's pass computes its last hidden state."""
        return not self.skip and not self.tune_block

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def adapter(self) -> Adapter | None:
        return next((m for m in self.model.modules() if isinstance(m, Adapter)), None)

    def weights(self) -> dict[str, torch.Tensor]:
        """Only the trained parts (head or adapter with its scale, and block l under option B), in the dtype the
        target's weights are stored in: what a draft checkpoint holds."""
        own = {id(p) for p in self.trainable().values()} | (
            {id(self.adapter.scale)} if self.adapter is not None else set())
        named = chain(self.model.named_parameters(), self.model.named_buffers())
        dtype = self.target.stored_dtype
        return {n: t.detach().to(dtype or t.dtype) for n, t in named if id(t) in own}

    def config(self) -> dict:
        """The JSON reference to the target that a draft checkpoint stores beside its weights."""
        return {"kind": KIND, "target": self.target.path, "exit_layer": self.layer, "tune_block": self.tune_block,
                "draft_head": self.head_kind, "target_layers": self.target.n_layers,
                "vocab_size": self.target.vocab_size, "tokenizer": tokenizer_fingerprint(self.target.tokenizer)}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits from the output of its last block: lm_head(norm(h)) (the adapter inside the norm)."""
        parts = find_parts(self.model)
        return parts.head(parts.norm(hidden))


def assemble(lm: LM, blocks: list[nn.Module], norm: nn.Module, head: nn.Module) -> nn.Module:
    """A model of the target's class over these modules (its embeddings and rotary tables are the target's)."""
    cfg = copy.deepcopy(lm.model.config)
    cfg.num_hidden_layers = len(blocks)
    cfg.tie_word_embeddings = False
    if isinstance(getattr(cfg, "layer_types", None), list):
        index = {id(b): i for i, b in enumerate(lm.parts.layers)}
        cfg.layer_types = [cfg.layer_types[index.get(id(b), layer)] for layer, b in enumerate(blocks)]
    with torch.device("meta"):
        model = type(lm.model)(cfg)
    base = getattr(model, model.base_model_prefix)
    parts = lm.parts
    for name, child in parts.base.named_children():
        setattr(base, name, nn.ModuleList(blocks) if name == parts.layers_name else norm if child is parts.norm
                else child)
    model.set_output_embeddings(head)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise SpecctlError(f"{type(lm.model).__name__}: cannot build a draft, these tensors are not shared with the "
                           f"target: {', '.join(left[:5])}")
    model.generation_config = copy.deepcopy(lm.model.generation_config)
    return model.eval()


def head_copy(source: nn.Linear) -> nn.Linear:
    head = nn.Linear(source.in_features, source.out_features, bias=source.bias is not None,
                     device=source.weight.device, dtype=source.weight.dtype)
    head.load_state_dict(source.state_dict())
    return head.requires_grad_(True)


def build_draft(lm: LM, layer: int, tune_block: bool = False, head: str = "copy") -> Draft:
    """The early-exit draft at `layer`, starting as the target's own head on block l's output (the 'logit lens'):
    a trainable copy of the head ("copy"), an adapter before the frozen head ("adapter"), or the target's head
    itself ("target": the untuned exit, nothing to train, nothing copied)."""
    check_exit_layer(layer, lm.n_layers)
    parts = lm.parts
    last = copy.deepcopy(parts.layers[layer]).requires_grad_(True) if tune_block else parts.layers[layer]
    if head == "adapter":
        norm, out = AdaptedNorm(Adapter(parts.head.in_features, parts.head.weight), parts.norm), parts.head
    elif head == "target":
        norm, out = parts.norm, parts.head
    else:
        norm, out = parts.norm, head_copy(parts.head)
    model = assemble(lm, [*parts.layers[:layer], last], norm, out)
    return Draft(model, layer, tune_block, lm, head)


def build_skip_draft(lm: LM, skip: list[int]) -> Draft:
    """The target without blocks `skip`: its final norm and head on the last kept block."""
    from specctl.llm.static import check_static

    check_static(lm.model, lm.parts)  # its blocks keep the target's layer indices: the static path ignores them
    for layer in skip:
        check_exit_layer(layer, lm.n_layers)
    kept = [b for i, b in enumerate(lm.parts.layers) if i not in set(skip)]
    if not kept or lm.n_layers - 1 in skip:
        raise SpecctlError(f"llm.skip_layers {sorted(skip)}: a layer-skip draft keeps the last block "
                           f"({lm.n_layers - 1}) and at least one other")
    model = assemble(lm, kept, lm.parts.norm, lm.parts.head)
    return Draft(model, lm.n_layers - 1, False, lm, "target", tuple(sorted(set(skip))))


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
    draft = build_draft(lm, int(cfg["exit_layer"]), bool(cfg["tune_block"]), cfg.get("draft_head", "copy"))
    weights = load_weights(folder, lm.device)
    expected = draft.weights()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise SpecctlError(f"{folder}: draft weights do not fit target {lm.path} (stored: "
                           f"{sorted(weights)[:4]}, expected: {sorted(expected)[:4]})")
    draft.model.load_state_dict(weights, strict=False)  # copied into the draft's tensors, in their dtype
    return draft


def target_pass(lm: LM, layers: list[int], ids: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The target's logits [B, L, V] and the outputs of blocks `layers` [B, L, H] on the way, in one pass."""
    layers = sorted(set(layers))
    with torch.no_grad(), block_outputs([lm.parts.layers[i] for i in layers]) as states:
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
    return logits, dict(zip(layers, states))


def draft_logits(draft: Draft, states: dict[int, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
    """A draft's logits [B, L, V]: its head on the target's block-l states where it shares the target's blocks,
    else its own forward."""
    if draft.shares_trunk:
        return draft.head(states[draft.layer])
    return draft.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
