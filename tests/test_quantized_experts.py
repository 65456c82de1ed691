"""Routed experts held in 4 or 8 bits (model/quantized_experts.py): quantized expert by expert as
they load, read one expert at a time by the experts kernel, and numerically the model whose
experts hold the same dequantized values in full precision."""

import pytest
import torch

from moe_tune.model.arch import describe
from moe_tune.model.loading import load_model
from moe_tune.model.quantized_experts import QuantizedExperts, dequantize_experts, quantized_expert_tensors
from moe_tune.plan.modes import base_name, unwrapped
from moe_tune.recipe import load_recipe
from moe_tune.training.pipeline import make_trainable, plan_run, set_experts_implementation

from conftest import ROOT, SHIPPED_MODEL, tiny_checkpoint

# plain attention and SiLU experts (Mixtral), q/k norms (Qwen3-MoE, OLMoE), shared experts
# beside the routed ones (DeepSeek-V2), transposed experts with biases and a clamped gate (gpt-oss)
FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized-experts")
    made = {"mixtral": SHIPPED_MODEL}
    return lambda family: made.get(family) or made.setdefault(family, tiny_checkpoint(family, folder / family))


def adapted(path, out, *overrides, full_precision_experts=False):
    """The model `moe-tune train` builds for a QLoRA recipe (LoRA on attention and experts), LoRA
    factors drawn at random so that every factor gets a gradient; with
    ``full_precision_experts``, its experts dequantized to fp32 parameters before LoRA wraps them."""
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        f"model.path={path}", "model.load_in_4bit=true", "trainable.preset=lora_all", "trainable.router=freeze",
        "eval.files=[]", f"output_dir={out}", *overrides])
    setup = plan_run(recipe)
    setup.run.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(str(path), "float32", recipe.model)
    if full_precision_experts:
        assert dequantize_experts(model, torch.float32) == 2 * len(describe(model).layers)
    set_experts_implementation(recipe, model)
    model, _ = make_trainable(setup, model, describe(model), tokenizer)
    generator = torch.Generator().manual_seed(0)
    for key, factor in sorted(lora_factors(model).items()):
        factor.data = torch.randn(factor.shape, generator=generator, dtype=factor.dtype) * 0.05
    return model


def lora_factors(model) -> dict[tuple[str, str, str], torch.Tensor]:
    """{(module, the parameter it adapts, lora_A or lora_B): factor}: PEFT nests the wrappers of
    one module's parameters in an order that differs with how they are held."""
    from peft.tuners.lora import LoraLayer

    return {(base_name(name), getattr(module, "parameter_name", None) or "weight", side): getattr(module, side)["default"].weight
            for name, module in model.named_modules() if isinstance(module, LoraLayer) for side in ("lora_A", "lora_B")}


def step(model, seed=1):
    """Loss and LoRA gradients of one forward and backward on a fixed batch."""
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if "lora_" in n}
    return loss.item(), {key: factor.grad.clone() for key, factor in lora_factors(model).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_step_through_4bit_experts_equals_one_through_their_values_in_full_precision(family, checkpoints,
                                                                                       monkeypatch, tmp_path):
    quantized = adapted(checkpoints(family), tmp_path / "q")
    reference = adapted(checkpoints(family), tmp_path / "ref", full_precision_experts=True)
    expert_tensors = quantized_expert_tensors(unwrapped(quantized))
    assert len(expert_tensors) == 2 * len(describe(unwrapped(quantized)).layers)
    for module, name in expert_tensors:  # 4 bits a weight: (E, out * in / 2) bytes
        packed = module.parametrizations[name].original
        assert packed.dtype == torch.uint8 and packed[0].numel() * 2 == module.parametrizations[name][0].shape[1:].numel()

    def whole(*args):
        raise AssertionError("a whole expert tensor was dequantized inside the step")

    with monkeypatch.context() as patch:
        patch.setattr(QuantizedExperts, "forward", whole)  # the kernel reads one expert at a time
        loss, grads = step(quantized)
    ref_loss, ref_grads = step(reference)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and any(module.endswith(".experts") for module, _, _ in grads)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-5, atol=1e-7, msg=str(key))
        assert grad.abs().sum() > 0, key
