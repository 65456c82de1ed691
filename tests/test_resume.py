"""Reliability: a run killed with SIGKILL resumes to the same result; nothing half-written looks
finished; a non-finite loss stops the run and names the last good checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_tune.cli import main

from conftest import ROOT

QUICK = [str(ROOT / "recipes" / "quickstart.yaml"), "sft.max_steps=20", "sft.save_strategy=steps",
         "sft.save_steps=5", "sft.logging_steps=1", "sft.warmup_steps=2", "sft.eval_strategy=no",
         "data.valid=null", "data.max_train_rows=320", "eval.max_rows=8", "eval.compare_base=false",
         "eval.retention_file=null", "trainable.preset=esft"]


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path, capsys):
    assert main(["train", *QUICK, f"output_dir={tmp_path / 'whole'}"]) == 0
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "moe_tune.cli", "train", *QUICK, f"output_dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not (run / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # killed: nothing in the folder looks finished, and it is not overwritten or resumed by accident
    assert not (run / "model").exists() and not (run / "eval").exists()
    assert main(["train", *QUICK, f"output_dir={run}"]) == 2
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert main(["train", str(run), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    whole, cut = losses(tmp_path / "whole"), losses(run)
    assert sorted(cut) == sorted(whole) == list(range(1, 21))  # each step logged once
    for step in whole:
        assert cut[step] == pytest.approx(whole[step], rel=1e-4, abs=1e-5), step
    selection = [json.loads((r / "expert_selection.json").read_text())["selected"] for r in (tmp_path / "whole", run)]
    assert selection[0] == selection[1]
    reports = [json.loads((r / "eval" / "report.json").read_text()) for r in (tmp_path / "whole", run)]
    first = next(iter(reports[0]))
    assert (reports[1][first]["results"]["tuned"]["overall"]["loss"]
            == pytest.approx(reports[0][first]["results"]["tuned"]["overall"]["loss"], rel=1e-4))
    assert main(["train", str(run), "--resume"]) == 2  # finished: nothing to resume
    assert "finished; nothing to resume" in capsys.readouterr().err


def test_resume_needs_the_same_recipe_and_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, f"output_dir={run}", "--resume"]) == 2
    assert "no moe-tune run to resume" in capsys.readouterr().err
    run.mkdir()
    (run / "recipe.yaml").write_text((ROOT / "recipes" / "quickstart.yaml").read_text().replace(
        "output_dir: runs/quickstart", f"output_dir: {run}"))
    assert main(["train", str(run), "--resume"]) == 2
    assert "has no complete checkpoint to resume from" in capsys.readouterr().err
    assert main(["train", str(run), "--resume", "sft.max_steps=7"]) == 2
    assert "sft.max_steps: 7 differs from the run's 900" in capsys.readouterr().err
    assert main(["train", str(run)]) == 2
    assert "a run folder; add --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "nan"
    code = main(["train", *QUICK, f"output_dir={run}", "trainable.preset=full", "sft.save_steps=2",
                 "sft.learning_rate=1.0e+30", "sft.max_grad_norm=0", "sft.warmup_steps=0", "sft.max_steps=40"])
    err = capsys.readouterr().err
    # (progress bars of the data preparation come before it) one error line, no traceback
    assert code == 2 and err.count("moe-tune: error:") == 1 and "Traceback" not in err, err
    err = err[err.index("moe-tune: error:"):].splitlines()[0]
    assert "the loss is nan" in err or "the loss is inf" in err
    assert "last good checkpoint is" in err and "--resume" in err
    assert not (run / "model").exists()


@pytest.mark.slow
def test_lora_run_resumes_from_its_adapter_checkpoint(tmp_path):
    """LoRA checkpoints hold the adapter, which Trainer's own path restores: the same losses."""
    import shutil

    run = tmp_path / "lora"
    steps = ["sft.max_steps=16", "sft.save_steps=8", "sft.save_total_limit=3", "trainable.preset=lora_experts",
             "sft.learning_rate=5.0e-3"]
    assert main(["train", *QUICK, *steps, f"output_dir={run}"]) == 0
    whole = losses(run)
    # as if killed after checkpoint 8: no final model, report or later checkpoint
    for path in (run / "model", run / "eval", run / "checkpoints" / "checkpoint-16"):
        shutil.rmtree(path)
    assert main(["train", str(run), "--resume"]) == 0
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 17))
    for step in range(9, 17):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-4, abs=1e-5), step


# --- interrupted in every phase: the resumed run ends as an uninterrupted one ------------------

MATRIX = [str(ROOT / "recipes" / "quickstart.yaml"), "sft.max_steps=4", "sft.save_strategy=steps",
          "sft.save_steps=2", "sft.logging_steps=1", "sft.warmup_steps=0", "sft.eval_strategy=no",
          "data.valid=null", "data.max_train_rows=64", "eval.max_rows=6", "eval.compare_base=false",
          "eval.retention_file=null"]
