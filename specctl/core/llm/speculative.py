"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with KV caches, and the vanilla baseline.

One round: the draft samples d_1..d_g from q; the target scores all of them in one pass (p_1..p_{g+1});
d_i is accepted with probability min(1, p_i(d_i)/q_i(d_i)) until the first rejection j, which emits a sample
from norm(max(0, p_j - q_j)); if all g pass, a bonus token comes from p_{g+1}. The output is distributed
exactly as the target's (with the same temperature / top-k / top-p applied to both). Temperature 0 is greedy:
p and q are one-hot, so the output equals vanilla greedy decoding token for token.

Caches hold every token but the last one emitted (the "pending" token); rejected positions are cut off with
DynamicCache layer crops. With `share_cache` the draft uses the target's cache layers 0..l (self-speculation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def distribution(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Rows of next-token probabilities after temperature, top-k and top-p (one-hot argmax when greedy)."""
    logits = logits.float()
    if s.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    z = logits / s.temperature
    if s.top_k:
        kth = z.topk(min(s.top_k, z.shape[-1]), dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # mass before this token already reaches top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return z.softmax(-1)


def sample(probs: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    return probs.argmax(-1, keepdim=True) if s.greedy else torch.multinomial(probs, 1, generator=gen)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, s: Sampling,
           gen: torch.Generator) -> tuple[int, torch.Tensor]:
    """(accepted count n, the token emitted after them): p [g+1, V] target, q [g, V] draft, drafts [g]."""
    g = q.shape[0]
    n = 0
    if g:
        rows = torch.arange(g, device=p.device)
        u = torch.rand(g, generator=gen, device=p.device)
        ok = u * q[rows, drafts] < p[rows, drafts]  # u < p(x)/q(x), q(x) > 0 since x ~ q
        n = int(ok.long().cumprod(0).sum())
    if n == g:
        return n, sample(p[g], s, gen)
    residual = (p[n] - q[n]).clamp(min=0)  # max(0, p - q)
    total = residual.sum()
    probs = torch.where(total > 0, residual / total, p[n])  # p = q exactly cannot reject; guard rounding
    return n, sample(probs, s, gen)


class Decoder:
    """A model with its KV cache; `feed` runs only the tokens the cache has not seen yet."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def seen(self) -> int:
        return self.cache.get_seq_length()

    def feed(self, seq: torch.Tensor, keep: int) -> torch.Tensor:
        new = seq[self.seen():]
        out = self.model(input_ids=new[None], past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0]

    def truncate(self, length: int) -> None:
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def shared_cache(target_cache, n_layers: int):
    """A cache whose layers are the target's layers 0..n_layers-1 (the same objects)."""
    from transformers import DynamicCache

    view = DynamicCache()
    view.layers = target_cache.layers[:n_layers]
    return view


@dataclass
class Generation:
    tokens: list[int]
    target_calls: int
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (drafted g, accepted n) per round
    overlaps: list[float] = field(default_factory=list)  # sum_v min(p, q) at every drafted position


def cut_at_eos(tokens: list[int], eos: frozenset[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], True
    return tokens, False


def buffer(prompt: list[int], extra: int, device: torch.device) -> torch.Tensor:
    seq = torch.zeros(len(prompt) + extra, dtype=torch.long, device=device)
    seq[: len(prompt)] = torch.tensor(prompt, device=device)
    return seq


@torch.inference_mode()
def vanilla(target, prompt: list[int], max_new: int, s: Sampling, gen: torch.Generator,
            eos: frozenset[int] = frozenset()) -> Generation:
    """Target-only decoding with a KV cache: one target call per token."""
    device = next(target.parameters()).device
    seq, n = buffer(prompt, max_new, device), len(prompt)
    dec = Decoder(target, new_cache(target))
    out: list[torch.Tensor] = []
    for _ in range(max_new):
        seq[n] = token = sample(distribution(dec.feed(seq[:n], 1), s), s, gen)[0, 0]
        n += 1
        out.append(token)
        if eos and int(token) in eos:
            break
    return Generation(torch.stack(out).tolist(), target_calls=len(out))


@torch.inference_mode()
def speculative(target, draft, prompt: list[int], max_new: int, gamma: int, s: Sampling, gen: torch.Generator,
                eos: frozenset[int] = frozenset(), share_cache: bool = False) -> Generation:
    """Speculative sampling from `target` with `draft` proposing up to `gamma` tokens per round."""
    device = next(target.parameters()).device
    seq, n = buffer(prompt, max_new + gamma + 1, device), len(prompt)
    tgt = Decoder(target, new_cache(target))
    drf = Decoder(draft, shared_cache(tgt.cache, draft.config.num_hidden_layers) if share_cache else new_cache(draft))
    result = Generation([], target_calls=0)
    if n > 1:
        tgt.feed(seq[: n - 1], 1)  # prefill all but the pending token
        result.target_calls += 1
    overlaps = []
    while len(result.tokens) < max_new:
        g = min(gamma, max_new - len(result.tokens) - 1)
        qs = []
        for i in range(g):
            q = distribution(drf.feed(seq[: n + i], 1)[-1:], s)
            seq[n + i] = sample(q, s, gen)[0, 0]
            qs.append(q[0])
        if share_cache:
            drf.truncate(n - 1)  # the target recomputes layers <= l for these positions
        p = distribution(tgt.feed(seq[: n + g], g + 1), s)
        result.target_calls += 1
        q = torch.stack(qs) if qs else p[:0]
        accepted, token = verify(p, q, seq[n:n + g], s, gen)
        seq[n + accepted] = token[0]
        if g:
            result.rounds.append((g, accepted))
            overlaps.append(torch.minimum(p[:g], q).sum(-1))  # sum_v min(p, q)
        new = seq[n:n + accepted + 1].tolist()
        n += accepted + 1
        tgt.truncate(n - 1)
        drf.truncate(n - 1)
        result.tokens, stop = cut_at_eos(result.tokens + new, eos)
        if stop:
            break
    result.overlaps = torch.cat(overlaps).tolist() if overlaps else []
    return result
