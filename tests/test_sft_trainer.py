"""moe_tune's trainer: TRL settings, data, the router terms in the logs, and the one reach
into Trainer's internals."""

import json

import pytest
import torch

from moe_tune.errors import MoeTuneError
from moe_tune.recipe import load_recipe
from moe_tune.training.sft_trainer import load_data, sft_config

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
    assert args.bf16 is False  # unless plan_run measured bf16 faster on this CPU (test_pipeline.py)
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


def test_data_formats_and_skipped_rows_reach_the_run(tmp_path):
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


def test_fsdp_in_one_process_is_refused(tmp_path):
    with pytest.raises(MoeTuneError, match="sft.fsdp: FSDP shards a model over several processes"):
        sft_config(minimal(tmp_path, "sft.fsdp=full_shard"), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="accelerate keeps FSDP on a GPU")
def test_fsdp_dropped_on_a_cpu_is_said(tmp_path, monkeypatch, capsys):
    """accelerate turns FSDP off on a CPU without a word; the run says so at start."""
    from moe_tune.model.loading import load_model
    from moe_tune.training.pipeline import plan_run, trainer_for

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch with an FSDP config sets
    recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path}", "eval.files=[]"])
    setup = plan_run(recipe)
    trainer, _ = trainer_for(setup, *load_model(recipe.model.path))
    assert not trainer.is_fsdp_enabled
    assert "note: FSDP was asked for, but accelerate does not shard on CPU" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_reads_back_the_experts_and_routers_trainer_would_miss(tmp_path):
    """Trainer reads a checkpoint back with strict=False, and transformers saves fused experts
    in the family's original layout, under other names: MoeSFTTrainer._load_from_checkpoint
    (its one override of Trainer's internals) loads them through transformers instead. If
    Trainer stops calling it, the perturbed weights below survive the resume and this fails."""
    from safetensors import safe_open

    from moe_tune.model.loading import load_model
    from moe_tune.training.pipeline import plan_run, trainer_for

    recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path}", "sft.max_steps=2", "sft.save_strategy=steps",
                                      "sft.save_steps=2", "sft.eval_strategy=no", "sft.logging_steps=1",
                                      "data.max_train_rows=64", "eval.files=[]"])
    setup = plan_run(recipe)
    trainer, arch = trainer_for(setup, *load_model(recipe.model.path))
    trainer.train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        saved_names = set(f.keys())
    layer = arch.layers[0]
    tensors = [*layer.expert_params, layer.router_weight]
    assert not set(layer.expert_params) & saved_names  # a strict=False load would skip them
    model = trainer.model
    trained = {n: model.get_parameter(n).detach().clone() for n in tensors}
    with torch.no_grad():
        for name in tensors:
            model.get_parameter(name).add_(1.0)
    trainer.train(resume_from_checkpoint=str(checkpoint))  # at max_steps already: loads, trains no step
    for name in tensors:
        assert torch.equal(model.get_parameter(name), trained[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_cross_entropy_is_logged_beside_the_loss_with_the_router_terms(tmp_path, accumulation):
    from moe_tune.model.loading import load_model
    from moe_tune.training.pipeline import plan_run, trainer_for

    recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path}", "sft.max_steps=3", "sft.logging_steps=1",
                                      "sft.eval_strategy=no", "data.max_train_rows=96", "eval.files=[]",
                                      "router.z_loss_coef=0.01", "sft.per_device_train_batch_size=16",
                                      "sft.per_device_eval_batch_size=64", f"sft.gradient_accumulation_steps={accumulation}"])
    trainer, _ = trainer_for(plan_run(recipe), *load_model(recipe.model.path))
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    for h in steps:  # loss = cross-entropy + weighted router terms, per optimizer step
        assert h["loss"] == pytest.approx(h["ce_loss"] + h["router_loss"], rel=1e-4)
        coef = trainer.regularizer.coef
        assert h["router_loss"] == pytest.approx(coef["z_loss"] * h["z_loss"] + coef["aux_loss"] * h["aux_loss"],
                                                 rel=1e-4)
    # evaluation too, with a short last batch (240 rows in batches of 64: 64, 64, 64, 48), which
    # Trainer's eval_loss weighs by its rows: so are the terms logged beside it
    metrics = trainer.evaluate(eval_dataset=trainer.eval_dataset) if accumulation == 1 else None
    if metrics is not None:
        assert len(trainer.eval_dataset) % trainer.args.per_device_eval_batch_size != 0
        assert metrics["eval_loss"] >= metrics["eval_ce_loss"]
        assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce_loss"] + metrics["eval_router_loss"], rel=1e-4)


def test_a_saved_model_and_its_checkpoints_keep_the_config_they_were_loaded_with(tmp_path):
    """TRL turns its aux loss off in the model's config (moe_tune computes the term itself);
    RUN/model and every checkpoint carry the base's load-balancing coefficient all the same."""
    from moe_tune.training.pipeline import run_training

    base = json.loads((ROOT / "data" / "tiny-moe" / "config.json").read_text())
    assert base["router_aux_loss_coef"] > 0  # the shipped base balances its experts
    recipe = minimal(tmp_path, f"output_dir={tmp_path / 'run'}", "sft.max_steps=2", "sft.save_steps=1",
                     "sft.save_total_limit=3", "sft.per_device_train_batch_size=4", "eval.files=[]")
    run = run_training(recipe)
    # sft.logging_steps is 10: the last step is logged all the same (a comparison's gap starts from it)
    assert [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m] == [2]
    saved = [run / "model" / "config.json", *sorted((run / "checkpoints").glob("checkpoint-*/config.json"))]
    assert len(saved) == 3  # the model and the checkpoints of steps 1 and 2
    for path in saved:
        config = json.loads(path.read_text())
        for key in ("router_aux_loss_coef", "output_router_logits"):
            assert config[key] == base[key], (path, key)
    # trained further from RUN/model, the model balances its experts as the base did
    again = minimal(tmp_path, f"output_dir={tmp_path / 'again'}", f"model.path={run / 'model'}", "sft.max_steps=1",
                    "sft.per_device_train_batch_size=4", "eval.files=[]")
    logged = [json.loads(line) for line in (run_training(again) / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("aux_loss", 0) > 0 for m in logged)


def test_global_batch_balancing_logs_the_term_of_the_whole_step(tmp_path):
    """router.balance_scope: global_batch with 2 accumulation steps of 8 rows logs the
    load-balancing term of the 16 rows together, as one micro-batch of 16 gives it; the default
    scope averages two 8-row terms instead."""
    from moe_tune.model.loading import load_model
    from moe_tune.training.pipeline import plan_run, trainer_for

    def first_step(batch, accumulation, scope):
        recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path / scope / str(batch)}", "sft.max_steps=1",
                                          "sft.logging_steps=1", "sft.eval_strategy=no", "data.max_train_rows=64",
                                          "eval.files=[]", f"router.balance_scope={scope}", "trainable.preset=full",
                                          f"sft.per_device_train_batch_size={batch}",
                                          f"sft.gradient_accumulation_steps={accumulation}"])
        trainer, _ = trainer_for(plan_run(recipe), *load_model(recipe.model.path))
        trainer.train()
        return next(h for h in trainer.state.log_history if "loss" in h)

    whole = first_step(16, 1, "micro_batch")
    assert first_step(8, 2, "global_batch")["aux_loss"] == pytest.approx(whole["aux_loss"], rel=1e-5)
    assert first_step(8, 2, "micro_batch")["aux_loss"] != pytest.approx(whole["aux_loss"], rel=1e-4)
