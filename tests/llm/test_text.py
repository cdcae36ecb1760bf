"""Chat data for LMs: formats recognised by their fields, chat rendering, prompts, held-out split."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from specctl.core.errors import SpecctlError
from specctl.llm.chat import prompt_ids
from specctl.llm.pretrain import train_bpe
from specctl.llm.text import (
    SIMPLE_TEMPLATE,
    Example,
    encode,
    load_examples,
    render_chat,
    resolve_text_file,
    split,
)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["hello world", "what is two plus two", "four", "the cat sat on the mat"] * 5, 300)


def test_formats_by_fields(tmp_path):
    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "gpt", "value": "hello"}]}]))
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4"}])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "#### 4"}])
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"question_id": 1, "category": "x", "turns": ["a?", "b?"]}])
    text = tmp_path / "plain.txt"
    text.write_text("First para\nline two\n\nSecond para\n")
    assert load_examples(share)[0].messages == [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]
    assert load_examples(alpaca)[0].messages[0]["content"] == "Add\n\n2 and 2"
    assert [m["role"] for m in load_examples(gsm)[0].messages] == ["user", "assistant"]
    assert [m["content"] for m in load_examples(bench)[0].messages] == ["a?", "b?"]
    assert [e.text.strip() for e in load_examples(text)] == ["First para\nline two", "Second para"]


def test_no_usable_text_field_names_the_fields(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1, "bar": "x"}])
    with pytest.raises(SpecctlError, match="no usable text field.*foo, bar"):
        load_examples(bad)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(SpecctlError, match="text file not found: nope.jsonl"):
        resolve_text_file("nope.jsonl", tmp_path)


def test_simple_template_when_tokenizer_has_none(tokenizer):
    assert not tokenizer.chat_template or tokenizer.chat_template == SIMPLE_TEMPLATE
    chat = Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert render_chat(chat, tokenizer) == f"<|user|>\nhi\n<|assistant|>\nyo{tokenizer.eos_token}\n"
    prompt = tokenizer.decode(prompt_ids(chat, tokenizer, 100))
    assert prompt.endswith("hi\n<|assistant|>\n") and "yo" not in prompt
    assert len(encode(chat, tokenizer, 3)) == 3


def test_plain_text_prompt_is_first_half(tokenizer):
    ids = tokenizer("the cat sat on the mat the cat sat")["input_ids"]
    assert prompt_ids(Example(text="the cat sat on the mat the cat sat"), tokenizer, 100) == ids[: len(ids) // 2]


def test_split_is_deterministic_and_disjoint():
    examples = [Example(text=str(i)) for i in range(20)]
    train, val = split(examples, 0.1, seed=3)
    again, _ = split(examples, 0.1, seed=3)
    assert len(val) == 2 and [e.text for e in train] == [e.text for e in again]
    assert not {e.text for e in train} & {e.text for e in val}


def test_real_chat_corpora(data_dir):
    for name in ("gsm8k_test.jsonl", "sharegpt_v3_filtered_1000_prompts.json", "spec_bench_question.jsonl"):
        examples = load_examples(data_dir / name, limit=5)
        assert len(examples) == 5 and examples[0].messages[0]["role"] == "user"
