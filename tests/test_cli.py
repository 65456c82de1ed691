"""`moe-tune train` and `moe-tune eval` end to end on the shipped model, and their errors."""

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from moe_tune.cli import main

from conftest import ROOT, SHARED_RUNS, cli_commands


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trained_run(shared_run):
    """The full fine-tune of conftest.SHARED_RUNS (test_serving serves it), evaluated on the way and at the end."""
    return shared_run("full")


@pytest.mark.slow
def test_train_writes_a_complete_run(trained_run):
    run = trained_run
    assert (run / "recipe.yaml").is_file() and "max_steps: 150" in (run / "recipe.yaml").read_text()
    assert (run / "model" / "config.json").is_file()
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "model" / "tokenizer.json").is_file()
    assert not (run / "model.tmp").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_logs] == list(range(1, 151))
    assert all({"learning_rate", "aux_loss"} <= set(m) for m in train_logs)
    assert any("eval_loss" in m for m in metrics)
    # after each evaluation: a routing summary with drift from the routing before training
    routing = [m for m in metrics if "eval_routing/js_from_base" in m]  # eval/routing/... in TensorBoard
    assert [m["step"] for m in routing] == [75, 150] and all(m["eval_routing/entropy"] > 0 for m in routing)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard, offline
    result = json.loads((run / "eval" / "heldout.json").read_text())
    assert result["file"] == str(ROOT / "data" / "heldout.jsonl")  # absolute: the run works from anywhere
    assert set(result["results"]) == {"base", "tuned"}
    assert result["results"]["tuned"]["overall"]["n"] == 24
    # the report with routing analytics and its plots
    report = json.loads((run / "eval" / "report.json").read_text())[str(ROOT / "data" / "heldout.jsonl")]
    assert set(report["routing"]) == {"base", "tuned"}
    assert "js_from_base" in report["routing"]["tuned"]["mean_over_layers"]
    for plot in ("expert_load", "metrics", "drift", "task_usage"):
        assert (run / "eval" / f"heldout_{plot}.png").stat().st_size > 0
    assert "### Routing" in (run / "eval" / "report.md").read_text()
    retention = json.loads((run / "eval" / "retention.json").read_text())["results"]
    assert set(retention) == {"base", "tuned"} and retention["base"]["n"] == 100


@pytest.mark.slow
def test_train_changes_the_weights(trained_run):
    from safetensors.torch import load_file

    base = load_file(ROOT / "data" / "tiny-moe" / "model.safetensors")
    tuned = load_file(trained_run / "model" / "model.safetensors")
    assert base.keys() == tuned.keys()
    assert any(not (base[k] == tuned[k]).all() for k in base)


