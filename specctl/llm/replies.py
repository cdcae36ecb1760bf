"""On-policy replies: the target's own answers to chat prompts, generated once and kept with `datasets`.

A draft is asked, at decoding time, to predict the target's replies, so head tuning and the held-out metrics read
those (llm.replies = "target"), not the files' (a ShareGPT prompt file holds no replies at all). Each chat
example's first user turn becomes a prompt (chat.prompt_ids: the chat template, the user text shortened to fit),
and the target answers it: greedy or sampled at llm.reply_temperature, at most llm.reply_tokens tokens, batched
with left padding, cut after its end-of-turn token. The (prompt, reply) ids are saved with `Dataset.save_to_disk`
under $SPECCTL_CACHE/replies/<key> (default ~/.cache/specctl), the key hashing the target's weights, the
tokenizer, the prompts and the generation settings, so a later run with the same ones reads them back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from specctl.core.errors import SpecctlError
from specctl.core.files import replace_dir, staging_dir
from specctl.llm.lm import LM, eos_ids, tokenizer_fingerprint
from specctl.llm.speculative import cut_at_eos
from specctl.llm.target import cache_root


@dataclass(frozen=True)
class ReplySettings:
    max_new_tokens: int
    temperature: float  # 0 = greedy
    batch: int
    seed: int


def reply_key(weights: str, tokenizer, prompts: list[list[int]], settings: ReplySettings) -> str:
    """What the replies depend on: target weights (a checksum), tokenizer, prompts and sampling (not the batch size
    of a greedy run)."""
    what = {"weights": weights, "tokenizer": tokenizer_fingerprint(tokenizer), "prompts": prompts,
            **asdict(settings), "batch": settings.batch if settings.temperature else None}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(lm: LM, prompts: list[list[int]], settings: ReplySettings, say=None) -> list[list[int]]:
    """The target's reply to every prompt (Hugging Face generate; prompts of similar length batched together)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    eos, pad = eos_ids(lm), lm.tokenizer.pad_token_id
    sampling = {"do_sample": False} if settings.temperature == 0 else {
        "do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(settings.seed)
    replies: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), settings.batch):
        rows = order[start:start + settings.batch]
        ids, mask = left_padded([prompts[i] for i in rows], pad, lm.device)
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                pad_token_id=pad, eos_token_id=sorted(eos), **sampling)
        for row, i in enumerate(rows):
            replies[i] = cut_at_eos(out[row, ids.shape[1]:].tolist(), eos)[0]
        if say is not None:
            say(f"replies: {min(start + settings.batch, len(order))}/{len(order)} generated")
    return replies


def cached_replies(lm: LM, weights: str, prompts: list[list[int]], settings: ReplySettings,
                   say=None) -> list[list[int]]:
    """The target's replies to `prompts`, read from the cache or generated and saved there."""
    import datasets

    datasets.disable_progress_bars()
    folder = cache_root() / "replies" / reply_key(weights, lm.tokenizer, prompts, settings)
    if folder.is_dir():
        try:
            saved = datasets.load_from_disk(str(folder))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise SpecctlError(f"{folder}: unreadable cached replies ({e}); delete the folder to generate them "
                               "again") from None
        if saved["prompt_ids"] == prompts:
            if say is not None:
                say(f"replies: {len(prompts)} read from {folder}")
            return saved["reply_ids"]
    replies = generate(lm, prompts, settings, say)
    staging = staging_dir(folder)
    datasets.Dataset.from_dict({"prompt_ids": prompts, "reply_ids": replies}).save_to_disk(str(staging))
    replace_dir(staging, folder)
    return replies
