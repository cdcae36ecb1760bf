"""Static-shape decoding of Llama-family causal LMs (gpt-fast style): a KV cache preallocated for a whole
generation and indexed by position, and one forward over the Hugging Face modules' own weights whose positions are
a device tensor, so that a caller can capture whole decode steps and rounds as CUDA graphs (speculative.py).

A call feeds T tokens at positions start..start+T-1: their keys and values are written into the cache at those
positions, then every query attends the whole cache through a mask by position (key j is visible to the query at
position i iff j <= i, and i - window < j under a sliding window). Shapes never depend on the sequence length,
and rolling back rejected tokens is only the caller moving its position counter: cache entries beyond it are
masked until they are overwritten. Models the static forward does not reproduce (e.g. GPT-2) fall back to
DynamicLM, their own forward over a Hugging Face DynamicCache behind the same interface.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from specctl.core.errors import SpecctlError
from specctl.llm.lm import Parts, find_parts

SUPPORTED = ("llama", "mistral", "qwen2")  # the decoder layer is Llama's (q/k/v/o, RoPE, RMSNorm, gated MLP)
DYNAMIC_ROPE = ("dynamic", "longrope")  # frequencies that change with the sequence length


@dataclass
class StaticCache:
    k: torch.Tensor  # [layers, 1, kv_heads, max_len, head_dim]
    v: torch.Tensor
    layers: tuple[int, ...] | None = None  # the layers of k and v a model's blocks use, in order (None: all)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def select(self, layers: list[int]) -> StaticCache:
        """Some layers of this cache, for another model's blocks (views: writes go here)."""
        return StaticCache(self.k, self.v, tuple(layers))

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) of each block in order."""
        return [(self.k[i], self.v[i]) for i in (self.layers or range(self.k.shape[0]))]

    def shares(self, other: StaticCache) -> bool:
        return self.k.data_ptr() == other.k.data_ptr()


def check_static(model: nn.Module, parts: Parts) -> None:
    """A SpecctlError unless the static forward reproduces this model."""
    cfg, name = model.config, type(model).__name__
    if cfg.model_type not in SUPPORTED:
        raise SpecctlError(f"{name}: static decoding supports {', '.join(SUPPORTED)} models, not "
                           f"model_type {cfg.model_type!r}")
    rope = getattr(parts.base.rotary_emb, "rope_type", "default")
    if any(kind in rope for kind in DYNAMIC_ROPE):
        raise SpecctlError(f"{name}: RoPE type {rope!r} changes with the sequence length; static decoding needs "
                           "fixed frequencies")


def windows(cfg, n_layers: int) -> list[int | None]:
    """The sliding window of each layer (None: full causal attention), as the Hugging Face masks apply them."""
    window, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
    return [window if types is None or types[i] == "sliding_attention" else None for i in range(n_layers)]


def visible(slots: torch.Tensor, pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, max_len]: key j is visible to the query at position i iff j <= i (and i - window < j)."""
    causal = slots <= pos[:, None]
    return causal if window is None else causal & (slots > pos[:, None] - window)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x cos + rotate_half(x) sin, rotate_half(x1, x2) = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
           mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Self-attention of h [1, T, H] at positions pos [T]: this call's keys/values go into the cache layer
    [1, kv_heads, max_len, head_dim] first, then the queries attend the whole layer where `mask` [T, max_len]."""
    shape = (1, h.shape[1], -1, attn.head_dim)
    q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    k_cache.index_copy_(2, pos, rotate(k, cos, sin))
    v_cache.index_copy_(2, pos, v)
    keys, values = (repeat_kv(c, attn.num_key_value_groups) for c in (k_cache, v_cache))  # GQA: head i, kv i // groups
    out = F.scaled_dot_product_attention(rotate(q, cos, sin), keys, values, attn_mask=mask, scale=attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(1, h.shape[1], -1))


class StaticLM:
    """A Llama-family model over a static KV cache: `lm(ids, start)` gives the logits [T, V] of the T tokens `ids`
    at positions start..start+T-1 (`lm.forward(ids, start)` with start a [1] device tensor). `cache` (e.g. another
    model's first layers) replaces a cache of its own."""

    def __init__(self, model: nn.Module, max_len: int, cache: StaticCache | None = None) -> None:
        parts = find_parts(model)
        check_static(model, parts)
        self.embed, self.layers = parts.base.embed_tokens, list(parts.layers)
        self.norm, self.head = parts.norm, parts.head
        self.windows = windows(model.config, len(self.layers))
        self.device = parts.head.weight.device
        self.cache = cache or new_cache(model, max_len)
        self.kv = self.cache.views()
        self.slots = torch.arange(self.cache.max_len, device=self.device)
        with torch.inference_mode():  # RoPE's cos and sin at every slot, once: a call looks its positions up
            like = torch.empty(1, dtype=parts.head.weight.dtype, device=self.device)
            self.cos, self.sin = (t[0] for t in parts.base.rotary_emb(like, self.slots[None]))  # [max_len, head_dim]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] for ids [T] at positions start[0] + 0..T-1; capturable (no host sync)."""
        pos = start + torch.arange(ids.shape[0], device=self.device)
        x = self.embed(ids)[None]
        cos, sin = (t.index_select(0, pos)[None, None] for t in (self.cos, self.sin))  # [1, 1, T, head_dim]
        masks = {w: visible(self.slots, pos, w) for w in set(self.windows)}
        for i, (layer, (k, v)) in enumerate(zip(self.layers, self.kv)):
            x = x + attend(layer.self_attn, layer.input_layernorm(x), cos, sin, pos, masks[self.windows[i]], k, v)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.head(self.norm(x))[0]

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self.forward(ids, torch.full((1,), start, device=self.device))


def new_cache(model: nn.Module, max_len: int) -> StaticCache:
    parts = find_parts(model)
    attn, weight = parts.layers[0].self_attn, parts.head.weight
    shape = (len(parts.layers), 1, model.config.num_key_value_heads, max_len, attn.head_dim)
    with torch.inference_mode():
        return StaticCache(*(torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(2)))


@dataclass
class GrowingCache:
    """A Hugging Face DynamicCache behind StaticCache's interface (for DynamicLM)."""

    hf: object
    max_len: int

    def shares(self, other: object) -> bool:
        return False


class DynamicLM:
    """The fallback for models the static path does not cover (e.g. GPT-2): the model's own Hugging Face forward
    over a DynamicCache, cut back to `start` before each call, so that rolling back is the same position counter
    as for StaticLM. Eager, with a host sync per call and no CUDA graphs: slower, and timed as such (vanilla runs
    on the same path)."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        from transformers import DynamicCache

        self.model, self.device = model, find_parts(model).head.weight.device
        self.cache = GrowingCache(DynamicCache(config=model.config), max_len)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        for layer in self.cache.hf.layers:  # keep positions 0..start-1 (crop(-n) drops the last n in every version)
            extra = layer.get_seq_length() - start
            if extra > 0:
                layer.crop(-extra)
        return self.model(input_ids=ids[None], past_key_values=self.cache.hf, use_cache=True).logits[0]

    def forward(self, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return self(ids, int(start))


Decoder = StaticLM | DynamicLM  # what decoding calls: lm(ids, start: int) or lm.forward(ids, start: Tensor) -> logits


def decoder(model: nn.Module, max_len: int) -> Decoder:
    """The static path where it reproduces the model, else (with a warning) the dynamic fallback."""
    try:
        check_static(model, find_parts(model))
    except SpecctlError as e:
        warnings.warn(f"{e}: decoding with the model's own forward and a dynamic cache (slower, no CUDA graphs)",
                      stacklevel=2)
        return DynamicLM(model, max_len)
    return StaticLM(model, max_len)


def static_pair(target: nn.Module, draft: nn.Module, max_len: int,
                share_cache: bool = False) -> tuple[Decoder, Decoder]:
    """The target's and the draft's decoders; with `share_cache` each draft block reads and writes the target's cache
    layer of the same block (an early exit: layers 0..l; a layer-skip draft: the layers it keeps), which the
    target's passes keep up to date. Models outside the static path get DynamicLM."""
    if share_cache:
        index = {id(b): i for i, b in enumerate(find_parts(target).layers)}
        layers = [index.get(id(b)) for b in find_parts(draft).layers]
        if None in layers:
            raise SpecctlError("llm.spec.share_cache needs a draft made of the target's own blocks (this draft "
                               "was trained with tune_block = true)")
        tgt = StaticLM(target, max_len)  # the shared cache is a static one
        return tgt, StaticLM(draft, max_len, tgt.cache.select(layers))
    return decoder(target, max_len), decoder(draft, max_len)
