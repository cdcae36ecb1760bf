"""Text data for LMs, read with `datasets` from local files and formatted as chat.

Recognised records (by their fields): ShareGPT `conversations: [{from, value}]`, chat `messages: [{role,
content}]`, Alpaca `instruction, input, output`, question/answer pairs such as GSM8K `question, answer`,
Spec-Bench `turns` (user messages), and plain `text`. Plain-text files (.txt) give one example per paragraph.
Chat examples are rendered with the tokenizer's chat template, else with SIMPLE_TEMPLATE:

    <|user|>\\n{content}\\n<|assistant|>\\n{content}<eos>\\n ...   (+ "<|assistant|>\\n" as the generation prompt)

Prompts, reply-only loss masks and batches: chat.py; the target's own replies: replies.py.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specctl.core.errors import SpecctlError

SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ROLE_TAGS = ["<|system|>", "<|user|>", "<|assistant|>"]
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
FORMATS_HINT = "conversations, messages, instruction+output, question+answer, turns or text"


@dataclass
class Example:
    """A chat (messages with role/content) or a plain text."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None


def _chat(turns: list[dict[str, Any]], role_key: str, content_key: str) -> Example:
    messages = [{"role": ROLES.get(str(t.get(role_key, "")).lower(), "user"), "content": str(t.get(content_key) or "")}
                for t in turns or []]
    return Example(messages=[m for m in messages if m["content"].strip()])


def _alpaca(r: dict[str, Any]) -> Example:
    prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
    return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}])


FORMATS: list[tuple[tuple[str, ...], Callable[[dict[str, Any]], Example]]] = [
    (("conversations",), lambda r: _chat(r["conversations"], "from", "value")),
    (("messages",), lambda r: _chat(r["messages"], "role", "content")),
    (("instruction", "output"), _alpaca),
    (("question", "answer"), lambda r: Example(messages=[{"role": "user", "content": r["question"]},
                                                         {"role": "assistant", "content": r["answer"]}])),
    (("turns",), lambda r: Example(messages=[{"role": "user", "content": t} for t in r["turns"] if t])),
    (("text",), lambda r: Example(text=r["text"])),
]


def resolve_text_file(name: str, folder: Path | None) -> Path:
    """A path, or a file name under the data directory (profile data.dir, else $SPECCTL_DATA_DIR)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if folder is not None and (folder / name).is_file():
        return folder / name
    where = f"{folder}/{name}" if folder else "(no data directory: set data.dir or $SPECCTL_DATA_DIR)"
    raise SpecctlError(f"text file not found: {name} (looked at {path} and {where})")


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column names of a JSON / JSONL / text file, loaded with `datasets` (nothing downloaded)."""
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets.disable_progress_bars()
    kind, options = ("text", {"sample_by": "paragraph"}) if path.suffix in (".txt", ".md") else ("json", {})
    try:
        data = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True, **options)
    except Exception as e:  # datasets wraps parser errors in several types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpecctlError(f"{path}: cannot read as {kind}: {reason}") from None
    return data.to_list(), list(data.column_names)


def load_examples(path: Path, limit: int | None = None) -> list[Example]:
    """Every usable example in a file; a SpecctlError naming the file's fields when none is recognised."""
    rows, columns = read_records(path)
    convert = next((fn for keys, fn in FORMATS if all(k in columns for k in keys)), None)
    if convert is None:
        raise SpecctlError(f"{path}: no usable text field; it has fields {', '.join(columns) or '(none)'} "
                           f"(expected {FORMATS_HINT})")
    examples = [e for e in (convert(r) for r in rows[:limit]) if e.messages or (e.text and e.text.strip())]
    if not examples:
        raise SpecctlError(f"{path}: no non-empty examples (fields {', '.join(columns)})")
    return examples


def read_files(names: list[str], folder: Path | None, limit: int | None = None) -> list[Example]:
    """The examples of several files (each capped at `limit`), in order."""
    return [e for name in names for e in load_examples(resolve_text_file(name, folder), limit)]


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic shuffle, then (train, held-out); the held-out part has at least one example."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * fraction))
    if len(order) < 2:
        raise SpecctlError(f"need at least 2 examples for a held-out split, got {len(order)}")
    return order[n_val:], order[:n_val]


def template(tokenizer) -> str:
    return tokenizer.chat_template or SIMPLE_TEMPLATE


def render_chat(example: Example, tokenizer) -> str:
    if example.messages is None:
        return example.text or ""
    return tokenizer.apply_chat_template(example.messages, chat_template=template(tokenizer), tokenize=False)


def encode(example: Example, tokenizer, max_len: int) -> list[int]:
    """Token ids (chat templates carry their own special tokens; plain text gets the tokenizer's)."""
    ids = tokenizer(render_chat(example, tokenizer), add_special_tokens=example.messages is None)["input_ids"]
    return ids[:max_len]


def contents(examples: list[Example]) -> list[str]:
    """Raw strings (message contents and texts), e.g. to train a tokenizer before any template exists."""
    return [m["content"] for e in examples for m in (e.messages or [])] + [e.text for e in examples if e.text]
