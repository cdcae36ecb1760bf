"""Early-exit self-speculation for time series: the draft is the target's first l blocks and a small trained exit head.

The blocks are the target's own modules (frozen, never copied: the draft holds the target outside its module tree, so
its state dict, parameters, `.to()` and `.train()` are the head's alone) and its checkpoint is the head only, with a
config naming the target checkpoint, a digest of its weights and l. The head starts as the untuned exit: the
target's own final norm and output layer applied at layer l, behind an optional zero-initialised residual adapter.

Sharing the KV cache: layers 0..l-1 of the draft are layers 0..l-1 of the target, so for the positions the target
has verified, the target's cache for those layers is exactly the draft's, and the draft's computation of a proposed
position in those layers is exactly what the target computes there when it verifies it. The draft therefore keeps
no cache of its own: its Stepper is given the target's (`draft_stepper`), it reads and writes layers < l, and
verification recomputes those layers for the proposed positions and overwrites them with the same values (reusing
the proposal's K/V instead would save l/L of the verification compute, at the price of a second code path in the
round). The speculative prefill fills the target's cache only.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from specctl.core.checkpoint import WEIGHTS, load_config, load_weights, resolve_checkpoint
from specctl.core.errors import SpecctlError
from specctl.timeseries.builders import same_path
from specctl.timeseries.model import KVCache, Stepper, TimerXL, load_timer, split_head

KIND = "timer_xl_early_exit"


class Adapter(nn.Module):
    """A residual MLP h + W2 gelu(W1 h), W2 zero-initialised: the identity until trained."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(d_model, width), nn.Linear(width, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


class EarlyExit(nn.Module):
    """The target's first `exit_layer` blocks (shared, frozen, run without gradients) and a trained exit head; called
    like Timer-XL: (tokens, times, cache) -> (mean, logvar). `cfg` is the target's with l layers (and the head's
    stochasticity), so the draft's own cache, when it has one, holds just those layers."""

    def __init__(self, target: TimerXL, exit_layer: int, stochastic: bool = False, adapter: int = 0) -> None:
        super().__init__()
        if not 1 <= exit_layer < target.cfg.e_layers:
            raise SpecctlError(f"distill.exit_layer {exit_layer} must lie between 1 and the target's "
                               f"{target.cfg.e_layers} layers minus one")
        self.cfg = replace(target.cfg, e_layers=exit_layer, stochastic=stochastic)
        self.exit_layer, self.adapter_width = exit_layer, adapter
        self.trunk = (target,)  # a tuple, not a submodule: nothing of the target is saved, trained or moved with us
        self.adapter = Adapter(target.cfg.d_model, adapter) if adapter else nn.Identity()
        self.norm = nn.LayerNorm(target.cfg.d_model)
        self.head = nn.Linear(target.cfg.d_model, target.cfg.patch_len * (2 if stochastic else 1))
        with torch.no_grad():  # the untuned exit: the target's own readout (the mean half, if only one is stochastic)
            self.norm.load_state_dict(target.norm.state_dict())
            n = min(self.head.out_features, target.head.out_features)
            self.head.weight[:n].copy_(target.head.weight[:n])
            self.head.bias[:n].copy_(target.head.bias[:n])
        self.to(device=target.head.weight.device, dtype=target.head.weight.dtype)

    @property
    def target(self) -> TimerXL:
        return self.trunk[0]

    def forward(self, tokens: torch.Tensor, times: torch.Tensor,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():  # the trunk is the frozen target: no graph through it, whatever the caller's mode
            x = self.target.hidden(tokens, times, cache, self.exit_layer)
        return split_head(self.head(self.norm(self.adapter(x))), self.cfg)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A cache of the draft's own (l layers), for decoding without the target's."""
        return KVCache(self.cfg, batch, max_len, self.head.weight.device, dtype or self.head.weight.dtype)


def shares_cache(draft: nn.Module, target: nn.Module) -> bool:
    """Whether `draft` is an early exit of this very `target` (same modules), so it can run on the target's cache."""
    return isinstance(draft, EarlyExit) and draft.target is target


def draft_stepper(draft: nn.Module, tstep: Stepper, graphs: bool = False) -> Stepper:
    """The draft's stepper beside the target's `tstep` (same batch and length): on the target's cache for an early exit
    of that target, else with a cache of its own."""
    return Stepper(draft, tstep.batch, tstep.max_len, graphs, tstep.cache if shares_cache(draft, tstep.model) else None)


def weights_digest(ref: str) -> str:
    """sha256 of a checkpoint's weights file: which version of a target an exit head was trained on."""
    h = hashlib.sha256()
    try:
        with (resolve_checkpoint(ref) / WEIGHTS).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    except OSError as e:
        raise SpecctlError(f"{ref}: unreadable weights: {e}") from None
    return h.hexdigest()


def exit_config(draft: EarlyExit, target_ref: str, lookback: int, columns: list[str], profile: dict) -> dict:
    """config.json of an exit head's checkpoint: the target it needs (and its digest) and how to rebuild the head."""
    return {"kind": KIND, "target": target_ref, "target_digest": weights_digest(target_ref),
            "exit_layer": draft.exit_layer, "stochastic": draft.cfg.stochastic, "adapter": draft.adapter_width,
            "model": draft.cfg.to_dict(), "lookback": lookback, "columns": columns, "profile": profile}


def load_early_exit(folder: Path, config: dict, target: TimerXL, target_ref: str) -> EarlyExit:
    """An exit head over `target`, refused unless `target_ref` is the checkpoint (and version) it was trained on."""
    if not same_path(config["target"], target_ref):
        raise SpecctlError(f"spec.draft {folder} is an early exit of {config['target']}, not of spec.target "
                           f"{target_ref}: set spec.target = \"{config['target']}\" or train an exit of {target_ref}")
    if config.get("target_digest") != weights_digest(target_ref):
        raise SpecctlError(f"spec.draft {folder} was trained on another version of {target_ref} (its weights "
                           "changed since): train the exit head again")
    draft = EarlyExit(target, config["exit_layer"], config["stochastic"], config["adapter"])
    try:
        draft.load_state_dict(load_weights(folder, target.head.weight.device))
    except RuntimeError as e:
        raise SpecctlError(f"{folder}: weights do not match the saved config: {str(e).splitlines()[0]}") from None
    return draft.eval()


def load_draft(ref: str, target: TimerXL, target_ref: str, device: torch.device | str = "cpu") -> nn.Module:
    """spec.draft: a Timer-XL checkpoint, or an exit head over the already loaded `target` (checkpoint `target_ref`)."""
    folder = resolve_checkpoint(ref)
    config = load_config(folder)
    if config.get("kind") == KIND:
        return load_early_exit(folder, config, target, target_ref)
    return load_timer(ref, device)[0]
