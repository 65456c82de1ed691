"""The run pipeline's own decisions: TRL settings, the run folder."""

import json
import math

import pytest
import torch

from moe_tune.cli import main
from moe_tune.errors import MoeTuneError
from moe_tune.recipe import load_recipe
from moe_tune.train import prepare_run_dir, sft_config

from conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def minimal(tmp_path, *overrides):
    path = tmp_path / "r.yaml"
    path.write_text(f"output_dir: x\nmodel: {{path: {ROOT}/data/tiny-moe}}\n"
                    f"data: {{train: {ROOT}/data/train.jsonl}}\nsft: {{max_steps: 2}}\n")
    return load_recipe(path, list(overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_cpu_defaults_replace_trl_gpu_defaults(tmp_path):
    recipe = minimal(tmp_path)
    args = sft_config(recipe, tmp_path)
    assert args.activation_checkpointing is False and args.optim == "adamw_torch_fused"
    assert args.bf16 is torch.cpu._is_amx_tile_supported()  # bf16 matmuls are fast only on AMX
    assert args.assistant_only_loss is True and args.max_steps == 2
    assert args.output_dir == str(tmp_path / "checkpoints") and args.seed == recipe.seed


@pytest.mark.parametrize("key", ["gradient_checkpointing", "activation_checkpointing"])
def test_recipe_choice_wins_under_either_name(tmp_path, key):
    recipe = minimal(tmp_path, f"sft.{key}=true", "sft.bf16=true")
    args = sft_config(recipe, tmp_path)
    assert args.activation_checkpointing is True and args.bf16 is True


def test_both_checkpointing_names_is_an_error(tmp_path):
    with pytest.raises(MoeTuneError, match="set only one of sft.activation_checkpointing"):
        minimal(tmp_path, "sft.activation_checkpointing=false", "sft.gradient_checkpointing=true")


def test_eval_strategy_needs_valid_data(tmp_path):
    recipe = load_recipe(QUICKSTART, ["data.valid=null"])
    with pytest.raises(MoeTuneError, match="data.valid is not"):
        sft_config(recipe, tmp_path)


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


def test_data_formats_and_skipped_rows_reach_the_run(tmp_path):
    import json

    from moe_tune.train import load_data

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name the capital of Falfenia.", "output": "Zorbro"},
                                  {"instruction": "broken"},
                                  {"instruction": "What comes after 17?", "input": "", "output": "18"}]))
    recipe = minimal(tmp_path, f"data.train={alpaca}", "data.skip_bad_rows=true", "data.format=alpaca")
    train, valid = load_data(recipe, tmp_path)
    assert valid is None and train.column_names == ["messages"]
    assert [m["content"] for m in train[1]["messages"]] == ["What comes after 17?", "18"]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["skipped_rows"] == {str(alpaca): 1}
    assert "row 2" in report["messages"][str(alpaca)][0] and "'output'" in report["messages"][str(alpaca)][0]
    strict = minimal(tmp_path, f"data.train={alpaca}")
    with pytest.raises(MoeTuneError, match=r"alpaca.json: row 2: field 'output' missing"):
        load_data(strict, tmp_path / "strict")


def train_bf16_and_evaluate(tmp_path, capsys, preset):
    """30 steps under bf16 autocast through moe_tune's experts kernel, then evaluation."""
    run = tmp_path / "r"
    code = main(["train", str(QUICKSTART), f"output_dir={run}", f"trainable.preset={preset}", "sft.bf16=true",
                 "sft.max_steps=30", "sft.warmup_steps=0", "sft.logging_steps=5", "sft.eval_steps=15",
                 "eval.max_rows=32", "eval.compare_base=false"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert any((run / "eval").glob("*.json"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
@pytest.mark.parametrize("preset", ["full", "lora_experts"])
def test_trains_and_evaluates_in_bf16_on_cpu(tmp_path, capsys, preset):
    """The CPU default where there are AMX tiles: bf16 autocast, each expert's rows padded."""
    train_bf16_and_evaluate(tmp_path, capsys, preset)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["full", "lora_experts"])
def test_trains_and_evaluates_on_gpu(tmp_path, capsys, preset):
    """On CUDA, bf16 autocast and the grouped experts kernel, then batched generation."""
    train_bf16_and_evaluate(tmp_path, capsys, preset)
