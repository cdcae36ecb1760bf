"""Issue #22, "trust": nothing is lost (no silent overwrite, the right run resumed, dead runs marked, outputs checked
before work), chains are reproducible, results are analysable, conventions hold. Each test reproduces one case of
the issue as a user met it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from specctl.backends import load_profile
from specctl.cli import app
from specctl.core import train
from specctl.core.checkpoint import load_weights
from specctl.core.rundir import RunDir

runner = CliRunner()
FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=5", "--set", "data.max_eval_windows=16",
        "--set", "data.synthetic.length=3000"]
SPEC_FAST = ["--set", "spec.max_windows=16", "--set", "spec.repeats=1", "--set", "spec.horizon=32",
             "--set", "spec.sliding_baseline=false"]
TARGET, DRAFT = Path("artifacts/quickstart/target"), Path("artifacts/quickstart/distilled")


def invoke(*args: str):
    return runner.invoke(app, list(args))


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def payload(result) -> dict:
    output = ok(result).output
    return json.loads(output[output.index("{"):])


def one_line(result) -> str:
    return " ".join(result.output.split())


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in one_line(result), result.output


def digest(*paths: Path) -> str:
    """One hash over the bytes of every file under `paths` (a checkpoint folder, a run directory)."""
    h = hashlib.sha256()
    for path in paths:
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]:
            h.update(str(f).encode() + f.read_bytes())
    return h.hexdigest()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared machine


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> Path:
    """The README's step-by-step quick start in a fresh folder: pretrain, distill, spec-test as three commands; their
    --json payloads are kept in steps.json."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        steps = [payload(invoke("pretrain", "--profile", "quickstart/target", *FAST, "--json")),
                 payload(invoke("distill", "--profile", "quickstart/distill", *FAST, "--json")),
                 payload(invoke("spec-test", "--profile", "quickstart/spec-test", *FAST, *SPEC_FAST, "--json"))]
    (root / "steps.json").write_text(json.dumps(steps))
    return root


@pytest.fixture
def artifacts(trained) -> None:
    shutil.copytree(trained / "artifacts", "artifacts")


# -- 1. nothing lost: a missing checkpoint is trained at exactly its path, nothing is overwritten silently --------

def test_a_typo_in_spec_target_trains_nothing_and_overwrites_nothing(artifacts):
    before = digest(TARGET, DRAFT)
    result = invoke("spec-test", "--profile", "quickstart/spec-test", *FAST, *SPEC_FAST,
                    "--set", 'spec.target="artifacts/quickstart/targt"', "--train-missing")
    refused(result, "spec.target artifacts/quickstart/targt does not exist",
            "its builder profile quickstart/target trains artifacts/quickstart/target")
    assert digest(TARGET, DRAFT) == before and not Path("runs/pretrain").exists()
    assert not Path("artifacts/quickstart/targt").exists()


def test_training_refuses_to_replace_a_checkpoint_without_overwrite(artifacts):
    before = digest(TARGET)
    refused(invoke("pretrain", "--profile", "quickstart/target", *FAST),
            f"train.save_to {TARGET} already holds a checkpoint: pass --overwrite")
    assert digest(TARGET) == before and not Path("runs/pretrain").exists()
    ok(invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "seed=1", "--overwrite"))
    assert digest(TARGET) != before


# -- 2. the resume hint resumes the interrupted run itself; other settings are refused; finished runs stay ---------

def interrupt_after_first_epoch(monkeypatch) -> None:
    original = train.save_checkpoint

    def save_then_interrupt(folder, *args, **kwargs):
        original(folder, *args, **kwargs)
        if Path(folder).name == "last" and kwargs.get("state", {}).get("epoch") == 1:
            raise KeyboardInterrupt  # Ctrl-C right after epoch 1 was saved

    monkeypatch.setattr(train, "save_checkpoint", save_then_interrupt)


