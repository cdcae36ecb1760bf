"""Self-speculation by layer skipping: which of the target's blocks the draft leaves out (llm.skip_layers = "search").

A greedy search in the spirit of Draft & Verify (Zhang et al. 2023) and SWIFT (Xia et al. 2024), which pick the
skip set by Bayesian optimisation or on the fly: on the target's own greedy replies to a few prompts (teacher
forcing), the draft's top-1 agreement a with the target stands in for its greedy acceptance rate, and the share of
blocks it keeps for its step cost c; the predicted speedup is (1 - a^(g+1)) / ((1 - a)(g c + 1)). From nothing
skipped, each step leaves out the one more block that predicts the best speedup, up to half the blocks, and the
best set along that path wins (one block saves little, so a step may lose a little acceptance before later ones
pay). The first and the last block are always kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from specctl.core.data_dir import data_dir
from specctl.core.errors import SpecctlError
from specctl.llm.chat import Tokens, batches, prompt_ids, with_reply
from specctl.llm.draft import build_skip_draft
from specctl.llm.kl import token_mask
from specctl.llm.lm import LM
from specctl.llm.profile import LLMProfile
from specctl.llm.replies import ReplySettings, generate
from specctl.llm.speculative import predicted_speedup
from specctl.llm.text import read_files


@dataclass
class SkipSearch:
    skip: list[int]
    agreement: float
    predicted_speedup: float
    path: list[dict] = field(default_factory=list)  # every step: the skip set, its agreement and prediction


@dataclass
class Probe:
    """Teacher-forced sequences and the target's greedy choice at each counted prediction."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    best: list[torch.Tensor]


@torch.no_grad()
def probe(lm: LM, seqs: list[Tokens], batch_size: int) -> Probe:
    out = list(batches(seqs, batch_size, lm.tokenizer.pad_token_id, lm.device))
    best = [lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1][token_mask(counted)].argmax(-1)
            for ids, mask, counted in out]
    return Probe(out, best)


@torch.no_grad()
def agreement(lm: LM, skip: list[int], p: Probe) -> float:
    """Top-1 agreement with the target of the draft that leaves out `skip`, over the probe's counted predictions."""
    model = build_skip_draft(lm, skip).model
    hits = total = 0
    for (ids, mask, counted), best in zip(p.batches, p.best):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][token_mask(counted)]
        hits += int((logits.argmax(-1) == best).sum())
        total += best.numel()
    return hits / max(total, 1)


def search_skip(lm: LM, seqs: list[Tokens], gamma: int, batch_size: int = 8, say=None) -> SkipSearch:
    """The greedy skip set of the module docstring, over `seqs` (prompts with the target's replies counted)."""
    p, n = probe(lm, seqs, batch_size), lm.n_layers

    def step(skip: list[int]) -> dict:
        a, c = agreement(lm, skip, p), 1 - len(skip) / n
        return {"skip": sorted(skip), "agreement": a, "predicted_speedup": predicted_speedup(a, gamma, c)}

    path = [step([])]
    while len(path[-1]["skip"]) < max(1, (n - 2) // 2):
        skip = path[-1]["skip"]
        path.append(max((step([*skip, i]) for i in range(1, n - 1) if i not in skip),
                        key=lambda s: s["predicted_speedup"]))
        if say is not None:
            say(f"layer skip search: leave out {path[-1]['skip']}: agreement {path[-1]['agreement']:.3f}, predicted "
                f"speedup {path[-1]['predicted_speedup']:.2f}x")
    best = max(path, key=lambda s: s["predicted_speedup"])
    return SkipSearch(best["skip"], best["agreement"], best["predicted_speedup"], path)


def probe_sequences(profile: LLMProfile, lm: LM) -> list[Tokens]:
    """llm.search_prompts chat prompts of llm.train_files (sampled with the seed) with the target's greedy replies
    of llm.spec.max_new_tokens tokens."""
    llm, spec = profile.llm, profile.llm.spec
    chats = [e for e in read_files(llm.train_files, data_dir(profile.data), llm.max_examples) if e.messages]
    if not chats:
        raise SpecctlError(f"llm.skip_layers = \"search\" needs chat prompts in llm.train_files ({llm.train_files})")
    chosen = random.Random(profile.seed).sample(chats, min(llm.search_prompts, len(chats)))
    prompts = [prompt_ids(e, lm.tokenizer, spec.max_prompt_tokens) for e in chosen]
    replies = generate(lm, prompts, ReplySettings(spec.max_new_tokens, 0.0, len(prompts), profile.seed))
    return [with_reply(p, r, len(p) + len(r)) for p, r in zip(prompts, replies)]


def skip_layers(profile: LLMProfile, lm: LM, say=None) -> list[int]:
    """llm.skip_layers, searched where it says "search"."""
    skip = profile.llm.skip_layers
    if skip == "search":
        found = search_skip(lm, probe_sequences(profile, lm), profile.llm.spec.gamma, profile.train.batch_size, say)
        if not found.skip:
            raise SpecctlError(f"llm.skip_layers = \"search\": leaving out any of the target's {lm.n_layers} blocks "
                               "predicts no speedup on the search prompts (its acceptance falls too far)")
        return found.skip
    if not skip:
        raise SpecctlError('llm.draft_kind = "layer_skip" needs llm.skip_layers: the blocks to leave out, or "search"')
    return list(skip)
