"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with KV caches, and the vanilla baseline.

One round: the draft samples d_1..d_g from q; the target scores all of them in one pass (p_1..p_{g+1});
d_i is accepted with probability min(1, p_i(d_i)/q_i(d_i)) until the first rejection j, which emits a sample
from norm(max(0, p_j - q_j)); if all g pass, a bonus token comes from p_{g+1}. The output is distributed
exactly as the target's (with the same temperature / top-k / top-p applied to both). Temperature 0 is greedy:
p and q are one-hot, so the output equals vanilla greedy decoding token for token.

Both models decode over static KV caches (static.py); a cache holds every token but the last one emitted (the
"pending" token), and rolling back rejected tokens only moves a position counter. Vanilla and speculative decoding
use the same static path, so the baseline is as fast as the method. With a shared cache (static_pair's
`share_cache`) the draft reads and writes the target's cache layers 0..l (self-speculation) and the verify pass
recomputes those layers for the drafted tokens: reusing the draft's layer-l states instead (LayerSkip) would need
the draft to also run d_g, the same number of layer calls, which is what a batch-1 step costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specctl.core.errors import SpecctlError
from specctl.core.llm.static import Decoder

EOS_EVERY = 4  # vanilla looks for EOS every 4 tokens: a host sync per 4 tokens instead of per token


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
    """One token per row [..., 1] without a host sync: argmax, or argmax(p / E) with E ~ Exp(1) (an exponential
    race, distributed as p: torch.multinomial's one-sample path without its validity check, which syncs)."""
    if s.greedy:
        return probs.argmax(-1, keepdim=True)
    race = torch.empty_like(probs).exponential_(1, generator=gen)
    return (probs / race).argmax(-1, keepdim=True)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, s: Sampling,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted count n, the token [1] emitted after them) as device tensors, without a host sync:
    p [g+1, V] target, q [g, V] draft, drafts [g]."""
    g = q.shape[0]
    rows = torch.arange(g, device=p.device)
    u = torch.rand(g, generator=gen, device=p.device)
    ok = u * q[rows, drafts] < p[rows, drafts]  # u < p(x)/q(x), q(x) > 0 since x ~ q
    n = ok.long().cumprod(0).sum()  # up to the first rejection; g if none
    at = n.view(1)
    p_n, q_n = p.index_select(0, at)[0], F.pad(q, (0, 0, 0, 1)).index_select(0, at)[0]  # q_{g+1} = 0: bonus ~ p
    residual = (p_n - q_n).clamp(min=0)  # max(0, p - q)
    total = residual.sum()
    probs = torch.where(total > 0, residual / total, p_n)  # p = q exactly cannot reject; guard rounding
    return n, sample(probs, s, gen)


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


def buffer(prompt: list[int], extra: int, lm: Decoder) -> torch.Tensor:
    """The token sequence: the prompt, then room for `extra` tokens; each of its positions has a cache slot."""
    if not prompt or len(prompt) + extra > lm.cache.max_len:
        raise SpecctlError(f"a {len(prompt)}-token prompt with {extra} more tokens does not fit a static cache of "
                           f"{lm.cache.max_len} positions")
    seq = torch.zeros(len(prompt) + extra, dtype=torch.long, device=lm.device)
    seq[: len(prompt)] = torch.tensor(prompt, device=lm.device)
    return seq


def prefill(lm: Decoder, seq: torch.Tensor, n: int) -> None:
    """Cache every token but the pending one: positions 0..n-2."""
    if n > 1:
        lm(seq[: n - 1], 0)


def decode_one(lm: Decoder, seq: torch.Tensor, start: int, n: int, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """Feed seq[start:n] at positions start..n-1 and sample seq[n] from the last row; its distribution [1, V]."""
    probs = distribution(lm(seq[start:n], start)[-1:], s)
    seq[n] = sample(probs, s, gen)[0, 0]
    return probs


@torch.inference_mode()
def vanilla(target: Decoder, prompt: list[int], max_new: int, s: Sampling, gen: torch.Generator,
            eos: frozenset[int] = frozenset()) -> Generation:
    """Target-only decoding: one 1-token target call per token; host syncs only to look for EOS, every EOS_EVERY
    tokens."""
    seq, n = buffer(prompt, max_new, target), len(prompt)
    prefill(target, seq, n)
    for made in range(1, max_new + 1):
        decode_one(target, seq, n + made - 2, n + made - 1, s, gen)
        if eos and made % EOS_EVERY == 0 and not eos.isdisjoint(seq[n + made - EOS_EVERY:n + made].tolist()):
            break
    tokens, _ = cut_at_eos(seq[n:n + made].tolist(), eos)
    return Generation(tokens, target_calls=made + (n > 1))


def speculative_round(target: Decoder, draft: Decoder, seq: torch.Tensor, n: int, fed: int, g: int, gamma: int,
                      s: Sampling, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One round with the pending token at n-1, without a host sync: the draft samples seq[n..n+g-1] (its first
    call also feeds the tokens at fed..n-2 it has not seen), the target scores seq[n-1..n-1+gamma] in one call
    (a static shape: rows past g are unused), and seq[n + accepted] gets the emitted token.
    Returns (accepted, sum_v min(p, q) at each drafted position) as device tensors."""
    qs = [decode_one(draft, seq, fed if i == 0 else n - 1 + i, n + i, s, gen)[0] for i in range(g)]
    p = distribution(target(seq[n - 1:n + gamma], n - 1)[: g + 1], s)
    q = torch.stack(qs) if qs else p[:0]
    accepted, token = verify(p, q, seq[n:n + g], s, gen)
    seq.index_copy_(0, n + accepted.view(1), token)  # seq[n + accepted] = token
    return accepted, torch.minimum(p[:g], q).sum(-1)


@torch.inference_mode()
def speculative(target: Decoder, draft: Decoder, prompt: list[int], max_new: int, gamma: int, s: Sampling,
                gen: torch.Generator, eos: frozenset[int] = frozenset()) -> Generation:
    """Speculative sampling from `target` with `draft` proposing up to `gamma` tokens per round; one host sync per
    round (the accepted count and the new tokens). A draft whose cache is the target's first layers (self-speculation)
    needs no prefill of its own and is never behind: the target's passes write its layers."""
    shared = draft.cache.shares(target.cache)
    seq, n = buffer(prompt, max_new + gamma + 1, target), len(prompt)
    prefill(target, seq, n)
    if not shared:
        prefill(draft, seq, n)
    result = Generation([], target_calls=int(n > 1))
    fed, overlaps = n - 1, []  # the draft's cache holds positions 0..fed-1
    while len(result.tokens) < max_new:
        g = min(gamma, max_new - len(result.tokens) - 1)
        accepted, overlap = speculative_round(target, draft, seq, n, fed, g, gamma, s, gen)
        a, *new = torch.cat([accepted.view(1), seq[n:n + g + 1]]).tolist()  # the round's one host sync
        result.target_calls += 1
        if g:
            result.rounds.append((g, a))
            overlaps.append(overlap)
        # rollback: the draft fed positions up to n+g-2 (d_{g-1}); those before the new pending token n+a stay valid
        fed = n + a if shared else min(n + g - 1 if g else fed, n + a)
        n += a + 1
        result.tokens, stop = cut_at_eos(result.tokens + new[:a + 1], eos)
        if stop:
            break
    result.overlaps = torch.cat(overlaps).tolist() if overlaps else []
    return result
