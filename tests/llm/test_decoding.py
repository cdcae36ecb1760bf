"""Early-exit drafts and speculative sampling on tiny random Llama targets (CPU, fp32)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch import nn

from specctl.backends import load_profile
from specctl.core.errors import SpecctlError
from specctl.llm.chat import text_tokens
from specctl.llm.draft import build_draft, load_draft
from specctl.llm.finetune import TextSets, checksum, evaluate_drafts, tune
from specctl.llm.lm import LM, find_parts, load_lm
from specctl.llm.pretrain import (
    block_outputs,
    dropout_rates,
    exit_blocks,
    layer_dropout,
    llama_config,
    lm_loss,
    next_token_ce,
    train_bpe,
)
from specctl.llm.profile import ArchConfig
from specctl.llm.speculative import Decoding, Sampling, distribution, verify, verify_greedy
from specctl.llm.static import DynamicLM, StaticLM, static_pair
from specctl.llm.teacher import record

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "the", "dog", "ran", "to", "the", "park", "where",
         "birds", "sing", "all", "day", "long"]
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(60)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU models run far faster on one thread


def make_target(folder, vocab: int, layers: int = 3, seed: int = 0):
    """A random tiny Llama with a BPE tokenizer, saved as a Hugging Face folder and loaded as a target."""
    from transformers import LlamaForCausalLM

    tokenizer = train_bpe(TEXTS, vocab)
    torch.manual_seed(seed)
    arch = ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      initializer_range=0.2)
    LlamaForCausalLM(llama_config(arch, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_lm(str(folder), torch.device("cpu"))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("target"), 300)


def tiny_model(vocab: int, layers: int = 3, seed: int = 0) -> LM:
    """A random tiny Llama without tokenizer (for sampling statistics over a small vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return LM(model, None, "memory", find_parts(model))


def sets_for(lm: LM, n: int = 24) -> TextSets:
    seqs = [text_tokens(t, lm.tokenizer, 64) for t in TEXTS[:n]]
    return TextSets(train=seqs[: n // 2], held_out={"val": seqs[n // 2:]})


def train_draft(draft, sets: TextSets, profile, ckpt):
    """Tune one draft from a teacher cache of `sets`, as finetune-head does."""
    llm, t = profile.llm, profile.llm.kl_temperature
    caches = [record(draft.target, seqs, [draft.layer], [t], llm.teacher_top_k, profile.train.batch_size,
                     draft.tune_block) for seqs in (sets.train, sets.held_out["val"])]
    return tune(draft, *caches, t, profile, torch.device("cpu"), ckpt)


def test_exit_layer_out_of_range(lm):
    with pytest.raises(SpecctlError, match=r"exit layer 3 out of range.*3 decoder layers.*0\.\.2"):
        build_draft(lm, 3)


def test_model_without_decoder_layers_says_what_it_found():
    class Toy(nn.Module):
        base_model_prefix = "model"

        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4))

    with pytest.raises(SpecctlError, match=r"no recognisable decoder-layer list.*found 0 \(Embedding\), 1 \(Linear\)"):
        find_parts(Toy())


def test_draft_shares_blocks_and_owns_an_untied_head(lm):
    draft = build_draft(lm, 1)
    layers = draft.model.model.layers
    assert len(layers) == 2 and layers[1] is lm.parts.layers[1]
    assert draft.model.lm_head.weight.data_ptr() != lm.parts.head.weight.data_ptr()
    assert set(draft.trainable()) == {"lm_head.weight"}
    tuned = build_draft(lm, 1, tune_block=True)
    assert tuned.model.model.layers[1] is not lm.parts.layers[1]
    assert all(p.requires_grad for p in tuned.model.model.layers[1].parameters())
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_early_exit_loss_adds_the_drafts_ce_at_each_exit(lm):
    ids = torch.tensor([lm.tokenizer(TEXTS[0] + " " + TEXTS[1])["input_ids"]])
    plain = lm.model(input_ids=ids, labels=ids).loss
    assert exit_blocks(lm.model, [0, 1], 0.0) == []
    assert torch.equal(lm_loss(lm.model, ids, [], 0.5), plain)
    exits = [next_token_ce(build_draft(lm, layer).model(input_ids=ids).logits, ids) for layer in (0, 1)]
    blocks = exit_blocks(lm.model, [1, 0], 0.5)  # the untuned early-exit draft is what the extra loss trains
    assert blocks == [lm.parts.layers[0], lm.parts.layers[1]]
    assert lm_loss(lm.model, ids, blocks, 0.5).item() == pytest.approx((plain + 0.5 * sum(exits) / 2).item(), 1e-5)
    assert len(exit_blocks(lm.model, [], 1.0)) == lm.n_layers - 1  # default: every layer but the last
    with pytest.raises(SpecctlError, match="llm.early_exit_layers: exit layer 9 out of range"):
        exit_blocks(lm.model, [9], 1.0)


def test_layer_dropout_skips_later_blocks_per_sequence_in_training_only(lm):
    assert dropout_rates(3, 0.2) == pytest.approx([0.0, 0.2 * (2**0.5 - 1), 0.2])
    ids = torch.tensor([lm.tokenizer(TEXTS[0])["input_ids"]] * 64)
    blocks = lm.parts.layers
    with torch.no_grad(), block_outputs(blocks) as plain:
        lm.model(input_ids=ids)
    torch.manual_seed(0)
    lm.model.train()
    try:
        with torch.no_grad(), layer_dropout(lm.model, 0.5), block_outputs(blocks) as dropped:
            lm.model(input_ids=ids)
    finally:
        lm.model.eval()
    assert torch.equal(dropped[0], plain[0])  # block 0 is never skipped
    skipped = (dropped[-1] == dropped[-2]).flatten(1).all(-1)  # the last block passed its input through
    assert 10 < int(skipped.sum()) < 54  # about half of the 64 sequences
    with torch.no_grad(), layer_dropout(lm.model, 0.5), block_outputs(blocks) as evaluated:
        lm.model(input_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(evaluated, plain))  # no effect outside training


@pytest.mark.parametrize("share", [False, True])
def test_last_layer_with_target_head_has_zero_kl_and_full_acceptance(lm, share):
    draft = build_draft(lm, lm.n_layers - 1)
    profile = load_profile("", ["kind=\"llm\"", "llm.kl_temperature=2.0"])
    metrics = evaluate_drafts([draft], [2.0], sets_for(lm).held_out["val"], profile, torch.device("cpu"))[0]
    assert metrics["kl"] == pytest.approx(0, abs=1e-6) and metrics["kl_t1"] == pytest.approx(0, abs=1e-6)
    assert metrics["top1"] == metrics["target_top1"] and metrics["ce"] == pytest.approx(metrics["target_ce"])
    assert metrics["agreement"] == 1.0
    prompt = lm.tokenizer(TEXTS[0])["input_ids"][:6]
    torch.manual_seed(0)
    decoding = Decoding(*static_pair(lm.model, draft.model, 40, share), gamma=4, sampling=Sampling(1.0))
    out = decoding.speculative(prompt, 20)  # a draft cache left behind would cost acceptance
    assert sum(a for _, a in out.rounds) == sum(g for g, _ in out.rounds)
    assert min(out.overlaps) > 1 - 1e-4


def test_finetuning_never_changes_the_target_and_reloads(lm, tmp_path):
    profile = load_profile("", ["kind=\"llm\"", "train.epochs=2", "train.batch_size=4", "train.lr=1e-2",
                                "train.max_steps_per_epoch=3", "llm.ce_weight=0.5", "llm.kl_temperature=2.0"])
    before = checksum(lm.model)
    draft = build_draft(lm, 1, tune_block=True)
    head_before = draft.model.lm_head.weight.clone()
    result = train_draft(draft, sets_for(lm), profile, tmp_path / "ckpt")
    assert checksum(lm.model) == before
    assert not torch.equal(draft.model.lm_head.weight, head_before)
    assert result.epochs_done == 2 and (tmp_path / "ckpt" / "best" / "model.safetensors").is_file()
    again = load_draft(tmp_path / "ckpt" / "best", lm)
    assert again.layer == 1 and again.tune_block
    assert torch.equal(again.model.lm_head.weight, draft.model.lm_head.weight)


def test_draft_for_another_vocabulary_is_refused(lm, tmp_path):
    draft = build_draft(lm, 0)
    train_draft(draft, sets_for(lm), load_profile("", ["kind=\"llm\"", "train.epochs=1",
                                                       "train.max_steps_per_epoch=1"]), tmp_path / "ckpt")
    other = make_target(tmp_path / "other", 280)
    with pytest.raises(SpecctlError, match="tokenizer/vocab mismatch between target and draft"):
        load_draft(tmp_path / "ckpt" / "best", other)


@pytest.mark.parametrize("layer,share", [(0, False), (1, False), (1, True)])
def test_greedy_speculative_equals_vanilla_greedy(lm, layer, share):
    decoding = Decoding(*static_pair(lm.model, build_draft(lm, layer).model, 40, share), 3, Sampling(0.0))
    fresh = Decoding(StaticLM(lm.model, 40), sampling=Sampling(0.0))
    seen, rejected = set(), 0
    for length in (9, 5, 1):  # caches reused across prompts, as spec-test does: stale entries must stay invisible
        prompt = lm.tokenizer(TEXTS[length])["input_ids"][:length]
        base = decoding.vanilla(prompt, 24)
        fast = decoding.speculative(prompt, 24)
        assert fast.tokens == base.tokens == fresh.vanilla(prompt, 24).tokens
        seen |= set(base.tokens)
        rejected += sum(a < g for g, a in fast.rounds)
    assert len(seen) > 3 and rejected > 0  # non-degenerate outputs, and the rejection path was taken


def test_decoding_stops_at_eos_and_speculative_still_equals_vanilla(lm):
    decoding = Decoding(*static_pair(lm.model, build_draft(lm, 1).model, 40, True), 3, Sampling(0.0))
    prompt = lm.tokenizer(TEXTS[3])["input_ids"][:5]
    full = decoding.vanilla(prompt, 24).tokens
    for cut in (2, 9, 14):  # EOS in the first block, and in later ones (vanilla reads a block behind)
        stop = full.index(full[cut])
        eos = frozenset({full[cut]})
        assert decoding.vanilla(prompt, 24, eos).tokens == full[:stop + 1]
        assert decoding.speculative(prompt, 24, eos).tokens == full[:stop + 1]


def test_top_k_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert (distribution(logits, Sampling(1.0, top_k=2))[0, 2:] == 0).all()
    probs = logits.softmax(-1)[0]
    kept = distribution(logits, Sampling(1.0, top_p=float(probs[0]) + 1e-3))
    assert (kept[0, 2:] == 0).all() and kept[0, 1] > 0


def pooled_chisquare(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value, pooling cells with expected count < 5 into one."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs, exp = counts[~small].double(), expected[~small]
    if small.any():
        obs, exp = torch.cat([obs, counts[small].double().sum()[None]]), torch.cat([exp, expected[small].sum()[None]])
    return chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue


def test_verify_output_is_distributed_as_the_target():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 6) * 2, -1)
    q = torch.softmax(torch.randn(2, 6) * 2, -1)
    counts = torch.zeros(6)
    for _ in range(4000):
        drafts = torch.multinomial(q, 1)[:, 0]
        n, token = verify(p, q, drafts, Sampling(1.0))
        counts[drafts[0] if n > 0 else token[0]] += 1  # the first emitted token
    assert pooled_chisquare(counts, p[0]) > 1e-3
    assert pooled_chisquare(counts, q[0]) < 1e-6  # the test can tell p from q


