"""Distillation loss and held-out metrics for an early-exit draft, token-weighted over the same mask.

Position t predicts token t+1, and counts when token t+1 is a counted label (chat.Tokens: a reply token of a chat,
any token of a plain text but the first two). KL is KL(p_target || p_draft) in nats/token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def token_mask(counted: torch.Tensor) -> torch.Tensor:
    """[B, L-1] bool: the predictions that count (their label, the next token, is counted)."""
    return counted[:, 1:].bool()


def kl_per_token(teacher: torch.Tensor, draft: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_T/T) || softmax(z_D/T)) per row."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(draft.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # sum_v p (log p - log q)


def select(logits: torch.Tensor, ids: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The counted prediction rows [N, V] and their labels [N]."""
    keep = token_mask(counted)
    return logits[:, :-1][keep], ids[:, 1:][keep]


def objective(kl: torch.Tensor, draft: torch.Tensor, labels: torch.Tensor, temperature: float, kl_weight: float,
              ce_weight: float) -> torch.Tensor:
    """kl_weight * T^2 * mean KL_T + ce_weight * mean CE(draft, labels), from per-row KL and draft logits."""
    loss = kl_weight * temperature**2 * kl.mean()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(draft.float(), labels)
    return loss



@dataclass
class HeldOut:
    """Running token-weighted sums over held-out batches."""

    temperature: float
    k: int
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, teacher: torch.Tensor, draft: torch.Tensor, ids: torch.Tensor, counted: torch.Tensor) -> None:
        t, labels = select(teacher, ids, counted)
        d, _ = select(draft, ids, counted)
        d, t = d.float(), t.float()
        topk = d.topk(min(self.k, d.shape[-1]), dim=-1).indices
        values = {
            "kl": kl_per_token(t, d, self.temperature),
            "kl_t1": kl_per_token(t, d, 1.0),
            "ce": F.cross_entropy(d, labels, reduction="none"),
            "top1": (d.argmax(-1) == labels).float(),
            "agreement": (d.argmax(-1) == t.argmax(-1)).float(),  # the greedy acceptance rate, teacher-forced
            "overlap": torch.minimum(t.softmax(-1), d.softmax(-1)).sum(-1),  # sum_v min(p, q) at T = 1
            f"top{self.k}": (topk == labels[:, None]).any(-1).float(),
            "target_ce": F.cross_entropy(t, labels, reduction="none"),
            "target_top1": (t.argmax(-1) == labels).float(),
        }
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + v.sum().item()
        self.tokens += labels.numel()

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        out = {name: total / n for name, total in self.sums.items()}
        out["ppl"] = float(torch.tensor(out.get("ce", 0.0)).exp())  # exp(mean CE)
        out["target_ppl"] = float(torch.tensor(out.get("target_ce", 0.0)).exp())
        return {**out, "tokens": self.tokens}
