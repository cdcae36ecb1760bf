"""Head tuning from the teacher cache: it reproduces the live teacher's loss for every draft option, the adapter
starts as the untuned exit, drafts are stored in the target's dtype, and tuning raises agreement."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from specctl.backends import load_profile
from specctl.llm.chat import batches, chat_tokens, text_tokens
from specctl.llm.draft import build_draft, draft_logits, load_draft, target_pass
from specctl.llm.finetune import TextSets, batch_loss, evaluate_drafts, tune
from specctl.llm.kl import kl_per_token, objective, select
from specctl.llm.lm import LM, find_parts
from specctl.llm.static import static_pair
from specctl.llm.teacher import Student, bucketed_kl, record
from tests.llm.tiny import TEXTS, chat_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lm():
    tokenizer = chat_tokenizer()
    model = tiny_llama(tokenizer, layers=3).requires_grad_(False)
    return LM(model, tokenizer, "memory", find_parts(model), torch.float32)


def chats(lm: LM, n: int = 12):
    return [chat_tokens([{"role": "user", "content": TEXTS[i]}, {"role": "assistant", "content": TEXTS[i + 1]}],
                        lm.tokenizer, 96) for i in range(n)]


def test_bucketed_kl_is_the_full_kl_with_the_whole_vocabulary_and_below_it_otherwise():
    torch.manual_seed(0)
    teacher, student = torch.randn(20, 50) * 3, torch.randn(20, 50) * 3
    full = kl_per_token(teacher, student, 2.0)
    for k, exact in ((50, True), (5, False)):
        top = teacher.topk(k, dim=-1)
        approx = bucketed_kl(student, top.indices, top.values, torch.logsumexp(teacher / 2.0, -1), 2.0)
        assert torch.allclose(approx, full, atol=1e-5) if exact else bool((approx <= full + 1e-6).all())
        assert bool((approx >= -1e-6).all())


@pytest.mark.parametrize("head,tune_block", [("copy", False), ("adapter", False), ("copy", True)])
def test_the_cached_loss_equals_the_live_teachers(lm, head, tune_block):
    seqs = chats(lm)
    draft = build_draft(lm, 1, tune_block, head)
    teacher = record(lm, seqs, [1], [2.0], 0, len(seqs), keep_inputs=tune_block)
    assert teacher.rows == sum(s.n_counted for s in seqs)  # one row per counted reply token
    if draft.adapter is not None:
        draft.adapter.fit_scale(teacher.states[1])
    with torch.no_grad():  # move every trained part away from its start
        for p in draft.trainable().values():
            p.add_(torch.randn_like(p) * 0.05)
    ids, attention, counted = next(batches(seqs, len(seqs), lm.tokenizer.pad_token_id, CPU))
    live_teacher, states = target_pass(lm, [1], ids, attention)
    t, labels = select(live_teacher, ids, counted)
    d, _ = select(draft_logits(draft, states, ids, attention), ids, counted)
    live = objective(kl_per_token(t, d, 2.0), d, labels, 2.0, 1.0, 0.5)
    profile = load_profile("", ["kind=\"llm\"", "llm.ce_weight=0.5", "llm.token_batch=100000"])
    batch = teacher.chunks[0] if tune_block else torch.arange(teacher.rows)
    cached = batch_loss(Student(draft), teacher, batch, 2.0, profile, CPU)
    assert cached.loss.item() == pytest.approx(live.item(), rel=1e-4)
    assert torch.equal(teacher.labels, labels) and torch.equal(teacher.top_ids[:, 0], t.argmax(-1))


def test_the_adapter_starts_as_the_untuned_exit(lm):
    copy, adapter = build_draft(lm, 1), build_draft(lm, 1, head="adapter")
    adapter.adapter.fit_scale(torch.randn(50, 32) * 100)
    assert set(adapter.trainable()) == {"model.norm.adapter.proj.weight", "model.norm.adapter.proj.bias"}
    ids = torch.tensor([lm.tokenizer(TEXTS[3])["input_ids"][:10]])
    with torch.no_grad():
        assert torch.equal(adapter.model(ids).logits, copy.model(ids).logits)
    _, static = static_pair(lm.model, adapter.model, 16, share_cache=True)
    assert torch.allclose(static(ids[0], 0), copy.model(ids).logits[0], atol=1e-5)


def test_drafts_are_stored_in_the_targets_dtype_and_reload(lm, tmp_path):
    half = LM(lm.model, lm.tokenizer, "memory", lm.parts, torch.bfloat16)
    seqs = chats(lm)
    profile = load_profile("", ["kind=\"llm\"", "train.epochs=1", "train.max_steps_per_epoch=2", "train.lr=1e-2"])
    caches = [record(half, s, [1], [1.0], 8, 4) for s in (seqs[:8], seqs[8:])]
    draft = build_draft(half, 1, head="adapter")
    tune(draft, *caches, 1.0, profile, CPU, tmp_path / "ckpt")
    saved = draft.weights()
    assert {t.dtype for t in saved.values()} == {torch.bfloat16} and "model.norm.adapter.scale" in saved
    again = load_draft(tmp_path / "ckpt" / "best", half)
    assert again.head_kind == "adapter" and again.adapter.proj.weight.dtype == torch.float32
    assert torch.equal(again.adapter.scale, draft.adapter.scale.bfloat16().float())


@pytest.mark.parametrize("head", ["copy", "adapter"])
def test_tuning_from_the_cache_raises_agreement(lm, tmp_path, head):
    seqs = [text_tokens(t, lm.tokenizer, 64) for t in TEXTS[:40]]
    sets = TextSets(seqs[:32], {"val": seqs[32:]})
    profile = load_profile("", ["kind=\"llm\"", "train.epochs=3", "train.lr=2e-2", "llm.token_batch=64",
                                "train.schedule=\"constant\""])
    caches = [record(lm, s, [0], [1.0], 32, 8) for s in (sets.train, sets.held_out["val"])]
    draft = build_draft(lm, 0, head=head)
    result = tune(draft, *caches, 1.0, profile, CPU, tmp_path / head)
    before, after = evaluate_drafts([build_draft(lm, 0), draft], [1.0, 1.0], sets.train, profile, CPU)
    assert after["kl"] < before["kl"] and after["agreement"] > before["agreement"]
    assert result.history[-1]["val_agreement"] >= result.history[0]["val_agreement"] - 0.05
