"""benchmarks/llm_bench.py at tiny size on a CPU: a tiny chat Llama given as a GGUF file written with the `gguf`
library, tiny prompt files; every stage runs and the report, CSVs and plots are written."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest

from tests.llm.gguf_file import write_gguf
from tests.llm.tiny import WORDS, chat_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "llm_bench.py"


def write_data(folder: Path) -> Path:
    """The four files the benchmark reads, in their real formats."""
    folder.mkdir()
    asks = [f"what is {WORDS[i % 20]} and {WORDS[(i * 3) % 20]}" for i in range(40)]
    (folder / "sharegpt_v3_filtered_1000_prompts.json").write_text(json.dumps(
        [{"id": str(i), "conversations": [{"from": "human", "value": a}]} for i, a in enumerate(asks)]))
    (folder / "spec_bench_question.jsonl").write_text("\n".join(
        json.dumps({"question_id": i, "category": "x", "turns": [a]}) for i, a in enumerate(asks[:6])))
    (folder / "gsm8k_test.jsonl").write_text("\n".join(
        json.dumps({"question": f"{a}?", "answer": "four"}) for a in asks[6:12]))
    (folder / "tinyshakespeare.txt").write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(12)))
    return folder


def test_the_benchmark_runs_every_stage_at_tiny_size(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="the optional gguf package writes the test's GGUF file")
    monkeypatch.setenv("SPECCTL_CACHE", str(tmp_path / "cache"))
    tokenizer = chat_tokenizer()
    model = tiny_llama(tokenizer, layers=4)
    for weight in (model.model.layers[1].self_attn.o_proj.weight, model.model.layers[1].mlp.down_proj.weight):
        weight.data.zero_()  # a block that adds nothing: the layer-skip search has one to find
    gguf = write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    spec = importlib.util.spec_from_file_location("llm_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "llm_bench", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    assert bench.main(["--target", str(gguf), "--data-dir", str(write_data(tmp_path / "data")), "--out", str(out),
                       "--tiny", "--layers", "0", "2", "--device", "cpu", "--budget-min", "4"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert all("no time left" in f for f in report["failures"]), report["failures"]
    assert 1 in report["skip"]["skip_layers"]
    drafts = pd.read_csv(out / "drafts.csv")
    assert set(drafts["draft.option"]) == {"untuned", "tuned head", "adapter", "option B"}
    assert {"val_kl", "val_agreement", "val_overlap", "gsm8k_test_kl", "tinyshakespeare_kl"} <= set(drafts)
    rows = pd.read_csv(out / "spec.csv")
    greedy = rows[rows["mode"] == "greedy"]
    assert set(greedy["draft.option"]) >= {"untuned", "tuned head", "adapter", "option B", "layer skip"}
    assert (greedy["identical_fraction"] == 1.0).all() and {"spec_bench", "gsm8k"} <= set(rows["prompts"])
    assert {"T=1"} <= set(rows["mode"]) and rows[["alpha_hat", "c_hat", "v_hat", "speedup_ci_low",
                                                   "predicted_speedup_v"]].notna().all().all()
    assert [p["method"] for p in report["hf"]][:2] == ["specctl vanilla (static path, CUDA graphs)",
                                                       next(p["method"] for p in report["hf"] if "best" in p["method"])]
    assert any("assistant_early_exit" in p["method"] and p["tok_s"] for p in report["hf"])
    text = (out / "bench.md").read_text()
    assert "## Best point per draft option" in text and "## Peers on the same prompts" in text
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {f"{n}.{x}" for n in ("layer_quality", "layer_agreement", "layer_acceptance", "acceptance_lengths",
                                 "layer_pareto", "layer_pareto_kl") for x in ("png", "pdf")} <= plots
