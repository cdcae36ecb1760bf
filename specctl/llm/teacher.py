"""The teacher, computed once: one target pass over a set of sequences records, at every counted prediction, the
hidden state each exit layer's block outputs and the target's most likely tokens with their logits and the
log-partition at each tuning temperature; tuning then runs only what the draft trains (a head or an adapter on the
recorded states, or under option B block l and the head on the recorded input of block l) and never the target.

KL from the top k (llm.teacher_top_k): p_T keeps the k most likely tokens and one bucket for the rest of the
vocabulary (mass 1 - their sum), q_T is bucketed the same way, and the loss is KL(p_bucketed || q_bucketed) —
never above the full KL, equal to it when the tail holds no mass; k = 0 keeps the whole vocabulary (exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specctl.llm.chat import Tokens, batches
from specctl.llm.draft import Draft, assemble
from specctl.llm.kl import token_mask
from specctl.llm.lm import LM, block_outputs, find_parts


@dataclass
class Chunk:
    """One batch of sequences, kept for option B: block l reruns on its recorded input."""

    attention: torch.Tensor  # [b, L]
    counted: torch.Tensor  # [b, L] bool
    inputs: dict[int, torch.Tensor]  # exit layer -> the input of block l at every position [b, L, H]
    rows: slice  # its counted predictions in the teacher's rows


@dataclass
class Teacher:
    """Rows = the counted predictions of every sequence, in batch order."""

    states: dict[int, torch.Tensor]  # exit layer -> block l's output [N, H]
    top_ids: torch.Tensor  # [N, k] the target's most likely next tokens, most likely first
    top_logits: torch.Tensor  # [N, k] their logits (float32)
    lse: dict[float, torch.Tensor]  # temperature -> logsumexp(z / T) over the whole vocabulary [N]
    labels: torch.Tensor  # [N] the next tokens of the text
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.labels.shape[0]


def bucketed_kl(student: torch.Tensor, top_ids: torch.Tensor, top_logits: torch.Tensor, lse: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """KL(p_T || q_T) per row over the teacher's top k and a tail bucket (module docstring); student [n, V]."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1).gather(1, top_ids)
    log_p = top_logits / temperature - lse[:, None]
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    q_tail = (1 - log_q.exp().sum(-1)).clamp(min=1e-12)
    return kl + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()


def record_inputs(lm: LM, layers: list[int]):
    """Forward pre-hooks collecting the input hidden states of blocks `layers` (option B); returns (store, hooks)."""
    seen: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        return lambda _m, args, kwargs: seen.__setitem__(layer, args[0] if args else kwargs["hidden_states"])

    hooks = [lm.parts.layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    return seen, hooks


@torch.no_grad()
def record(lm: LM, seqs: list[Tokens], layers: list[int], temperatures: list[float], top_k: int,
           batch_size: int, keep_inputs: bool = False) -> Teacher:
    """One target pass over `seqs` (batches of batch_size): the Teacher of every exit layer and temperature."""
    device, pad = lm.device, lm.tokenizer.pad_token_id
    k = lm.vocab_size if top_k == 0 else min(top_k, lm.vocab_size)
    parts: dict[str, list] = {"states": [], "ids": [], "logits": [], "labels": [], "lse": []}
    chunks, start = [], 0
    for ids, attention, counted in batches(seqs, batch_size, pad, device):
        keep = token_mask(counted)
        seen, hooks = record_inputs(lm, layers if keep_inputs else [])
        try:
            with block_outputs([lm.parts.layers[i] for i in layers]) as outs:
                logits = lm.model(input_ids=ids, attention_mask=attention).logits[:, :-1][keep].float()
        finally:
            for h in hooks:
                h.remove()
        top = logits.topk(k, dim=-1)
        parts["states"].append([o[:, :-1][keep] for o in outs])
        parts["ids"].append(top.indices)
        parts["logits"].append(top.values)
        parts["labels"].append(ids[:, 1:][keep])
        parts["lse"].append([torch.logsumexp(logits / t, dim=-1) for t in temperatures])
        rows = slice(start, start + int(keep.sum()))
        start = rows.stop
        if keep_inputs:
            chunks.append(Chunk(attention, counted, {i: seen[i] for i in layers}, rows))
    return Teacher(states={layer: torch.cat([s[i] for s in parts["states"]]) for i, layer in enumerate(layers)},
                   top_ids=torch.cat(parts["ids"]), top_logits=torch.cat(parts["logits"]),
                   lse={t: torch.cat([x[i] for x in parts["lse"]]) for i, t in enumerate(temperatures)},
                   labels=torch.cat(parts["labels"]), chunks=chunks)


class Student:
    """A draft's logits at teacher rows, from the recorded states: its head (or adapter) on block l's output, or,
    under option B, its block l and head on block l's recorded input (a one-block model of the target's class)."""

    def __init__(self, draft: Draft) -> None:
        self.draft = draft
        own = find_parts(draft.model)
        self.tail = assemble(draft.target, [own.layers[-1]], own.norm, own.head) if draft.tune_block else None

    def rows(self, teacher: Teacher, rows: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] at the given rows (head / adapter drafts)."""
        return self.draft.head(teacher.states[self.draft.layer][rows])

    def chunk(self, chunk: Chunk) -> torch.Tensor:
        """Logits at a chunk's rows (option B)."""
        h = chunk.inputs[self.draft.layer]
        logits = self.tail(inputs_embeds=h, attention_mask=chunk.attention, use_cache=False).logits
        return logits[:, :-1][token_mask(chunk.counted)]
