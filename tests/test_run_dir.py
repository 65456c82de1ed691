"""The run folder: claiming it, writing into it without half-files, and loading its model."""

import json

import pytest

from moe_tune.errors import MoeTuneError
from moe_tune.training.run_dir import _drop_logs_after, after_newest_events, prepare_run_dir, write_json


def test_prepare_run_dir(tmp_path):
    run = prepare_run_dir(str(tmp_path / "a" / "b"), overwrite=False)
    assert run.is_dir()
    (run / "recipe.yaml").write_text("x")
    with pytest.raises(MoeTuneError, match="already holds a run"):
        prepare_run_dir(str(run), overwrite=False)
    assert prepare_run_dir(str(run), overwrite=True) == run and not any(run.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoeTuneError, match="is a file"):
        prepare_run_dir(str(tmp_path / "file"), overwrite=True)


def test_write_json_is_atomic(tmp_path):
    dest = tmp_path / "eval" / "x.json"
    write_json(dest, {"a": 1})
    assert json.loads(dest.read_text()) == {"a": 1}
    assert [p.name for p in dest.parent.iterdir()] == ["x.json"]


def test_folder_in_place_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    from moe_tune.training.run_dir import folder_in_place

    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with folder_in_place(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    with folder_in_place(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not tmp.exists()


@pytest.mark.slow
def test_a_lora_run_loads_from_any_directory(tmp_path, monkeypatch, capsys):
    """adapter_config.json names the base model by a path that resolves from anywhere, so
    PEFT's own loader (and every tool that reads the base from the adapter) finds it."""
    from peft import AutoPeftModelForCausalLM

    from moe_tune.cli import main

    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # the recipe names the model relative to the repository: data/tiny-moe
    run = tmp_path / "run"
    code = main(["train", "recipes/strategies/lora_experts.yaml", f"output_dir={run}", "sft.max_steps=2",
                 "sft.eval_strategy=no", "data.max_train_rows=16", "eval.files=[]", "eval.retention_file=null"])
    assert code == 0, capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(run / "model")
    assert model.peft_config["default"].base_model_name_or_path == str(ROOT / "data" / "tiny-moe")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_run_resumed_within_a_second_of_its_last_events_reads_in_step_order(tmp_path):
    """TensorBoard reads event files in name order, whose first field is the second each was
    opened in: the purge event and the resumed run's file must come after the killed run's."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    board = tmp_path / "tensorboard"
    with SummaryWriter(str(board)) as killed:  # steps 1-3, the last after its checkpoint
        for step in (1, 2, 3):
            killed.add_scalar("train/loss", 1.0 / step, step)
    # opened this second by another process, whose host and id sort after this one's
    next(board.glob("events.out.tfevents.*")).rename(board / f"events.out.tfevents.{int(time.time()):010d}.zz.9.0")
    _drop_logs_after(tmp_path, 2)  # resumed from checkpoint-2
    with SummaryWriter(str(board)) as resumed:
        for step in (3, 4):
            resumed.add_scalar("train/loss", 1.0 / step, step)
    events = EventAccumulator(str(board))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_event_files_from_a_clock_ahead_are_waited_for_a_second_at_most(tmp_path):
    import time

    board = tmp_path / "tensorboard"
    board.mkdir()  # as if the folder came from a machine whose clock runs 30 s ahead
    (board / f"events.out.tfevents.{int(time.time()) + 30:010d}.other.1.0").write_bytes(b"")
    start = time.monotonic()
    after_newest_events(board)
    assert time.monotonic() - start < 1.5


def test_a_run_that_failed_before_its_first_logged_step_leaves_nothing_behind(tmp_path):
    """Its folder would otherwise hold recipe.yaml and ask for --overwrite on the next try."""
    from moe_tune.training.run_dir import discard_unstarted

    new = prepare_run_dir(str(tmp_path / "new"), overwrite=False)
    (new / "recipe.yaml").write_text("x")
    (new / "checkpoints").mkdir()
    assert discard_unstarted(new, existed=False) and not new.exists()
    given = tmp_path / "given"  # an empty folder the user made: it stays, empty
    given.mkdir()
    prepare_run_dir(str(given), overwrite=False)
    (given / "recipe.yaml").write_text("x")
    assert discard_unstarted(given, existed=True) and given.is_dir() and not any(given.iterdir())
    started = prepare_run_dir(str(tmp_path / "started"), overwrite=False)
    (started / "recipe.yaml").write_text("x")
    (started / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')  # a logged step: kept to read
    assert not discard_unstarted(started, existed=False) and (started / "recipe.yaml").is_file()


def test_a_folder_put_in_place_is_readable_as_the_umask_allows(tmp_path):
    """transformers writes model.safetensors through a private temporary file (mode 0600)."""
    import os

    from moe_tune.training.run_dir import folder_in_place

    with folder_in_place(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        (tmp / "model.safetensors").chmod(0o600)
        (tmp / "config.json").write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o777 == 0o666 & ~umask