def test_greedy_verification_is_verify_on_one_hot_distributions():
    torch.manual_seed(0)
    for _ in range(20):
        best, drafts = torch.randint(0, 3, (4,)), torch.randint(0, 3, (3,))
        p, q = F.one_hot(best, 5).float(), F.one_hot(drafts, 5).float()
        n, token, overlap = verify_greedy(best, drafts)
        assert (n, token) == verify(p, q, drafts, Sampling(1.0))
        assert torch.equal(overlap, torch.minimum(p[:3], q).sum(-1))


def test_speculative_sampling_matches_the_target_distribution():
    lm = tiny_model(vocab=12)
    draft = build_draft(lm, 0)
    prompt = [1, 2, 3]
    torch.manual_seed(0)
    first, second = torch.zeros(12), torch.zeros(12)
    decoding = Decoding(*static_pair(lm.model, draft.model, 11), 2, Sampling(1.0))
    for _ in range(600):
        tokens = decoding.speculative(prompt, 3).tokens
        first[tokens[0]] += 1
        second[tokens[1]] += 1
    with torch.no_grad():
        p1 = lm.model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        q1 = draft.model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        rows = torch.tensor([[*prompt, t] for t in range(12)])
        p2 = (p1[:, None] * lm.model(rows).logits[:, -1].softmax(-1)).sum(0)  # sum_t1 p(t1) p(t2 | t1)
    assert pooled_chisquare(first, p1) > 1e-3 and pooled_chisquare(second, p2) > 1e-3
    assert pooled_chisquare(first, q1) < 1e-6


