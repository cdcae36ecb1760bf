"""Self-speculation by layer skipping: the draft is the target without some blocks; greedy output equals vanilla
with and without the shared KV cache, and the greedy search finds blocks that can go."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from specctl.backends import load_profile
from specctl.core.errors import SpecctlError
from specctl.llm.chat import text_tokens
from specctl.llm.draft import build_skip_draft
from specctl.llm.lm import LM, find_parts
from specctl.llm.skip import search_skip, skip_layers
from specctl.llm.speculative import Decoding, Sampling
from specctl.llm.static import StaticLM, static_pair
from tests.llm.tiny import TEXTS, chat_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def target(layers: int = 6, identity: tuple[int, ...] = ()) -> LM:
    """A tiny random chat Llama; blocks in `identity` add nothing to the residual stream (zero output weights)."""
    tokenizer = chat_tokenizer()
    model = tiny_llama(tokenizer, layers=layers).requires_grad_(False)
    for i in identity:
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()
    return LM(model, tokenizer, "memory", find_parts(model))


@pytest.fixture(scope="module")
def lm():
    return target()


def test_a_skip_draft_is_the_target_without_those_blocks(lm):
    draft = build_skip_draft(lm, [3, 1])
    assert draft.skip == (1, 3) and draft.kind == "layer_skip" and not draft.trainable()
    assert list(draft.model.model.layers) == [lm.parts.layers[i] for i in (0, 2, 4, 5)]
    assert draft.model.lm_head is lm.parts.head and draft.model.model.norm is lm.parts.norm
    ids = torch.tensor(lm.tokenizer(TEXTS[2])["input_ids"][:10])
    with torch.no_grad():
        expected = draft.model(ids[None], use_cache=False).logits[0]
    _, shared = static_pair(lm.model, draft.model, 16, share_cache=True)
    _, own = static_pair(lm.model, draft.model, 16)
    assert torch.allclose(own(ids, 0), expected, atol=1e-5)
    assert shared.cache.layers == (0, 2, 4, 5) and torch.allclose(shared(ids, 0), expected, atol=1e-5)
    with pytest.raises(SpecctlError, match="keeps the last block"):
        build_skip_draft(lm, [5])


@pytest.mark.parametrize("share", [False, True])
def test_greedy_layer_skip_equals_vanilla(lm, share):
    draft = build_skip_draft(lm, [2, 3])
    decoding = Decoding(*static_pair(lm.model, draft.model, 48, share), 3, Sampling(0.0))
    fresh = Decoding(StaticLM(lm.model, 48), sampling=Sampling(0.0))
    rejected = 0
    for length in (9, 4, 1):  # caches reused across prompts, as spec-test does
        prompt = lm.tokenizer(TEXTS[length])["input_ids"][:length]
        fast = decoding.speculative(prompt, 24)
        assert fast.tokens == decoding.vanilla(prompt, 24).tokens == fresh.vanilla(prompt, 24).tokens
        rejected += sum(a < g for g, a in fast.rounds)
    assert rejected > 0  # the rejection path was taken


def test_search_leaves_out_the_blocks_that_do_nothing():
    lm = target(identity=(2, 3))
    seqs = [text_tokens(t, lm.tokenizer, 48) for t in TEXTS[:6]]
    found = search_skip(lm, seqs, gamma=3)
    assert {2, 3} <= set(found.skip) and 0 not in found.skip and 5 not in found.skip
    assert found.predicted_speedup >= 4 / (3 * 4 / 6 + 1) - 1e-9  # both gone at full agreement
    assert found.path[0]["predicted_speedup"] == pytest.approx(1.0) and len(found.path) == 3  # up to half the blocks
    assert found.predicted_speedup == max(step["predicted_speedup"] for step in found.path)


def test_spec_test_searches_on_the_targets_replies_to_training_prompts(tmp_path):
    (tmp_path / "chat.jsonl").write_text("\n".join(f'{{"question": "{t}", "answer": "four"}}' for t in TEXTS[:8]))
    profile = load_profile("", ["kind=\"llm\"", f"data.dir=\"{tmp_path}\"", "llm.train_files=[\"chat.jsonl\"]",
                                "llm.draft_kind=\"layer_skip\"", "llm.skip_layers=\"search\"", "llm.search_prompts=3",
                                "llm.spec.max_new_tokens=12", "llm.spec.gamma=3"])
    assert {2, 3} <= set(skip_layers(profile, target(identity=(2, 3))))
    with pytest.raises(SpecctlError, match="predicts no speedup on the search prompts"):
        skip_layers(profile, target(layers=3))
