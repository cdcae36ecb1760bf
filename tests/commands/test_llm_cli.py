"""The LLM workflow end to end on tiny local files: pretrain -> finetune-head -> spec-test, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv

import pytest
import torch
import typer
from typer.testing import CliRunner

from specctl.commands.finetune_head import finetune_head
from specctl.commands.pretrain import pretrain
from specctl.commands.spec_test import spec_test

app = typer.Typer()
app.command("pretrain")(pretrain)
app.command("finetune-head")(finetune_head)
app.command("spec-test")(spec_test)
runner = CliRunner()

PROFILE = """
name = "tiny-llm"
kind = "llm"
seed = 0
device = "cpu"

[data]
dir = "{data}"

[llm]
target = "{work}/target"
train_files = ["chat.jsonl"]
eval_files = ["ood.txt"]
max_len = 48
max_eval_examples = 16
exit_layers = [0, 1]

[llm.arch]
vocab_size = 300
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 3
num_attention_heads = 4

[llm.spec]
draft = "{work}/drafts"
prompts = "prompts.jsonl"
n_prompts = 3
max_new_tokens = 12
gamma = 3
bootstrap = 50
step_repeats = 3

[train]
epochs = 2
batch_size = 8
lr = 5e-3
schedule = "constant"
max_steps_per_epoch = 8
max_val_batches = 2
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU models run far faster on one thread


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny chat / text / prompt files, a profile, and a target pretrained on them."""
    root = tmp_path_factory.mktemp("llm")
    data = root / "data"
    data.mkdir()
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."}
            for a in range(12) for b in range(12)]
    (data / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "ood.txt").write_text("\n\n".join(f"To be or not to be, line {i}, so it goes." for i in range(40)))
    (data / "prompts.jsonl").write_text("\n".join(json.dumps({"turns": [f"What is {i} plus 3?"]}) for i in range(5)))
    profile = root / "tiny.toml"
    profile.write_text(PROFILE.format(data=data, work=root))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        invoke("pretrain", "-p", str(profile), "--set", f'train.save_to="{root}/target"', "--set", "train.epochs=3",
               "--set", "train.max_steps_per_epoch=25", "--set", "train.lr=1e-2", "--json")
    finally:
        os.chdir(cwd)
    return root


def test_pretrain_writes_a_hugging_face_model(work):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "target")
    assert model.config.num_hidden_layers == 3 and (work / "target" / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(work / "target").chat_template
    metrics = json.loads(next((work / "runs" / "pretrain").glob("*/metrics.json")).read_text())["metrics"]
    assert metrics["val_ppl"] < metrics["unigram_ppl"]


def test_finetune_spec_test_and_eval_only(work):
    profile = str(work / "tiny.toml")
    drafts = f'train.save_to="{work}/drafts"'
    out = json.loads(invoke("finetune-head", "-p", profile, "--set", drafts, "--json").output)
    assert out["target_unchanged"] and [(r["exit_layer"], r["head"]) for r in out["rows"]] == [
        (0, "copy"), (0, "tuned"), (1, "copy"), (1, "tuned")]
    assert out["rows"][1]["val_kl"] < out["rows"][0]["val_kl"]
    assert {"val_kl_t1", "val_ppl", "val_top1", "val_top5", "ood_kl", "ood_top1"} <= set(out["rows"][0])
    assert (work / "drafts" / "layer1" / "model.safetensors").is_file()

    greedy = json.loads(invoke("spec-test", "-p", profile, "--set", "llm.exit_layer=1",
                               "--set", "llm.spec.temperature=0", "--json").output)
    assert greedy["identical_fraction"] == 1.0 and greedy["proposed"] > 0
    sampled = json.loads(invoke("spec-test", "-p", profile, "--set", "llm.spec.top_k=20", "--json").output)
    assert 0 <= sampled["acceptance_rate"] <= 1 and len(sampled["position_acceptance"]) == 3
    assert sampled["tv"] == pytest.approx(1 - sampled["overlap"]) and sampled["c_hat"] > 0 and sampled["v_hat"] > 0
    assert sampled["predicted_speedup_v"] == pytest.approx(
        sampled["predicted_speedup"] * (3 * sampled["c_hat"] + 1) / (3 * sampled["c_hat"] + sampled["v_hat"]))

    evaluated = json.loads(invoke("finetune-head", "-p", profile, "--eval-only", f"{work}/drafts/layer*",
                                  "--json").output)
    assert [r["exit_layer"] for r in evaluated["rows"]] == [0, 1]
    with open(evaluated["results_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.parametrize("override,message", [
    ("llm.exit_layers=[7]", "exit layer 7 out of range"),
    ('llm.train_files=["bad.jsonl"]', "no usable text field; it has fields foo, bar"),
])
def test_bad_input_is_one_line_and_exit_2(work, override, message):
    (work / "data" / "bad.jsonl").write_text(json.dumps({"foo": 1, "bar": "x"}) + "\n")
    result = runner.invoke(app, ["finetune-head", "-p", str(work / "tiny.toml"), "--set", override])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_finetune_head_resumes_from_the_last_finished_epoch(work):
    profile = str(work / "tiny.toml")
    first = json.loads(invoke("finetune-head", "-p", profile, "--set", "train.epochs=1", "--set", "train.patience=5",
                              "--set", "llm.eval_baseline=false", "--json").output)
    assert [r["epochs"] for r in first["rows"]] == [1, 1]
    more = invoke("finetune-head", "-p", profile, "--set", "train.epochs=2", "--set", "train.patience=5",
                  "--set", "llm.eval_baseline=false", "--resume", "--json")
    assert more.exit_code == 0, more.output
    assert [r["epochs"] for r in json.loads(more.output)["rows"]] == [2, 2]
    first_run, second_run = sorted(Path("runs/finetune-head").iterdir())  # a finished run is never rewritten:
    manifest = json.loads((second_run / "manifest.json").read_text())  # the resume continues a copy of it
    assert manifest["resumed_from"] == str(first_run) and json.loads(more.output)["run_dir"] == str(second_run)


def exit_ce(folder: Path, layer: int, texts: list[str]) -> float:
    """Held-out CE of the untuned early exit after block `layer` (the target's own norm and head)."""
    from specctl.llm.lm import load_lm
    from specctl.llm.pretrain import block_outputs, next_token_ce

    lm = load_lm(str(folder), torch.device("cpu"))
    ids = torch.tensor([lm.tokenizer(" ".join(texts))["input_ids"][:200]])
    with torch.no_grad(), block_outputs([lm.parts.layers[layer]]) as states:
        lm.model(input_ids=ids)
        return next_token_ce(lm.parts.head(lm.parts.norm(states[0])), ids).item()


def test_early_exit_loss_in_pretraining_makes_the_first_layer_predict(work):
    common = ["--set", "train.epochs=3", "--set", "train.max_steps_per_epoch=25", "--set", "train.lr=1e-2",
              "--set", f'run_root="{work}/runs-ee"', "--json"]
    invoke("pretrain", "-p", str(work / "tiny.toml"), "--set", f'train.save_to="{work}/target-ee"',
           "--set", "llm.early_exit_weight=1.0", "--set", "llm.early_exit_layers=[0]", *common)
    texts = [f"What is {a} plus 5? {a} plus 5 is {a + 5}." for a in range(3, 9)]
    assert exit_ce(work / "target-ee", 0, texts) < exit_ce(work / "target", 0, texts) - 0.5
    bad = runner.invoke(app, ["pretrain", "-p", str(work / "tiny.toml"), "--set", "llm.early_exit_weight=1.0",
                              "--set", "llm.early_exit_layers=[3]", *common])
    assert bad.exit_code == 2 and "llm.early_exit_layers: exit layer 3 out of range" in " ".join(bad.output.split())


def test_llm_pretrain_prints_one_line_per_epoch_when_not_a_terminal(work):
    out = invoke("pretrain", "-p", str(work / "tiny.toml"), "--set", f'train.save_to="{work}/target-lines"',
                 "--set", "train.max_steps_per_epoch=2", "--set", f'run_root="{work}/runs-lines"').output
    assert "epoch 1: train" in out and "epoch 2: train" in out  # (#22, 10: piped output printed nothing)

def test_adapter_drafts_at_several_temperatures_and_layer_skip_spec_test(work):
    profile = str(work / "tiny.toml")
    out = json.loads(invoke("finetune-head", "-p", profile, "--set", 'llm.draft_head="adapter"',
                            "--set", "llm.kl_temperatures=[1.0, 2.0]", "--set", "llm.exit_layers=[1]",
                            "--set", f'train.save_to="{work}/adapters"', "--json").output)
    assert [(r["head"], r["kl_temperature"]) for r in out["rows"]] == [("copy", 1.0), ("adapter", 1.0),
                                                                       ("adapter", 2.0)]
    assert out["rows"][1]["val_kl"] < out["rows"][0]["val_kl"] and "val_overlap" in out["rows"][0]
    assert (work / "adapters" / "layer1_T2" / "model.safetensors").is_file()
    tuned = json.loads(invoke("spec-test", "-p", profile, "--set", "llm.exit_layer=1", "--set",
                              f'llm.spec.draft="{work}/adapters/layer1_T1"', "--set", "llm.spec.temperature=0",
                              "--set", "llm.spec.share_cache=true", "--json").output)
    assert tuned["identical_fraction"] == 1.0 and tuned["draft_kind"] == "early_exit"
    skip = json.loads(invoke("spec-test", "-p", profile, "--set", 'llm.draft_kind="layer_skip"',
                             "--set", "llm.skip_layers=[1]", "--set", "llm.spec.temperature=0",
                             "--set", "llm.spec.share_cache=true", "--json").output)
    assert skip["identical_fraction"] == 1.0 and skip["draft_kind"] == "layer_skip" and skip["skip_layers"] == [1]
    bad = runner.invoke(app, ["spec-test", "-p", profile, "--set", 'llm.draft_kind="layer_skip"'])
    assert bad.exit_code == 2 and "needs llm.skip_layers" in bad.output
