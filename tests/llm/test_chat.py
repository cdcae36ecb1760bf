"""Chat data the way the research plan means it: prompts keep the chat template when they are cut, the loss counts
reply tokens only, and the target's own replies are generated once and read back from the `datasets` cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from specctl.backends import load_profile
from specctl.core.errors import SpecctlError
from specctl.llm import replies as replies_mod
from specctl.llm.chat import batches, chat_tokens, prompt_ids, with_reply
from specctl.llm.finetune import load_sets
from specctl.llm.lm import LM, find_parts
from specctl.llm.replies import ReplySettings, cached_replies
from specctl.llm.text import Example
from tests.llm.tiny import SYSTEM, chat_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
HEADER = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def test_only_reply_tokens_count(tokenizer):
    chat = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"},
            {"role": "user", "content": "and the cat"}, {"role": "assistant", "content": "sat on a mat"}]
    seq = chat_tokens(chat, tokenizer, 500)
    assert tokenizer.decode(seq.ids) == tokenizer.apply_chat_template(chat, tokenize=False)
    counted = tokenizer.decode([t for t, c in zip(seq.ids, seq.counted) if c])
    assert counted == "four<|im_end|>\nsat on a mat<|im_end|>\n"  # no system prompt, user text or header
    _, _, mask = next(batches([seq, seq.cut(9)], 2, tokenizer.pad_token_id, "cpu"))
    assert mask[0].tolist() == seq.counted and not mask[1].any()  # padding never counts


def test_a_long_prompt_loses_the_end_of_its_user_text_never_the_template(tokenizer):
    text = " ".join(["the cat sat on the mat"] * 40)
    long = Example(messages=[{"role": "user", "content": text}, {"role": "assistant", "content": "four"}])
    frame = len(prompt_ids(Example(messages=[{"role": "user", "content": ""}]), tokenizer, 500))
    ids = prompt_ids(long, tokenizer, frame + 12)
    decoded = tokenizer.decode(ids)
    assert frame + 9 <= len(ids) <= frame + 12
    assert decoded.startswith(HEADER + "the cat sat") and decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    short = Example(messages=[{"role": "user", "content": "the cat"}])
    end = "<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(prompt_ids(short, tokenizer, frame + 12)) == HEADER + "the cat" + end
    with pytest.raises(SpecctlError, match="cannot hold even the chat template's own.*raise llm.spec.max_prompt"):
        prompt_ids(long, tokenizer, frame)


@pytest.fixture(scope="module")
def lm(tokenizer):
    model = tiny_llama(tokenizer, layers=2).requires_grad_(False)
    return LM(model, tokenizer, "memory", find_parts(model))


def test_replies_are_generated_once_and_read_back(lm, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCTL_CACHE", str(tmp_path))
    prompts = [prompt_ids(Example(messages=[{"role": "user", "content": c}]), tokenizer, 64)
               for c in ("the cat", "what is two plus two and then four", "birds sing")]
    settings = ReplySettings(max_new_tokens=12, temperature=0.0, batch=2, seed=0)
    made = cached_replies(lm, "w1", prompts, settings)
    eos = tokenizer.eos_token_id
    assert all(0 < len(r) <= 12 and eos not in r[:-1] for r in made)  # cut after the end of turn
    with torch.no_grad():  # left-padded batches give each prompt's own greedy reply
        alone = lm.model.generate(torch.tensor([prompts[1]]), max_new_tokens=12, do_sample=False,
                                  pad_token_id=eos, eos_token_id=eos)[0, len(prompts[1]):].tolist()
    assert made[1] == alone[: len(made[1])]
    monkeypatch.setattr(replies_mod, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert cached_replies(lm, "w1", prompts, ReplySettings(12, 0.0, 3, 0)) == made  # batch size: same greedy key
    assert [p.name for p in (tmp_path / "replies").iterdir()] and len(list((tmp_path / "replies").iterdir())) == 1
    with pytest.raises(pytest.fail.Exception, match="generated again"):
        cached_replies(lm, "w2", prompts, settings)  # other target weights: a new key


def test_on_policy_sets_count_the_targets_reply_and_need_replies(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "prompts.jsonl").write_text("\n".join(
        f'{{"conversations": [{{"from": "human", "value": "what is {w} plus two"}}]}}' for w in
        ("two", "four", "the cat", "a dog", "birds", "the park")))
    base = ["kind=\"llm\"", f"data.dir=\"{tmp_path}\"", "llm.train_files=[\"prompts.jsonl\"]", "llm.eval_files=[]",
            "llm.val_fraction=0.3"]
    with pytest.raises(SpecctlError, match='no example with a reply token.*needs llm.replies = "target"'):
        load_sets(load_profile("", base), lm, "w")
    profile = load_profile("", [*base, "llm.replies=\"target\"", "llm.reply_tokens=10", "llm.max_len=90"])
    sets = load_sets(profile, lm, "w")
    assert len(sets.train) == 4 and len(sets.held_out["val"]) == 2
    for seq in sets.train:
        first = seq.counted.index(True)
        assert not any(seq.counted[:first]) and all(seq.counted[first:]) and len(seq) - first <= 10
        assert lm.tokenizer.decode(seq.ids[:first]).endswith("<|im_start|>assistant\n")
    assert with_reply([1, 2], [3, 4, 5], 4).ids == [1, 2, 3, 4]
