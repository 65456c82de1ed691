"""Frozen routed experts held in the bf16 their checkpoint stores them in
(experts_policy.holds_frozen_experts_in_bf16, loading.load_model's ``frozen_experts_in_bf16``): the same
numbers as fp32 weights under bf16 autocast, in training, evaluation and the saved model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_tune.moe import experts_policy
from moe_tune.model.arch import describe
from moe_tune.model.loading import load_model
from moe_tune.recipe import load_recipe
from moe_tune.training.pipeline import plan_run, trainer_for

from conftest import shipped_in_bf16

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def bf16_copy(tmp_path_factory) -> Path:
    """The shipped tiny model stored in bf16, as published checkpoints are."""
    return shipped_in_bf16(tmp_path_factory.mktemp("tiny-moe-bf16"))


def expert_names(model) -> list[str]:
    return describe(model).expert_params


def test_loaded_in_bf16_equal_to_fp32_elsewhere_fp32(bf16_copy):
    ref, _ = load_model(str(bf16_copy), "float32")
    model, _ = load_model(str(bf16_copy), "float32", frozen_experts_in_bf16=True)
    experts = set(expert_names(model))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name in experts else torch.float32), name
        assert torch.equal(p.float(), ref.get_parameter(name)), name
    assert model.config.dtype == torch.float32
    # evaluation runs fp32 without autocast: moe_tune's kernel widens each used expert's slice on use
    for m in (model, ref):
        assert experts_policy.use_experts_kernel(m)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def train_three_steps(recipe, frozen_experts_in_bf16: bool):
    setup = plan_run(recipe)
    trainer, _ = trainer_for(setup, *load_model(recipe.model.path, recipe.model.dtype,
                                                frozen_experts_in_bf16=frozen_experts_in_bf16))
    # PEFT initialises LoRA factors in the base weight's dtype before widening them to fp32, so
    # the two runs' random A factors differ by bf16 rounding: both start from the same ones
    g = torch.Generator().manual_seed(0)
    for name, p in sorted(trainer.model.named_parameters()):
        if "lora_A" in name:
            p.data = 0.01 * torch.randn(p.shape, generator=g)
    trainer.train()
    return setup, trainer


@pytest.mark.parametrize("preset", ["freeze_experts", "lora_experts"])
def test_training_is_bit_for_bit_the_fp32_experts_run(bf16_copy, tmp_path, preset):
    def recipe(name):
        return load_recipe(QUICKSTART, [f"output_dir={tmp_path / name}", f"model.path={bf16_copy}",
                                        f"trainable.preset={preset}", "sft.bf16=true", "sft.max_steps=3",
                                        "sft.per_device_train_batch_size=8", "sft.eval_strategy=no",
                                        "eval.files=[]"])
    narrowed, trainer = train_three_steps(recipe("bf16"), frozen_experts_in_bf16=True)
    assert narrowed.frozen_experts_in_bf16 and narrowed.report.frozen_experts_in_bf16
    _, ref = train_three_steps(recipe("fp32"), frozen_experts_in_bf16=False)
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and trained.keys() == {n for n, p in ref.model.named_parameters() if p.requires_grad}
    for name, p in trained.items():
        assert torch.equal(p, ref.model.get_parameter(name)), name
    # the plan counts the frozen experts at 2 bytes: smaller than the same run's fp32 plan by 2 bytes each
    source = AutoModelForCausalLM.from_pretrained(bf16_copy)
    experts = sum(source.get_parameter(n).numel() for n in expert_names(source))
    plain = plan_run(load_recipe(QUICKSTART, [f"output_dir={tmp_path / 'plain'}", f"trainable.preset={preset}",
                                              "sft.bf16=true"]))  # the shipped fp32 checkpoint: not narrowed
    assert not plain.frozen_experts_in_bf16
    assert plain.report.state_bytes - narrowed.report.state_bytes == 2 * experts
    if preset == "freeze_experts":  # the saved model: the experts as the checkpoint stores them
        trainer.save_model(str(tmp_path / "saved"))
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
        for name in expert_names(saved):
            assert torch.equal(saved.get_parameter(name), source.get_parameter(name).float()), name


@pytest.mark.parametrize("override", ["trainable.preset=full", "sft.bf16=false", "model.experts_implementation=grouped_mm"])
def test_not_narrowed_where_it_would_not_be_exact_or_not_pay(bf16_copy, tmp_path, override):
    recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path}", f"model.path={bf16_copy}",
                                      "trainable.preset=freeze_experts", "sft.bf16=true", override])
    assert not plan_run(recipe).frozen_experts_in_bf16


def test_a_checkpoint_with_any_fp32_tensor_is_not_narrowed(tmp_path):
    """Loading in bf16 would round an fp32 norm or router bias: only all-bf16 checkpoints."""
    from safetensors.torch import save_file

    experts = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 4, 3, dtype=torch.bfloat16)}
    save_file(experts, tmp_path / "model.safetensors")
    assert experts_policy.stored_in_bf16(str(tmp_path))
    save_file({**experts, "model.norm.weight": torch.ones(3)}, tmp_path / "model.safetensors")
    assert not experts_policy.stored_in_bf16(str(tmp_path))
