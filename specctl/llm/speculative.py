"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with KV caches, and the vanilla baseline.

One round: the draft samples d_1..d_g from q; the target scores all of them in one pass (p_1..p_{g+1});
d_i is accepted with probability min(1, p_i(d_i)/q_i(d_i)) until the first rejection j, which emits a sample
from norm(max(0, p_j - q_j)); if all g pass, a bonus token comes from p_{g+1}. The output is distributed
exactly as the target's (with the same temperature / top-k / top-p applied to both). Temperature 0 is greedy:
p and q are one-hot, so the output equals vanilla greedy decoding token for token.

Both models decode over static KV caches (static.py); a cache holds every token but the last one emitted (the
"pending" token), and rolling back rejected tokens only moves a position counter. A vanilla step and a whole
speculative round read and write only persistent device tensors (a Tape: the token sequence and the position
counter), so `Decoding` captures each once as a CUDA graph and replays it for every token / round and every prompt:
no host sync inside a round, no per-kernel launch cost, and the baseline gets the same treatment as the method.
Random draws use the default generator (graph-safe); seed with torch.manual_seed.

With a shared cache (static_pair's `share_cache`) the draft reads and writes the target's cache layers 0..l
(self-speculation) and the verify pass recomputes those layers for the drafted tokens: reusing the draft's layer-l
states instead (LayerSkip) would need the draft to also run d_g, the same number of layer calls, which is what a
batch-1 step costs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specctl.core.errors import SpecctlError
from specctl.core.runtime import capture_graph, time_call
from specctl.llm.static import Decoder, StaticLM

EOS_EVERY = 4  # vanilla copies its tokens to the host every 4 steps to look for EOS (one block behind)


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


def sample(probs: torch.Tensor, s: Sampling) -> torch.Tensor:
    """One token per row [..., 1] without a host sync: argmax, or argmax(p / E) with E ~ Exp(1) (an exponential
    race, distributed as p: torch.multinomial's one-sample path without its validity check, which syncs)."""
    if s.greedy:
        return probs.argmax(-1, keepdim=True)
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(-1, keepdim=True)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted count n [1], the token [1] emitted after them) as device tensors, without a host sync:
    p [g+1, V] target, q [g, V] draft, drafts [g]."""
    g = q.shape[0]
    rows = torch.arange(g, device=p.device)
    ok = torch.rand(g, device=p.device) * q[rows, drafts] < p[rows, drafts]  # u < p(x)/q(x), q(x) > 0 as x ~ q
    n = ok.long().cumprod(0).sum().view(1)  # up to the first rejection; g if none
    p_n, q_n = p.index_select(0, n)[0], F.pad(q, (0, 0, 0, 1)).index_select(0, n)[0]  # q_{g+1} = 0: bonus ~ p
    residual = (p_n - q_n).clamp(min=0)  # max(0, p - q)
    total = residual.sum()
    probs = torch.where(total > 0, residual / total, p_n)  # p = q exactly cannot reject; guard rounding
    return n, sample(probs, s)


def verify_greedy(best: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verify() for one-hot p and q, from the target's argmax tokens best [g+1]: d_i is accepted while it is
    best_i, then best_n is emitted. Returns (n [1], token [1], the matches [g] = sum_v min(p, q) per position)."""
    match = drafts == best[:-1]
    n = match.long().cumprod(0).sum().view(1)
    return n, best.index_select(0, n), match.float()


def predicted_speedup(alpha: float, gamma: int, c: float, v: float = 1.0) -> float:
    """Leviathan et al.'s walltime speedup: tokens per round / round cost in target steps (a verification
    costing v steps; their formula has v = 1)."""
    tokens = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)  # E[tokens per round]
    return tokens / (gamma * c + v)


@dataclass
class Tape:
    """What a decode step or a round reads and writes: the token sequence and the position counter, both on the
    device and allocated once, so that the work on them can be captured as a CUDA graph and replayed."""

    seq: torch.Tensor  # [max_len] the prompt, then the generated tokens
    n: torch.Tensor  # [1] the position of the next token; the pending token (not yet in the caches) is at n - 1

    def load(self, prompt: list[int], room: int) -> int:
        """Start a generation of up to `room` more positions after `prompt`; returns its length."""
        if not prompt or len(prompt) + room > len(self.seq):
            raise SpecctlError(f"a {len(prompt)}-token prompt with {room} more tokens does not fit a static cache "
                               f"of {len(self.seq)} positions")
        self.seq.zero_()
        self.seq[: len(prompt)] = torch.tensor(prompt, device=self.seq.device)
        self.n.fill_(len(prompt))
        return len(prompt)


def next_logits(lm: Decoder, tape: Tape, offset: int = 0, catch_up: bool = False) -> torch.Tensor:
    """The logits [1, V] after feeding the token at n-1+offset. With `catch_up` (offset 0) the token at n-2 is fed
    again too: a draft with a cache of its own has not seen it after a fully accepted round, and feeding a seen
    token again rewrites the same cache entry."""
    n = tape.n
    if not catch_up:
        start = n - 1 + offset
        return lm.forward(tape.seq.index_select(0, start), start)
    start = (n - 2).clamp(min=0)  # a 1-token prompt has no n-2: position 1 then gets a placeholder, then d_1
    return lm.forward(tape.seq.index_select(0, start + torch.arange(2, device=n.device)), start).index_select(
        0, n - 1 - start)


