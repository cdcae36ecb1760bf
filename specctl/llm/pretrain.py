"""`pretrain` for kind = "llm": a small Llama-architecture LM trained from scratch on local text (the offline
stand-in for a hub LLM). Output: a normal Hugging Face folder (save_pretrained, safetensors) with its tokenizer.

Tokenizer (llm.tokenizer): "bpe" (default) trains a byte-level BPE of llm.arch.vocab_size tokens with `tokenizers`;
"gpt2" builds GPT-2's from gpt2_encoder.json + gpt2_vocab.bpe in the data directory; anything else is a path to
a tokenizer folder. Built tokenizers get the role tags as special tokens and SIMPLE_TEMPLATE as chat template.
Documents are rendered (chat template), joined with EOS and cut into blocks of llm.max_len tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from specctl.core import distributed
from specctl.core.checkpoint import load_weights
from specctl.core.data_dir import data_dir
from specctl.core.errors import SpecctlError
from specctl.core.rundir import RunDir
from specctl.core.train import Task, fit
from specctl.llm.lm import (
    autocast,
    block_outputs,
    check_exit_layer,
    find_parts,
    load_lm,
    load_tokenizer,
    quiet_transformers,
)
from specctl.llm.profile import ArchConfig, LLMProfile
from specctl.llm.text import (
    ROLE_TAGS,
    SIMPLE_TEMPLATE,
    Example,
    contents,
    encode,
    read_files,
    resolve_text_file,
    split,
)

EOS = "<|endoftext|>"


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    hf.chat_template = SIMPLE_TEMPLATE
    return hf


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` (every byte is in the alphabet, so nothing is ever unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, *ROLE_TAGS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tok)


def gpt2_tokenizer(folder: Path | None):
    """GPT-2's byte-level BPE (50,257 tokens) from the data directory, plus the role tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = resolve_text_file("gpt2_encoder.json", folder)
    merges = resolve_text_file("gpt2_vocab.bpe", folder)
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, *ROLE_TAGS])
    return wrap_tokenizer(tok)


def build_tokenizer(profile: LLMProfile, train: list[Example]):
    choice = profile.llm.tokenizer or "bpe"
    if choice == "bpe":
        return train_bpe(contents(train), profile.llm.arch.vocab_size)
    if choice == "gpt2":
        return gpt2_tokenizer(data_dir(profile.data))
    return load_tokenizer(choice)


def run_tokenizer(profile: LLMProfile, start, train: list[Example], folder: Path, resume: bool):
    """The run's tokenizer, kept in `folder`: the one there when resuming, else the starting model's or a new one.
    Under torchrun rank 0 makes it and the other processes read it from there."""
    if resume and folder.is_dir():
        return load_tokenizer(str(folder))
    tokenizer = None
    if distributed.is_main():
        tokenizer = start.tokenizer if start else build_tokenizer(profile, train)
        tokenizer.save_pretrained(folder)
    distributed.barrier()
    return load_tokenizer(str(folder)) if tokenizer is None else tokenizer