@pytest.mark.slow
def test_existing_run_is_never_overwritten_silently(trained_run, capsys):
    before = (trained_run / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, "train", "recipes/quickstart.yaml", f"output_dir={trained_run}",
                           *SHARED_RUNS["full"])
    assert code == 2 and "already holds a run; pass --overwrite" in err
    assert (trained_run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_eval_on_a_run_and_on_a_model(trained_run, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--data", "data/valid.jsonl",
                           "--max-rows", "10", "--max-new-tokens", "4")
    assert code == 0 and "| **all** | 10 |" in out
    # other data than the run's own: a folder of its own, the run's final evaluation untouched
    saved = json.loads((trained_run / "eval-valid" / "valid.json").read_text())
    assert not (trained_run / "eval" / "valid.json").exists()
    assert set(saved["results"]) == {"base", "tuned"}  # the run knows its base: side by side
    assert saved["results"]["tuned"]["overall"]["n"] == 10
    code, _, _ = run_cli(capsys, "eval", str(trained_run), "--data", "data/valid.jsonl", "--max-rows", "4",
                         "--no-base", "--out", str(tmp_path / "nobase"))
    assert code == 0
    assert set(json.loads((tmp_path / "nobase" / "valid.json").read_text())["results"]) == {"tuned"}
    code, out, _ = run_cli(capsys, "eval", "data/tiny-moe", "--data", "data/heldout.jsonl",
                           "--max-rows", "5", "--out", str(tmp_path / "base"))
    assert code == 0
    saved = json.loads((tmp_path / "base" / "heldout.json").read_text())
    assert saved["results"]["tiny-moe"]["overall"]["n"] == 5


def test_non_empty_foreign_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", "recipes/quickstart.yaml", f"output_dir={tmp_path}", "--overwrite")
    assert code == 2 and "is not a moe-tune run" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_model_that_is_not_moe(tmp_path, capsys):
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, vocab_size=100).save_pretrained(tmp_path / "dense")
    code, _, err = run_cli(capsys, "train", "recipes/quickstart.yaml", f"model.path={tmp_path / 'dense'}",
                           f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert "model type 'llama' is not a Mixture-of-Experts model" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [
    ("model.path=no/such/model", f"no/such/model (read from {ROOT}): no such model folder"),
    ("data.train=data/missing.jsonl", f"data/missing.jsonl (read from {ROOT}): data file not found"),
    ("sft.max_stepss=3", "unknown key 'sft.max_stepss'"),
    ("eval.batch_size=big", "eval.batch_size"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, override, expected):
    code, _, err = run_cli(capsys, "train", "recipes/quickstart.yaml", f"output_dir={tmp_path / 'r'}", override)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("moe-tune: error: ")
    assert not (tmp_path / "r").exists()


def test_malformed_data_row_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = (ROOT / "data" / "train.jsonl").read_text().splitlines()[:2]
    bad.write_text("\n".join(good + ['{"messages": "oops"}']) + "\n")
    code, _, err = run_cli(capsys, "train", "recipes/quickstart.yaml", f"data.train={bad}",
                           f"output_dir={tmp_path / 'r'}")
    assert code == 2 and f"{bad}:3: missing or empty 'messages'" in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe_tune.cli", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"moe-tune: error: {tmp_path / 'missing.yaml'}: recipe file not found"


def test_eval_of_a_run_without_model(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("output_dir: x\n")
    code, _, err = run_cli(capsys, "eval", str(tmp_path), "--data", "data/valid.jsonl")
    assert code == 2 and "has no saved model yet" in err


@pytest.mark.parametrize("option, expected", [
    (["--dtype", "float8"], r"argument --dtype: invalid choice: 'float8' \(choose from float32, bfloat16, float16, auto\)"),
    (["--batch-size", "0"], r"--batch-size: Input should be greater than 0 \(got 0\)"),
])
def test_eval_options_are_checked_against_the_recipe_schema(capsys, option, expected):
    """eval's choices and limits come from the recipe's own definitions, checked before loading."""
    import re

    code, _, err = run_cli(capsys, "eval", "data/tiny-moe", "--data", "data/heldout.jsonl", *option)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(expected, err), err


@pytest.mark.slow
def test_evaluations_are_never_overwritten_silently(trained_run, tmp_path, capsys):
    """A second evaluation into the same folder needs --overwrite, and is refused before
    anything loads; the run's own evaluation is what `eval RUN` redoes by default."""
    final = (trained_run / "eval" / "report.json").read_text()
    code, _, err = run_cli(capsys, "eval", str(trained_run), "--max-rows", "4")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"evaluated when it trained; its report is {trained_run / 'eval' / 'report.md'}" in err
    assert "--overwrite" in err and (trained_run / "eval" / "report.json").read_text() == final
    code, _, _ = run_cli(capsys, "eval", str(trained_run), "--max-rows", "4", "--no-base",
                         "--out", str(tmp_path / "again"))
    assert code == 0
    saved = json.loads((tmp_path / "again" / "heldout.json").read_text())  # the run's own eval.files
    assert saved["results"]["tuned"]["overall"]["n"] == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "eval", str(trained_run), "--out", str(tmp_path / "mine"), "--overwrite")
    assert code == 2 and "not a moe-tune evaluation, refusing to replace it" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_version_and_debug_after_the_command(capsys):
    from moe_tune.errors import MoeTuneError

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("moe-tune 0.")
    with pytest.raises(MoeTuneError):  # --debug after the command shows the traceback too
        main(["train", "recipes/quickstart.yaml", "trainable.prest=full", "--debug"])


def test_every_option_says_what_it_does():
    import argparse

    from moe_tune.cli import build_parser

    for name, command in [("moe-tune", build_parser()), *cli_commands().items()]:
        for action in command._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{name} {action.option_strings or action.dest}"


@pytest.mark.slow
def test_one_model_evaluated_on_two_files_gets_a_folder_for_each(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for data in ("heldout", "valid"):
        code, _, err = run_cli(capsys, "eval", str(ROOT / "data" / "tiny-moe"), "--data",
                               str(ROOT / "data" / f"{data}.jsonl"), "--max-rows", "2", "--max-new-tokens", "2")
        assert code == 0, err
    assert (tmp_path / "eval" / "tiny-moe-heldout" / "heldout.json").is_file()
    assert (tmp_path / "eval" / "tiny-moe-valid" / "valid.json").is_file()
