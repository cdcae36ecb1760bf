"""The [llm] table of a profile and the profile of kind "llm": target LM, early-exit draft, KL tuning and
speculative sampling.

Research-plan names: exit layer `ℓ` -> llm.exit_layer / llm.exit_layers, `--ft_head` -> llm.draft_head = "copy",
`--ft_last_transformer` -> llm.tune_block, KL temperature `T` -> llm.kl_temperature (llm.kl_temperatures tunes one
draft per T), `CE + KL` -> llm.ce_weight, `γ` -> llm.spec.gamma, `--checkpoint_glob` -> llm.eval_only; LayerSkip's
early-exit loss in the target's training -> llm.early_exit_weight, its layer dropout -> llm.layer_dropout.
Beyond the plan: an adapter before the frozen final norm and head (llm.draft_head = "adapter"), self-speculation by
layer skipping (llm.draft_kind = "layer_skip", llm.skip_layers), on-policy replies (llm.replies = "target").
Optimisation (lr, epochs, patience, ...) lives in the shared [train] table.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from specctl.core.schema import DataLocation, Profile, Strict


class ArchConfig(Strict):
    """[llm.arch]: the LlamaConfig of a target trained from scratch by `pretrain` (kind = "llm")."""

    vocab_size: int = Field(512, ge=32)  # size of a BPE tokenizer trained here; a loaded tokenizer decides its own
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    max_position_embeddings: int = Field(1024, gt=0)
    rope_theta: float = Field(10000.0, gt=0.0)
    rms_norm_eps: float = Field(1e-6, gt=0.0)
    tie_word_embeddings: bool = True
    initializer_range: float = Field(0.02, gt=0.0)


class LLMSpecConfig(Strict):
    """[llm.spec]: speculative sampling with an early-exit draft (spec-test for kind = "llm")."""

    draft: str | None = None  # finetune-head output (a draft folder, its parent, or a run); None = untuned head copy
    gamma: int = Field(4, ge=1)  # draft tokens per round
    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_new_tokens: int = Field(64, ge=1)
    prompts: str = "spec_bench_question.jsonl"
    n_prompts: int = Field(16, ge=1)
    max_prompt_tokens: int = Field(256, ge=1)  # a longer chat prompt loses the end of its user text (chat.py)
    stop_at_eos: bool = True
    share_cache: bool = False  # self-speculation: the draft reads/writes the target's KV cache for layers <= l
    cuda_graphs: bool = True  # replay decode steps and verifies as CUDA graphs (ignored on CPU)
    warmup: int = Field(1, ge=0)  # untimed prompts before timing
    step_repeats: int = Field(50, ge=1)  # decode steps timed for c_hat
    bootstrap: int = Field(1000, ge=0)  # resamples for the confidence intervals across prompts
    ci: float = Field(0.95, gt=0.0, lt=1.0)


class LLMConfig(Strict):
    # a Hugging Face folder, a hub id owner/name, a .gguf file (converted once, cached by its sha256) or
    # package:<module>/<file> inside an installed Python package (specctl/llm/target.py)
    target: str | None = None
    offline: bool = False  # a hub id is read from the local Hugging Face cache only (also: HF_HUB_OFFLINE=1)
    tokenizer: str | None = None  # a tokenizer folder; pretrain also builds "bpe" (default) or "gpt2" (data dir)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute dtype (autocast while training)
    exit_layer: int = 0  # 0-based; the draft keeps blocks 0..exit_layer
    exit_layers: list[int] = []  # finetune-head trains one draft per layer; empty = [exit_layer]
    draft_kind: Literal["early_exit", "layer_skip"] = "early_exit"  # spec-test: what drafts for the target
    # layer_skip: the target's blocks the draft leaves out (its own norm and head, nothing trained), or "search":
    # chosen greedily for the best predicted speedup on llm.search_prompts prompts of llm.train_files
    skip_layers: list[int] | Literal["search"] = []
    search_prompts: int = Field(4, ge=1)
    draft_head: Literal["copy", "adapter"] = "copy"  # tune a copy of the LM head, or a zero-initialised affine
    # map h + W h + b before the frozen final norm and head
    tune_block: bool = False  # option B: also tune (an untied copy of) block exit_layer
    kl_temperature: float = Field(1.0, gt=0.0)
    kl_temperatures: list[float] = []  # finetune-head tunes one draft per temperature; empty = [kl_temperature]
    teacher_top_k: int = Field(64, ge=0)  # target logits kept per token in the teacher cache; 0 = all of them
    token_batch: int = Field(512, ge=1)  # tokens per step when tuning a head or adapter (option B: sequences,
    # train.batch_size)
    # where the replies of chat examples come from: the files ("data"), or the target itself ("target": its
    # greedy / sampled answer to each first user turn, generated once and cached with `datasets`)
    replies: Literal["data", "target"] = "data"
    reply_tokens: int = Field(128, ge=1)  # the longest generated reply (prompts get max_len - reply_tokens)
    reply_temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    reply_batch: int = Field(16, ge=1)  # prompts generated together (left-padded)
    kl_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(0.0, ge=0.0)  # loss = ce_weight * CE + kl_weight * T^2 KL
    train_files: list[str] = ["sharegpt_v3_filtered_1000_prompts.json"]
    eval_files: list[str] = ["tinyshakespeare.txt"]  # out-of-domain held-out sets
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_len: int = Field(256, ge=4)  # tokens per training example / packed block
    max_examples: int | None = Field(None, ge=2)  # cap on examples read per train file
    max_eval_examples: int = Field(200, ge=1)  # per held-out set
    top_k_accuracy: int = Field(5, ge=1)
    # pretrain (LayerSkip's early-exit loss): loss = CE + early_exit_weight * mean CE of the exits at
    # early_exit_layers (through the shared final norm and head; empty = every layer but the last)
    early_exit_weight: float = Field(0.0, ge=0.0)
    early_exit_layers: list[int] = []
    layer_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # pretrain: LayerSkip's dropout rate of the last block
    eval_only: str | None = None  # glob of draft checkpoints to evaluate without training
    eval_baseline: bool = True  # also evaluate the untuned head copy at each exit layer
    arch: ArchConfig = ArchConfig()
    spec: LLMSpecConfig = LLMSpecConfig()

    def layers(self) -> list[int]:
        return self.exit_layers or [self.exit_layer]

    def temperatures(self) -> list[float]:
        return self.kl_temperatures or [self.kl_temperature]


class LLMProfile(Profile):
    kind: Literal["llm"]
    data: DataLocation = DataLocation()
    llm: LLMConfig = LLMConfig()

    def ignored_keys(self) -> dict[str, str]:
        """Greedy decoding (temperature 0) samples nothing: top-p and top-k cannot change its tokens."""
        if self.llm.spec.temperature == 0:
            why = "llm.spec.temperature = 0 decodes greedily and samples nothing"
            return {"llm.spec.top_p": why, "llm.spec.top_k": why}
        return {}