def test_the_resume_hint_continues_the_interrupted_run_and_never_a_finished_one(monkeypatch):
    named = [*FAST, "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--set", 'name="sigint-test"',
             "--set", "data.max_eval_windows=4"]
    older = Path(payload(invoke("pretrain", "--profile", "quickstart/target", *named,
                                "--set", 'train.save_to="artifacts/older"', "--json"))["run_dir"])
    older_files = digest(older)
    with monkeypatch.context() as patch:
        interrupt_after_first_epoch(patch)
        stopped = invoke("pretrain", "--profile", "quickstart/target", *named,
                         "--set", 'train.save_to="artifacts/sigint"')
    assert stopped.exit_code == 130
    hint = re.search(r"`(specctl pretrain --profile (\S+) --resume)`", "".join(stopped.output.split("\n")))
    interrupted = Path(hint.group(2)).parent
    assert interrupted != older and json.loads((interrupted / "manifest.json").read_text())["status"] == "interrupted"

    refused(invoke("pretrain", "--profile", hint.group(2), "--set", "train.lr=0.01", "--resume"),
            f"{interrupted.name} was made with other settings (train.lr 0.002 -> 0.01)")
    resumed = payload(invoke(*hint.group(1).split()[1:], "--json"))
    assert Path(resumed["run_dir"]).resolve() == interrupted.resolve() and resumed["epochs"] == 2
    assert resumed["checkpoint"] == "artifacts/sigint" and digest(older) == older_files

    finished_files = digest(interrupted)  # resuming a finished run continues a copy of it in a new run
    longer = payload(invoke("pretrain", "--profile", hint.group(2), "--set", "train.epochs=3", "--resume", "--json"))
    assert Path(longer["run_dir"]).resolve() != interrupted.resolve() and longer["epochs"] == 3
    assert digest(interrupted) == finished_files
    manifest = json.loads((Path(longer["run_dir"]) / "manifest.json").read_text())
    assert Path(manifest["resumed_from"]).resolve() == interrupted.resolve()


# -- 3. a killed run is marked interrupted by the next run of its profile ------------------------------------------

def test_a_killed_run_is_marked_interrupted_by_the_next_run_of_its_profile():
    profile = load_profile("quickstart/target")
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed, alive = RunDir.create(profile, "pretrain", "cpu"), RunDir.create(profile, "pretrain", "cpu")
    killed.manifest["pid"] = dead.pid  # as if SIGKILLed: its manifest still says running
    killed.save_manifest()
    RunDir.create(profile, "pretrain", "cpu")
    status = lambda run: json.loads((run.path / "manifest.json").read_text())["status"]  # noqa: E731
    assert status(killed) == "interrupted" and status(alive) == "running"  # this process is alive


# -- 4. output folders are checked before any long work ------------------------------------------------------------

def test_unwritable_outputs_are_refused_before_any_training():
    Path("afile").write_text("a file, so nothing can be created under it (even as root)")
    refused(invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", 'train.save_to="afile/target"'),
            "the folder of train.save_to afile is not writable")
    refused(invoke("spec-test", "--profile", "quickstart", *FAST, "--set", 'run_root="afile/runs"', "--train-missing"),
            "the run root (run_root) afile/runs is not writable")
    refused(invoke("sweep", "--profile", "quickstart/sweep", *FAST, "--out", "afile/results.csv", "--train-missing"),
            "the folder of the results CSV (--out) afile is not writable")
    assert not Path("artifacts").exists() and not Path("runs").exists()  # nothing made, not even empty folders
    Path("results.csv").write_text("trial_id,status,acceptance_rate,mse\nt1,ok,0.5,0.1\nt2,ok,0.6,0.2\n")
    refused(invoke("plot", "results.csv", "--out", "afile/figs"), "the figures' folder (--out) afile/figs is not")


# -- 5. a chain in one process equals the same commands run one by one (and prints its epochs when piped) ----------

def test_the_quick_start_gives_the_same_weights_and_numbers_in_one_command_or_step_by_step(trained):
    chain = ok(invoke("spec-test", "--profile", "quickstart/spec-test", *FAST, *SPEC_FAST, "--train-missing",
                      "--debug-csv"))
    assert chain.output.count("epoch 1: train") == 2  # both builders, one line per epoch though not a terminal
    for name in ("target", "distilled"):
        folder = f"artifacts/quickstart/{name}"
        one, other = load_weights(folder), load_weights(trained / folder)
        assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one), name
    (run,) = Path("runs/spec-test").glob("*/metrics.json")
    together, (*_, apart) = json.loads(run.read_text()), json.loads((trained / "steps.json").read_text())
    assert set(together) == {"metrics", "definitions"}  # 9. one metrics.json shape
    for key in ("acceptance_rate", "mse", "mse_target", "mse_draft", "fidelity_mse", "accepted", "windows"):
        assert together["metrics"][key] == apart[key], key
    assert apart["windows"] == 16 and 0 <= apart["acceptance_rate"] <= 1 and apart["speedup"] > 0
    assert apart["speedup_target_self"] > 0  # the target timed against itself: the ratio a tie measures as
    assert (run.parent / "debug.csv").stat().st_size > 0
    assert "acceptance=" in Path("runs/spec-test/results.log").read_text()


