"""Examples as token sequences for a chat model.

- A prompt is the chat up to its first user turn, rendered with the tokenizer's chat template (text.template) and
  the generation prompt; a prompt over the token limit loses the end of its user text, never the template's own
  tokens (system prompt, role headers, generation prompt).
- A training or held-out sequence counts only the reply tokens in its loss and metrics: each assistant turn's
  content and the end-of-turn tokens after it (what the model emits when it answers), not the system prompt, the
  user text or the headers. A plain text counts every token but the first two (the first prediction has a single
  token of context).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from specctl.core.errors import SpecctlError
from specctl.llm.text import Example, template


@dataclass
class Tokens:
    ids: list[int]
    counted: list[bool]  # token i is a label the loss and metrics count

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_counted(self) -> int:
        return sum(self.counted)

    def cut(self, max_len: int) -> Tokens:
        return Tokens(self.ids[:max_len], self.counted[:max_len])


def render(messages: list[dict[str, str]], tokenizer, generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template(tokenizer), tokenize=False,
                                         add_generation_prompt=generation)


def ids_of(text: str, tokenizer) -> list[int]:
    """Token ids of rendered chat text (the template writes its own special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_pieces(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """The rendered chat cut into (text, is_reply) pieces, turn by turn: before each assistant turn the text up to
    its generation prompt, then the turn itself (content and end-of-turn tokens). Leading assistant turns (no
    question before them) are dropped."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "assistant"), len(messages))
    messages = messages[start:]
    pieces, done = [], ""
    for i, message in enumerate(messages):
        reply = message["role"] == "assistant"
        for text, counted in ([(render(messages[:i], tokenizer, True), False)] if reply else []) + [
                (render(messages[: i + 1], tokenizer), reply)]:
            if not text.startswith(done):
                raise SpecctlError("the chat template does not render a conversation turn by turn (a shorter chat "
                                   "is not a prefix of a longer one), so reply tokens cannot be told apart")
            pieces.append((text[len(done):], counted))
            done = text
    return [(text, counted) for text, counted in pieces if text]


def chat_tokens(messages: list[dict[str, str]], tokenizer, max_len: int) -> Tokens:
    ids, counted = [], []
    for text, reply in chat_pieces(messages, tokenizer):
        piece = ids_of(text, tokenizer)
        ids += piece
        counted += [reply] * len(piece)
    return Tokens(ids, counted).cut(max_len)


def text_tokens(text: str, tokenizer, max_len: int) -> Tokens:
    ids = tokenizer(text)["input_ids"][:max_len]
    return Tokens(ids, [i >= 2 for i in range(len(ids))])


def tokens(example: Example, tokenizer, max_len: int) -> Tokens:
    """A training / held-out sequence with the file's own replies."""
    if example.messages is None:
        return text_tokens(example.text or "", tokenizer, max_len)
    return chat_tokens(example.messages, tokenizer, max_len)


def with_reply(prompt: list[int], reply: list[int], max_len: int) -> Tokens:
    """A prompt and a generated reply as one sequence; the reply is what counts."""
    return Tokens(prompt + reply, [False] * len(prompt) + [True] * len(reply)).cut(max_len)


def prompt_turns(example: Example) -> list[dict[str, str]]:
    """The turns up to and including the first user turn."""
    messages = example.messages or []
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
    return messages[: first + 1]


def shorten(make: Callable[[str], list[int]], text: str, max_tokens: int, tokenizer, limit: str) -> list[int]:
    """make(text), with `text` cut at its end until the result has at most `max_tokens` tokens (set by `limit`)."""
    ids = make(text)
    if len(ids) <= max_tokens:
        return ids
    frame = len(make(""))
    if frame >= max_tokens:
        raise SpecctlError(f"a prompt of at most {max_tokens} tokens cannot hold even the chat template's own "
                           f"{frame} tokens: raise {limit}")
    words = ids_of(text, tokenizer)
    keep = min(len(words), max_tokens - frame)
    while keep > 0:  # decoding a cut can re-tokenise a little longer: cut again by the excess
        ids = make(tokenizer.decode(words[:keep]))
        if len(ids) <= max_tokens:
            return ids
        keep -= len(ids) - max_tokens
    return make("")


def prompt_ids(example: Example, tokenizer, max_tokens: int, limit: str = "llm.spec.max_prompt_tokens") -> list[int]:
    """A generation prompt of at most `max_tokens` tokens: the chat up to its first user turn and the generation
    prompt, the user text shortened where needed (chat); the last `max_tokens` of the first half of the tokens
    (plain text)."""
    if example.messages is None:
        ids = tokenizer(example.text or "")["input_ids"]
        return ids[: max(1, len(ids) // 2)][-max_tokens:]
    turns = prompt_turns(example)

    def make(content: str) -> list[int]:
        return ids_of(render([*turns[:-1], {**turns[-1], "content": content}], tokenizer, True), tokenizer)

    return shorten(make, turns[-1]["content"], max_tokens, tokenizer, limit)


def batches(seqs: list[Tokens], size: int, pad_id: int, device, seed: int | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids, attention_mask, counted) batches [B, L], right-padded to the longest sequence; shuffled when a seed is
    given."""
    order = list(range(len(seqs)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), size):
        chunk = [seqs[i] for i in order[start:start + size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        counted = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s.ids)
            mask[row, : len(s)] = 1
            counted[row, : len(s)] = torch.tensor(s.counted)
        yield ids.to(device), mask.to(device), counted.to(device)