def decode_one(lm: Decoder, tape: Tape, s: Sampling, offset: int = 0, catch_up: bool = False) -> torch.Tensor | None:
    """Sample seq[n+offset] from the logits after the token at n-1+offset; its distribution [V] (None when greedy:
    the argmax needs none)."""
    logits = next_logits(lm, tape, offset, catch_up)
    if s.greedy:
        tape.seq.index_copy_(0, tape.n + offset, logits.argmax(-1))
        return None
    probs = distribution(logits, s)
    tape.seq.index_copy_(0, tape.n + offset, sample(probs, s)[0])
    return probs[0]


def vanilla_step(target: Decoder, tape: Tape, s: Sampling) -> None:
    decode_one(target, tape, s)
    tape.n += 1


def verify_call(target: Decoder, tape: Tape, gamma: int, s: Sampling) -> torch.Tensor:
    """The target's view of the pending token and the gamma tokens after it, in one call: its distributions
    [gamma+1, V], or when greedy its argmax tokens [gamma+1]."""
    start = tape.n - 1
    logits = target.forward(tape.seq.index_select(0, start + torch.arange(gamma + 1, device=start.device)), start)
    return logits.argmax(-1) if s.greedy else distribution(logits, s)


def speculative_round(target: Decoder, draft: Decoder, tape: Tape, gamma: int, s: Sampling,
                      catch_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One round with the pending token at n-1, without a host sync: the draft samples seq[n..n+gamma-1], the target
    scores seq[n-1..n-1+gamma] in one call, seq[n + accepted] gets the emitted token and n moves past it.
    Returns (accepted [1], sum_v min(p, q) at each drafted position [gamma]) as device tensors."""
    qs = [decode_one(draft, tape, s, i, catch_up and i == 0) for i in range(gamma)]
    drafts = tape.seq.index_select(0, tape.n + torch.arange(gamma, device=tape.n.device))
    p = verify_call(target, tape, gamma, s)
    if s.greedy:
        accepted, token, overlap = verify_greedy(p, drafts)
    else:
        q = torch.stack(qs)
        accepted, token = verify(p, q, drafts, s)
        overlap = torch.minimum(p[:gamma], q).sum(-1)
    tape.seq.index_copy_(0, tape.n + accepted, token)  # seq[n + accepted] = token
    tape.n += accepted + 1
    return accepted, overlap


class Replay:
    """`fn` (which reads and writes only persistent tensors) as a callable: a CUDA graph replay where `graphs` is
    on (a CUDA device) and capture works, else fn itself. Outputs of a replay are the graph's and change with the
    next one."""

    def __init__(self, fn: Callable, graphs: bool, reset: Callable | None = None) -> None:
        self.fn, self.graph, self.out = fn, None, None
        if graphs:
            try:
                self.graph, self.out = capture_graph(fn, reset=reset)
            except RuntimeError as e:  # keep going eagerly, and say so
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=2)

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


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


class Fence:
    """A point in the device's queued work that the host can wait for (already passed on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Decoding:
    """Vanilla and speculative decoding of one target (and draft) at one gamma and sampling policy, over one Tape
    sized to the target's cache. With `graphs` (CUDA, static decoders) the vanilla step and the whole speculative
    round are each captured once, here, and replayed for every prompt (the warm-up writes are overwritten by the
    next prompt's prefill); otherwise the same functions run eagerly.

    The host never makes the device wait: it reads what a round (or a block of EOS_EVERY vanilla steps) produced,
    through asynchronous copies to pinned memory, while the next one already runs; that next one is queued only
    when it is needed whatever the current one yields (a round yields at least one token), so only EOS can
    leave one extra round (or block) running."""

    @torch.inference_mode()
    def __init__(self, target: Decoder, draft: Decoder | None = None, gamma: int = 1, sampling: Sampling = Sampling(),
                 graphs: bool = False) -> None:
        self.target, self.draft, self.gamma, self.sampling = target, draft, gamma, sampling
        self.shared = draft is not None and draft.cache.shares(target.cache)
        self.device = device = target.device
        max_len = target.cache.max_len
        if draft is not None and max_len < gamma + 2:
            raise SpecctlError(f"a static cache of {max_len} positions cannot hold a round of gamma {gamma}")
        self.tape = Tape(torch.zeros(max_len, dtype=torch.long, device=device),
                         torch.ones(1, dtype=torch.long, device=device))
        # per round k: accepted and the gamma+1 tokens from the round's first drafted position; sum min(p, q)
        self.log = torch.zeros(max_len, gamma + 2, dtype=torch.long, device=device)
        self.overlaps = torch.zeros(max_len, gamma, device=device)
        self.k = torch.zeros(1, dtype=torch.long, device=device)
        pinned = device.type == "cuda"
        self.host_log = torch.zeros(max_len, gamma + 2, dtype=torch.long, pin_memory=pinned)
        self.host_seq = torch.zeros(max_len, dtype=torch.long, pin_memory=pinned)
        self.graphs = graphs and device.type == "cuda" and all(isinstance(m, StaticLM) for m in (target, draft) if m)
        self.step = Replay(lambda: vanilla_step(target, self.tape, sampling), self.graphs, self.rewind)
        self.round = Replay(self.logged_round, self.graphs, self.rewind) if draft is not None else None

    def logged_round(self) -> None:
        """speculative_round, with its results written to row k of the round logs."""
        first = self.tape.n.clone()
        accepted, overlap = speculative_round(self.target, self.draft, self.tape, self.gamma, self.sampling,
                                              not self.shared)
        window = self.tape.seq.index_select(0, first + torch.arange(self.gamma + 1, device=first.device))
        self.log.index_copy_(0, self.k, torch.cat([accepted, window])[None])
        self.overlaps.index_copy_(0, self.k, overlap[None])
        self.k += 1

    def rewind(self) -> None:
        """Back to the first position and round, so that capture warm-ups stay inside the cache and the logs."""
        self.tape.n.fill_(1)
        self.k.zero_()

    @property
    def graphed(self) -> bool:
        return self.step.graph is not None and (self.round is None or self.round.graph is not None)

    def start(self, prompt: list[int], room: int) -> int:
        """Load the prompt and cache every token but the pending one (positions 0..n-2) in the target, and in a
        draft with a cache of its own; returns n."""
        n = self.tape.load(prompt, room)
        self.k.zero_()
        for lm in (self.target, self.draft if self.draft is not None and not self.shared else None):
            if lm is not None and n > 1:
                lm(self.tape.seq[: n - 1], 0)
        return n

    @torch.inference_mode()
    def vanilla(self, prompt: list[int], max_new: int, eos: frozenset[int] = frozenset()) -> Generation:
        """Target-only decoding: one 1-token target call per token; looks for EOS every EOS_EVERY tokens, in the
        block before the one running."""
        n = self.start(prompt, max_new)
        seq, host, blocks = self.tape.seq, self.host_seq, []  # (fence, first, end) of the copied blocks
        for made in range(1, max_new + 1):
            self.step()
            if eos and made % EOS_EVERY == 0:
                host[n + made - EOS_EVERY:n + made].copy_(seq[n + made - EOS_EVERY:n + made], non_blocking=True)
                blocks.append((Fence(self.device), n + made - EOS_EVERY, n + made))
                if len(blocks) > 1:
                    fence, first, end = blocks[-2]
                    fence.wait()
                    if not eos.isdisjoint(host[first:end].tolist()):
                        break
        tokens, _ = cut_at_eos(seq[n:n + made].tolist(), eos)
        return Generation(tokens, target_calls=made + (n > 1))

    @torch.inference_mode()
    def speculative(self, prompt: list[int], max_new: int, eos: frozenset[int] = frozenset()) -> Generation:
        """Speculative sampling with gamma draft tokens per round (the last round's extra tokens are dropped); the
        host reads each round's log row while the next round runs."""
        n = self.start(prompt, max_new + 2 * self.gamma + 1)  # room for a round queued past the last one needed
        result, fences = Generation([], target_calls=int(n > 1)), []

        def launch() -> None:
            k = len(fences)
            self.round()
            self.host_log[k].copy_(self.log[k], non_blocking=True)
            fences.append(Fence(self.device))

        launch()
        while True:
            k = len(result.rounds)  # the round read next; it is running or done
            if len(fences) == k + 1 and len(result.tokens) + 1 < max_new:
                launch()  # needed even if round k yields a single token
            fences[k].wait()
            a, *window = self.host_log[k].tolist()
            result.rounds.append((self.gamma, a))
            result.target_calls += 1
            result.tokens, stop = cut_at_eos(result.tokens + window[:a + 1], eos)
            if stop or len(result.tokens) >= max_new:
                break
            if len(fences) == k + 1:
                launch()
        result.tokens = result.tokens[:max_new]
        result.overlaps = self.overlaps[:len(result.rounds)].flatten().tolist()
        return result

    @torch.inference_mode()
    def timings(self, prompt: list[int], repeats: int) -> dict[str, float]:
        """Median seconds of one target decode step, one draft decode step (sampling included) and one verification
        call (gamma + 1 tokens and their distributions), each after `prompt` and replayed like decoding is."""
        calls = {"target_step": lambda: decode_one(self.target, self.tape, self.sampling),
                 "draft_step": lambda: decode_one(self.draft, self.tape, self.sampling),
                 "verify": lambda: verify_call(self.target, self.tape, self.gamma, self.sampling)}
        out = {}
        for name, fn in calls.items():
            replay = Replay(fn, self.graphs, self.rewind)
            self.start(prompt, self.gamma + 1)
            out[name] = time_call(replay, self.target.device, repeats, warmup=5).median
        return out