PRESETS = {"full": ["trainable.preset=full"],
           "lora": ["trainable.preset=lora_experts", "sft.learning_rate=5.0e-3"]}


def run_files(run):
    """What a finished run holds, checkpoints and TensorBoard's time-stamped files aside."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.parts[len(run.parts)] not in ("checkpoints", "tensorboard"))


def final_scores(run):
    report = json.loads((run / "eval" / "report.json").read_text())
    return next(iter(report.values()))["results"]["tuned"]["overall"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for name, preset in PRESETS.items():
        runs[name] = tmp_path_factory.mktemp("whole") / name
        assert main(["train", *MATRIX, *preset, f"output_dir={runs[name]}"]) == 0
    return runs


# Every phase killed (SIGKILL) for the full fine-tune, and for LoRA up to its evaluation, which
# loads the adapter (the report is written from the scores, whatever trained). Ctrl-C (SIGINT)
# goes through one handler whatever the phase: in training (the step finishes, with a
# checkpoint), and while LoRA's run saves its adapter (SIGKILL covers the full run's save).
INTERRUPTS = [("SIGKILL", phase, "full") for phase in ("train", "save", "evaluate", "report")] + \
    [("SIGKILL", phase, "lora") for phase in ("train", "save", "evaluate")] + \
    [("SIGINT", "train", "full"), ("SIGINT", "save", "lora")]


@pytest.mark.slow
@pytest.mark.parametrize("sig, phase, preset", INTERRUPTS, ids=["-".join(c) for c in INTERRUPTS])
def test_a_run_interrupted_in_any_phase_resumes_to_the_same_end(uninterrupted, tmp_path, capsys, preset, phase, sig):
    run = tmp_path / "cut"
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "interrupt_run.py"), phase, sig, "train", *MATRIX,
                          *PRESETS[preset], f"output_dir={run}"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    if sig == "SIGKILL":
        assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    else:  # one line: what was kept and the command that goes on
        assert out.returncode == 130, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("moe-tune: interrupted: ") and f"moe-tune train {run} --resume" in last, last
    assert not (run / "eval").exists()  # nothing looks finished
    if phase == "train" and sig == "SIGINT":  # the step in progress finished, with a checkpoint
        assert (run / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
        # no end-of-training summary (train_runtime, train_loss) before the interrupt line
        assert "train_runtime" not in out.stdout + out.stderr
        assert "train_runtime" not in (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", str(run), "--resume"]) == 0, capsys.readouterr().err
    whole = uninterrupted[preset]
    assert run_files(run) == run_files(whole)
    assert json.loads((run / "phases.json").read_text())["done"] == ["train", "save", "evaluate", "report"]
    assert sorted(losses(run)) == [1, 2, 3, 4]  # every step once, none past max_steps
    for step, loss in losses(whole).items():
        assert losses(run)[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*"))
    assert max(int(c.name.split("-")[1]) for c in (run / "checkpoints").glob("checkpoint-*")) == 4
    cut, ref = final_scores(run), final_scores(whole)
    assert cut["exact_match"] == ref["exact_match"] and cut["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    if phase == "train":  # the token count goes on from the checkpoint's; TensorBoard shows each step once
        tokens = [{r["step"]: r["num_tokens"] for r in logged(r) if "num_tokens" in r and "loss" in r}
                  for r in (run, whole)]
        assert tokens[0] == tokens[1]
        assert tensorboard_steps(run, "train/loss") == [1, 2, 3, 4]


def logged(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))  # honours the purge a resumed run writes
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.mark.slow
def test_a_moved_run_folder_resumes_evaluates_and_exports_from_anywhere(tmp_path, monkeypatch, capsys):
    """recipe.yaml keeps absolute paths and a run folder's location is where it is now: the
    folder is moved to another directory, and used from a third one."""
    import shutil

    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository
    first = tmp_path / "a" / "run"
    assert main(["train", "recipes/quickstart.yaml", *MATRIX[1:], *PRESETS["lora"], f"output_dir={first}"]) == 0
    for path in (first / "model", first / "eval", first / "checkpoints" / "checkpoint-4", first / "phases.json"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # as if it died after checkpoint 2
    moved = tmp_path / "b" / "run"
    moved.parent.mkdir()
    shutil.move(first, moved)
    elsewhere = tmp_path / "c"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", str(moved), "--resume"]) == 0, capsys.readouterr().err
    assert "resuming from" in capsys.readouterr().out and (moved / "eval" / "report.json").is_file()
    assert f"output_dir: {moved}" in (moved / "recipe.yaml").read_text()
    assert main(["eval", str(moved), "--max-rows", "4", "--out", "again"]) == 0, capsys.readouterr().err
    assert (elsewhere / "again" / "heldout.json").is_file()
    assert main(["export", str(moved), "--merged", "merged", "--check-rows", "2"]) == 0, capsys.readouterr().err
    assert (elsewhere / "merged" / "config.json").is_file()