def llama_config(arch: ArchConfig, tokenizer):
    from transformers import LlamaConfig

    if arch.hidden_size % arch.num_attention_heads:
        raise SpecctlError(f"llm.arch.hidden_size {arch.hidden_size} is not a multiple of num_attention_heads "
                           f"{arch.num_attention_heads}")
    fields = arch.model_dump(exclude={"vocab_size", "rope_theta"})
    fields["num_key_value_heads"] = arch.num_key_value_heads or arch.num_attention_heads
    return LlamaConfig(**fields, vocab_size=len(tokenizer), rope_parameters={"rope_type": "default",
                       "rope_theta": arch.rope_theta}, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def pack(examples: list[Example], tokenizer, length: int) -> torch.Tensor:
    """Documents joined with EOS and cut into [N, length] blocks (the remainder is dropped)."""
    stream: list[int] = []
    for example in examples:
        stream += [*encode(example, tokenizer, 10**9), tokenizer.eos_token_id]
    n = len(stream) // length
    if n == 0:
        raise SpecctlError(f"not enough text for one block of llm.max_len = {length} tokens ({len(stream)} tokens)")
    return torch.tensor(stream[: n * length]).view(n, length)


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases (a tied LM head is the embedding; safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            out[key] = value
    return out


def mean_ce(model, blocks: torch.Tensor, batch_size: int, device: torch.device, dtype: str,
            max_batches: int | None = None) -> float:
    """Token-mean next-token cross-entropy over blocks (nats)."""
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        ids = blocks[start:start + batch_size].to(device)
        with autocast(device, dtype):
            loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - len(ids)
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def unigram_ce(train: torch.Tensor, held_out: torch.Tensor, vocab: int) -> float:
    """The baseline a LM must beat: CE of add-one-smoothed unigram frequencies from the training blocks."""
    counts = torch.bincount(train.flatten(), minlength=vocab).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[held_out[:, 1:].flatten()].mean())


def exit_blocks(model: nn.Module, layers: list[int], weight: float) -> list[nn.Module]:
    """The decoder blocks whose outputs get the early-exit loss (none when the weight is 0)."""
    blocks = find_parts(model).layers
    if weight == 0:
        return []
    for layer in layers:
        try:
            check_exit_layer(layer, len(blocks))
        except SpecctlError as e:
            raise SpecctlError(f"llm.early_exit_layers: {e}") from None
    return [blocks[i] for i in sorted(set(layers or range(len(blocks) - 1)))]


def dropout_rates(n_layers: int, top: float) -> list[float]:
    """LayerSkip's layer dropout schedule: p_l = top * (2^(l/(L-1)) - 1), 0 for the first block, `top` for the last."""
    return [top * (2 ** (i / max(n_layers - 1, 1)) - 1) for i in range(n_layers)]


@contextmanager
def layer_dropout(model: nn.Module, top: float) -> Iterator[None]:
    """Inside the `with`, each training forward skips block l for each sequence with probability p_l
    (dropout_rates): the block's output is replaced by its input, so later blocks learn to refine rather than
    rely on every block before them, and early exits get closer to the full model (LayerSkip)."""
    blocks = find_parts(model).layers

    def skip(rate: float):
        def hook(module, args, out):
            if not module.training:
                return out
            x, h = args[0], out[0] if isinstance(out, tuple) else out
            dropped = torch.rand(h.shape[0], 1, 1, device=h.device) < rate  # per sequence
            h = torch.where(dropped, x, h)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    hooks = [b.register_forward_hook(skip(rate)) for b, rate in zip(blocks, dropout_rates(len(blocks), top))
             if rate > 0]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token-mean CE of predicting ids[:, t+1] from logits[:, t] (the causal-LM loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def lm_loss(model: nn.Module, ids: torch.Tensor, blocks: list[nn.Module], weight: float) -> torch.Tensor:
    """CE of the last layer, plus (LayerSkip) `weight` x the mean CE of early exits after `blocks`, each read
    through the model's own final norm and head, so the first layers learn to predict what the last one does."""
    with block_outputs(blocks) as states:
        loss = model(input_ids=ids, labels=ids).loss
    if not blocks:
        return loss
    parts = find_parts(model)
    exits = torch.stack([next_token_ce(parts.head(parts.norm(h)), ids) for h in states])
    return loss + weight * exits.mean()


def log_epoch(say: Callable[[str], None] | None):
    """An on_epoch_end callback printing one line per epoch (or None)."""
    if say is None:
        return None
    return lambda epoch, r: say(f"epoch {epoch}: train {r['train_loss']:.4f}  val {r['val_loss']:.4f}  "
                                f"({r['seconds']:.1f}s)")


@dataclass
class LMPretrainResult:
    """A language model trained by `pretrain`: where it is, its size, and its held-out perplexities."""

    definitions: ClassVar[dict[str, str]] = {
        "val_loss / val_ppl": "token-mean next-token cross-entropy (nats) on the held-out split of llm.train_files, "
                              "and its exp",
        "unigram_ppl": "perplexity of add-one-smoothed unigram frequencies on the same split: the floor to beat",
        "ppl_<set>": "perplexity on each out-of-domain file of llm.eval_files",
        "history": "per epoch: train loss, validation loss and perplexity, learning rate, seconds",
    }

    model_dir: str
    parameters: int
    layers: int
    vocab_size: int
    train_tokens: int
    val_tokens: int
    epochs: int
    stopped_early: bool
    val_loss: float
    val_ppl: float
    unigram_ppl: float
    held_out_ppl: dict[str, float]
    history: list[dict[str, float]]

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        out.update({f"ppl_{name}": ppl for name, ppl in out.pop("held_out_ppl").items()})
        history = out.pop("history")
        return {**out, "history": history}


def pretrain_lm(profile: LLMProfile, device: torch.device, run: RunDir, resume: bool, progress,
                say: Callable[[str], None] | None = None) -> LMPretrainResult:
    """Train a Llama LM from scratch (or continue a causal LM from train.init_from); save it as a Hugging Face
    folder (train.save_to, else <run>/model) with its tokenizer; return metrics with a unigram baseline."""
    from transformers import LlamaForCausalLM

    quiet_transformers()
    llm, cfg = profile.llm, profile.train
    folder = data_dir(profile.data)
    train_ex, val_ex = split(read_files(llm.train_files, folder, llm.max_examples), llm.val_fraction, profile.seed)
    start = load_lm(cfg.init_from, device) if cfg.init_from else None
    tok_dir = run.path / "tokenizer"
    tokenizer = run_tokenizer(profile, start, train_ex, tok_dir, resume)
    train_blocks, val_blocks = pack(train_ex, tokenizer, llm.max_len), pack(val_ex, tokenizer, llm.max_len)
    model = start.model.requires_grad_(True) if start else LlamaForCausalLM(llama_config(llm.arch, tokenizer))
    model.to(device)

    blocks = exit_blocks(model, llm.early_exit_layers, llm.early_exit_weight)

    def train_loss(ids: torch.Tensor) -> torch.Tensor:
        with autocast(device, llm.dtype), layer_dropout(model, llm.layer_dropout):
            return lm_loss(model, ids.to(device), blocks, llm.early_exit_weight)

    def train_batches(epoch: int):
        order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(profile.seed + epoch))
        batches = (order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size))
        return (train_blocks[part] for part in distributed.shard_batches(batches))

    def validate() -> dict[str, float]:
        ce = mean_ce(model, val_blocks, cfg.batch_size, device, llm.dtype, cfg.max_val_batches)
        return {"val_loss": ce, "val_ppl": math.exp(ce)}

    task = Task(model, model.parameters(), train_loss, train_batches, validate,
                {"kind": "llm", "llama": model.config.to_dict(), "tokenizer": str(tok_dir)},
                lambda: unique_state(model))
    result = fit(task, cfg, run.checkpoints, resume, progress, log_epoch(say))
    model.load_state_dict(load_weights(result.best_dir, device), strict=False)
    model.eval()
    out = Path(cfg.save_to) if cfg.save_to else run.path / "model"
    if distributed.is_main():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    eval_sets = {Path(f).stem: pack(read_files([f], folder, llm.max_eval_examples), tokenizer, llm.max_len)
                 for f in llm.eval_files}
    with torch.no_grad():
        val_ce = mean_ce(model, val_blocks, cfg.batch_size, device, llm.dtype)
        held_out = {name: math.exp(mean_ce(model, blocks, cfg.batch_size, device, llm.dtype))
                    for name, blocks in eval_sets.items()}
    unigram = unigram_ce(train_blocks, val_blocks, len(tokenizer))
    return LMPretrainResult(
        model_dir=str(out), parameters=sum(p.numel() for p in model.parameters()),
        layers=model.config.num_hidden_layers, vocab_size=len(tokenizer),
        train_tokens=train_blocks.numel(), val_tokens=val_blocks.numel(),
        epochs=result.epochs_done, stopped_early=result.stopped_early,
        val_loss=val_ce, val_ppl=math.exp(val_ce), unigram_ppl=math.exp(unigram), held_out_ppl=held_out,
        history=result.history,
    )