def test_every_command_names_its_run_directory_and_writes_one_metrics_shape(trained):
    for step in json.loads((trained / "steps.json").read_text()):  # 9. pretrain, distill, spec-test --json
        run = trained / step["run_dir"]
        assert set(json.loads((run / "metrics.json").read_text())) == {"metrics", "definitions"}


# -- 8 and 6: the sweep warns about keys the rule ignores; sweep -> analyze -> plot of a real time-series sweep ----

def test_a_time_series_sweep_warns_analyzes_and_plots(artifacts):
    grid = ["--grid", "spec.k=[2,3]", "--grid", "spec.sigma=[0.5,2.0]", "--grid", "spec.tol_relative=[0.5]",
            "--grid", "seed=[0]"]
    swept = ok(invoke("sweep", "--profile", "quickstart/sweep", *FAST, *SPEC_FAST, *grid))
    assert "warning: sweeping spec.sigma changes nothing: rule 'tolerance'" in one_line(swept)
    assert "spec.k changes nothing" not in one_line(swept)
    hint = re.search(r"`(specctl analyze (\S+))`", one_line(swept))
    report = payload(invoke(*hint.group(1).split()[1:], "--json"))  # the hint runs as printed
    assert report["kind"] == "time-series spec-test sweep" and report["trials"] == 4
    effect = {k["key"]: k for k in report["keys"]}
    assert effect["spec.sigma"]["changes_outcome"] is False and effect["spec.k"]["changes_outcome"] is True
    assert report["timing_spread"]["identical"] and report["verdict"]
    assert "spec.sigma: no effect" in one_line(invoke("analyze", hint.group(2)))
    figures = payload(invoke("plot", hint.group(2), "--json"))
    assert {Path(f).stem for f in figures["files"]} >= {"acceptance_vs_mse", "k_effect", "pareto_frontier",
                                                        "speedup_vs_predicted"}


def test_the_quick_start_sweep_varies_what_its_rule_reads():
    plan = ok(invoke("sweep", "--profile", "quickstart/sweep", "--dry-run"))
    assert "warning" not in plan.output and "12 trials" in plan.output
    listed = json.loads(ok(invoke("sweep", "--profile", "quickstart/sweep", "--dry-run", "--json")).output)
    assert len(listed["trials"]) == 12 and {"spec.k", "spec.tol_relative", "seed"} <= set(listed["trials"][0])
    profile = load_profile("quickstart/sweep")  # the seeds replicate: the rule draws nothing, so timing noise shows
    assert profile.spec.rule == "tolerance" and profile.spec.emit != "sample"


# -- 12. smaller conventions ---------------------------------------------------------------------------------------

def test_profiles_show_resolves_by_default_and_version_prints():
    resolved = ok(invoke("profiles", "show", "quickstart")).output
    assert "[spec]" in resolved and "rule = \"tolerance\"" in resolved and "lr = " in resolved  # a default
    written = ok(invoke("profiles", "show", "quickstart", "--as-written")).output
    assert written.startswith("description") and "lr = " not in written
    assert re.fullmatch(r"specctl \S+\n", ok(invoke("--version")).output)


def test_profiles_list_prints_descriptions_as_text_not_markup(monkeypatch):
    import specctl.commands.profiles

    monkeypatch.setattr(specctl.commands.profiles, "read_toml", lambda path: {"description": "a [recipe, caps] mix"})
    assert "a [recipe, caps] mix" in ok(invoke("profiles", "list")).output


def test_wrong_profiles_say_why_and_leave_no_run_directory(tmp_path):
    Path("folder").mkdir()
    refused(invoke("pretrain", "--profile", "folder"), "profile 'folder' is a directory")
    refused(invoke("finetune-head", "--profile", "quickstart/target"),
            "finetune-head does not apply to this profile: its kind is 'timeseries'")
    short = tmp_path / "short.csv"
    short.write_text("date,a\n" + "".join(f"2020-01-01 {i},{i}\n" for i in range(50)))
    refused(invoke("pretrain", "--profile", "quickstart/target", "--set", f'data.path="{short}"'), "rows")
    assert not Path("runs").exists() or not any(Path("runs").rglob("manifest.json"))
