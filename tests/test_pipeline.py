"""The run pipeline: every step in order, end to end."""

import json
import math

import pytest
import torch

from moe_tune.cli import main

from conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


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


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["full", "lora_experts"])
def test_trains_and_evaluates_on_gpu(tmp_path, capsys, preset):
    """On CUDA, bf16 autocast and the grouped experts kernel, then batched generation."""
    train_bf16_and_evaluate(tmp_path, capsys, preset)


@pytest.mark.slow
def test_the_architecture_is_found_once_per_model(tmp_path, capsys, monkeypatch):
    """The run describes each model it builds or loads once (the weightless plan copy, the
    model it trains, the base it compares with) and hands that description down."""
    from transformers import AutoModelForCausalLM

    from moe_tune.model import arch, loading

    described, built = [], []
    find = arch.find_moe_layers  # describe()'s search, the costly part on a large model
    monkeypatch.setattr(arch, "find_moe_layers", lambda model: described.append(model) or find(model))

    class Counting:
        """transformers' auto class, counting the models it makes."""

        @staticmethod
        def from_pretrained(*args, **kwargs):
            built.append(AutoModelForCausalLM.from_pretrained(*args, **kwargs))
            return built[-1]

        @staticmethod
        def from_config(*args, **kwargs):
            built.append(AutoModelForCausalLM.from_config(*args, **kwargs))
            return built[-1]

    monkeypatch.setattr(loading, "AutoModelForCausalLM", Counting)
    code = main(["train", str(QUICKSTART), f"output_dir={tmp_path / 'run'}", "trainable.preset=lora_experts",
                 "sft.max_steps=2", "sft.eval_steps=1", "data.max_train_rows=16", "eval.max_rows=4",
                 "eval.retention_file=null"])
    assert code == 0, capsys.readouterr().err
    assert len(built) == 3  # the meta copy, the model trained, the base evaluated beside it
    assert [id(m) for m in described] == [id(m) for m in built]


def test_activation_checkpointing_auto_is_on_only_where_the_plan_exceeds_the_machine(monkeypatch):
    from moe_tune.training import pipeline
    from moe_tune.recipe import load_recipe

    recipe = load_recipe(QUICKSTART, ["sft.activation_checkpointing=auto"])
    monkeypatch.setattr(pipeline, "available_bytes", lambda: 1e12)
    setup = pipeline.plan_run(recipe)
    without, other = setup.report.peak_bytes, setup.report.other_peak_bytes
    assert setup.sft_args.gradient_checkpointing is False and other < without
    assert any("auto -> off" in note for note in setup.report.notes)
    monkeypatch.setattr(pipeline, "available_bytes", lambda: without - 1e6)  # just short of the peak
    setup = pipeline.plan_run(recipe)
    assert setup.sft_args.gradient_checkpointing is True and setup.sft_args.activation_checkpointing is True
    assert setup.report.activations.checkpointing and "checkpointing on" in setup.report.activations.basis
    assert setup.report.peak_bytes == pytest.approx(other) and setup.report.other_peak_bytes == pytest.approx(without)
    assert any(f"auto -> on (planned peak {without / 1e9:.3f} GB without it" in note for note in setup.report.notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU default")
def test_bf16_on_a_cpu_is_chosen_by_measuring_its_matmuls(tmp_path, monkeypatch):
    from moe_tune.training import pipeline
    from moe_tune.recipe import load_recipe
    from moe_tune.training.sft_trainer import BF16_PAYS, bf16_speedup

    path = tmp_path / "r.yaml"
    path.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{path: {ROOT}/data/tiny-moe}}\n"
                    f"data: {{train: {ROOT}/data/train.jsonl}}\nsft: {{max_steps: 2}}\n")
    # this CPU's own measure decides: the figure plan_run measured at the shipped model's shapes
    # (hidden 128, experts' intermediate 256), held in bf16_speedup's cache
    bf16_speedup.cache_clear()
    setup = pipeline.plan_run(load_recipe(path))
    measured = bf16_speedup(128, 256)
    assert bf16_speedup.cache_info().hits == 1, "plan_run measured other shapes than the model's"
    on = measured >= BF16_PAYS
    assert setup.sft_args.bf16 is on
    assert setup.report.notes[0].startswith(
        f"bf16 autocast {'on' if on else 'off'}: this CPU's bf16 matmuls run {measured:.2g}x fp32")
    for speedup, on in ((3.9, True), (1.2, False)):  # AMX; a CPU that emulates bf16
        monkeypatch.setattr(pipeline, "bf16_speedup", lambda hidden, intermediate, s=speedup: s)
        setup = pipeline.plan_run(load_recipe(path))
        assert setup.sft_args.bf16 is on and setup.report.notes[0].startswith(f"bf16 autocast {'on' if on else 'off'}")
    setup = pipeline.plan_run(load_recipe(path, ["sft.bf16=false"]))  # the recipe decides: nothing measured
    assert setup.sft_args.bf16 is False and not any("bf16 autocast" in note for note in setup.report.notes)


def test_emulated_bf16_is_told_by_one_call(monkeypatch):
    """Where a CPU emulates bf16 matmuls (AVX2: about 100x slower than fp32, seconds a call at a
    real layer's shape), one bf16 call decides, not sixteen; where the first call is merely slow
    (a kernel compiled, a stall), the best of the alternating calls does."""
    from moe_tune.training import sft_trainer

    for first_bf16, want, calls in ((4.0, 0.01, 2), (0.06, 2.0, 16)):
        timed = []

        def fake(a, b, first=first_bf16):  # fp32 0.04 s a call; bf16 `first` once, then 0.02 s
            timed.append(a.dtype)
            if a.dtype == torch.float32:
                return 0.04
            return first if timed.count(torch.bfloat16) == 1 else 0.02

        monkeypatch.setattr(sft_trainer, "_timed", fake)
        sft_trainer.bf16_speedup.cache_clear()
        assert sft_trainer.bf16_speedup(128, 256) == pytest.approx(want)
        assert len(timed) == calls
    sft_trainer.bf16_speedup.cache_clear()


def test_the_lora_section_warns_only_where_given(tmp_path):
    """A run's recipe.yaml writes every section, lora's defaults too: resuming a full fine-tune
    from it must not warn that a lora section has no effect."""
    from moe_tune.recipe import dump_recipe, load_recipe
    from moe_tune.training.pipeline import plan_run

    def warned(recipe) -> bool:
        return any("a lora section is given" in w for w in plan_run(recipe).report.warnings)

    assert warned(load_recipe(QUICKSTART, ["lora.r=8"]))
    (tmp_path / "recipe.yaml").write_text(dump_recipe(load_recipe(QUICKSTART)))
    assert not warned(load_recipe(tmp_path / "recipe.yaml"))


def test_a_refused_resume_and_a_misdeclared_format_say_one_line_and_nothing_else(tmp_path, capsys):
    from moe_tune.cli import main

    assert main(["train", str(QUICKSTART), f"output_dir={tmp_path / 'none'}", "--resume"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no moe-tune run to resume" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", str(QUICKSTART), "data.format=alpaca"]) == 2  # the shipped data is chat rows
    out, err = capsys.readouterr()
    assert "(declared as data.format: alpaca)" in err and len(err.strip().splitlines()) == 1