def random_decoder(kind: str, seed: int = 0) -> nn.Module:
    """A random tiny decoder with grouped-query attention (2 kv heads for 4 query heads); "llama3" with Llama 3's
    RoPE scaling; the Mistral and Qwen2 ones with a sliding window shorter than the sequences below."""
    import transformers

    torch.manual_seed(seed)
    arch = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8}  # Llama 3's scaling, over positions the test reaches
    extra = {"llama": {}, "llama3": {"rope_scaling": llama3}, "mistral": {"sliding_window": 5},
             "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}}[kind]
    name = {"llama": "Llama", "llama3": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    config = getattr(transformers, f"{name}Config")(**arch, **extra)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval().requires_grad_(False)


def feed(lm: StaticLM, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of ids fed to the static path in chunks ending at `cuts` (positions continue across chunks)."""
    bounds = [0, *cuts, len(ids)]
    return torch.cat([lm(ids[a:b], a) for a, b in itertools.pairwise(bounds)])


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2"])
def test_static_path_equals_the_hugging_face_forward(kind):
    model = random_decoder(kind)
    if kind == "llama3":  # the scaling changes the frequencies (else this would test plain RoPE again)
        plain = random_decoder("llama").model.rotary_emb.inv_freq
        assert not torch.allclose(model.model.rotary_emb.inv_freq, plain)
    ids = torch.randint(0, 40, (14,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    static = StaticLM(model, 20)
    assert torch.allclose(feed(static, ids, [6, 7, 8, 11]), expected, atol=1e-5, rtol=0)  # prefill, steps, verify


def test_rollback_then_refeeding_equals_a_fresh_run():
    model = random_decoder("llama")
    ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(2))
    other = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(3))
    static = StaticLM(model, 16)
    static(ids[:6], 0)
    static(other[6:10], 6)  # a rejected continuation: rolling back to 6 leaves entries 6..9 stale
    resumed = torch.cat([static(ids[6:7], 6), static(ids[7:12], 7)])
    fresh = feed(StaticLM(model, 16), ids, [6, 7])[6:]
    assert torch.allclose(resumed, fresh, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tune_block", [False, True])
def test_draft_static_path_equals_its_forward(lm, tune_block):
    draft = build_draft(lm, 1, tune_block)
    if tune_block:
        with torch.no_grad():  # make the untied block differ from the target's
            draft.model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    ids = torch.tensor(lm.tokenizer(TEXTS[4])["input_ids"][:10])
    with torch.no_grad():
        expected = draft.model(ids[None]).logits[0]
    _, static = static_pair(lm.model, draft.model, 16)
    assert torch.allclose(feed(static, ids, [4, 5, 8]), expected, atol=1e-5, rtol=0)


def test_shared_cache_needs_the_targets_blocks_and_other_models_are_refused(lm):
    with pytest.raises(SpecctlError, match="share_cache needs a draft made of the target's own blocks"):
        static_pair(lm.model, build_draft(lm, 1, tune_block=True).model, 16, share_cache=True)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(SpecctlError, match="supports llama, mistral, qwen2 models, not model_type 'gpt2'"):
        StaticLM(gpt2, 16)
    with pytest.raises(SpecctlError, match="supports llama"):  # share_cache needs the static cache
        static_pair(gpt2, gpt2, 16, share_cache=True)


def test_models_outside_the_static_path_decode_on_the_dynamic_fallback():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=4, initializer_range=0.3)).eval()
    lm = LM(gpt2, None, "memory", find_parts(gpt2))
    with pytest.warns(UserWarning, match="dynamic cache"):
        target, draft = static_pair(gpt2, build_draft(lm, 1).model, 40)
    assert isinstance(target, DynamicLM) and isinstance(draft, DynamicLM)
    decoding = Decoding(target, draft, 3, Sampling(0.0))
    prompt, rejected = [3, 14, 15, 9, 2, 6], 0
    for _ in range(2):  # caches reused across prompts, as spec-test does
        base = decoding.vanilla(prompt, 20)
        fast = decoding.speculative(prompt, 20)
        assert fast.tokens == base.tokens
        rejected += sum(a < g for g, a in fast.rounds)
        prompt = prompt[:3]
    assert rejected > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("share", [False, True])
def test_cuda_graphs_reproduce_eager_decoding(share):
    model = random_decoder("llama").cuda()
    draft = build_draft(LM(model, None, "memory", find_parts(model)), 1)
    eager, graphed = (Decoding(*static_pair(model, draft.model, 40, share), 3, Sampling(0.0), graphs=g)
                      for g in (False, True))
    assert graphed.graphed and not eager.graphed
    for length in (5, 1):
        prompt = torch.randint(0, 40, (length,), generator=torch.Generator().manual_seed(4)).tolist()
        base, fast = eager.vanilla(prompt, 24), graphed.speculative(prompt, 24)
        assert fast.tokens == base.tokens == graphed.vanilla(prompt, 24).tokens == eager.speculative(prompt, 24).tokens
        assert fast.rounds == eager.speculative(prompt, 24).rounds
        eos = frozenset({base.tokens[10]})
        stop = base.tokens.index(base.tokens[10])
        assert graphed.speculative(prompt, 24, eos).tokens == graphed.vanilla(prompt, 24, eos).tokens == \
            base.tokens[:stop + 1]
    sampled = Decoding(*static_pair(model, draft.model, 40, share), 3, Sampling(1.0), graphs=True)
    torch.manual_seed(0)
    first = sampled.speculative(prompt, 24).tokens
    torch.manual_seed(0)
    assert sampled.speculative(prompt, 24).tokens == first  # seeded replays are reproducible
    assert set(sampled.timings(prompt, 3)) == {"target_step", "draft_step", "verify"}
