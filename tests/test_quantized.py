"""QLoRA through bitsandbytes: what it quantizes, and never training on without gradients."""

import pytest
import torch

from moe_tune.model.arch import describe
from moe_tune.cli import main
from moe_tune.errors import MoeTuneError
from moe_tune.model.loading import load_model
from moe_tune.model.quantized_experts import quantized_expert_tensors
from moe_tune.recipe import ModelSection, load_recipe
from moe_tune.training.pipeline import make_trainable, plan_run, set_experts_implementation
from moe_tune.training.sft_trainer import build_trainer

from conftest import ROOT, SHIPPED_MODEL

STEPS = ["sft.max_steps=4", "sft.eval_steps=2", "sft.learning_rate=1e-2", "sft.warmup_steps=0",
         "data.max_train_rows=64", "eval.files=[]", "sft.logging_steps=1"]


def recipe_for(tmp_path, *overrides):
    return load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={tmp_path}", *STEPS, *overrides])


FOUR_BIT = ModelSection(path=str(SHIPPED_MODEL), load_in_4bit=True)


@pytest.mark.parametrize("experts", [True, False])
def test_4bit_quantizes_linear_layers_and_with_quantize_experts_the_experts(experts):
    import bitsandbytes as bnb

    model, _ = load_model(str(SHIPPED_MODEL), quantization=FOUR_BIT.model_copy(update={"quantize_experts": experts}))
    arch = describe(model)
    linear4 = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert linear4 and all(".self_attn." in n for n in linear4)  # the tiny model's only nn.Linear layers
    params = dict(model.named_parameters())
    quantized = {f"{arch.layers[0].block}.experts.{name}" for module, name in quantized_expert_tensors(model)
                 if module is model.get_submodule(f"{arch.layers[0].block}.experts")}
    assert quantized == (set(arch.layers[0].expert_params) if experts else set())
    for layer in arch.layers:  # without quantize_experts, as transformers loads them: full precision
        assert all(n not in params for n in layer.expert_params) if experts else \
            all(params[n].dtype == torch.float32 for n in layer.expert_params)
        assert params[layer.router_weight].dtype == torch.float32  # routers stay full precision


@pytest.mark.slow
def test_4bit_lora_keeps_learning_after_evaluation(tmp_path):
    recipe = recipe_for(tmp_path, "model.load_in_4bit=true", "trainable.preset=lora_all")
    model, tokenizer = load_model(str(SHIPPED_MODEL), quantization=FOUR_BIT)
    set_experts_implementation(recipe, model)
    setup, arch = plan_run(recipe), describe(model)
    model, _ = make_trainable(setup, model, arch, tokenizer)
    trainer = build_trainer(recipe, setup.sft_args, model, tokenizer, arch)
    snapshots = []

    class Snapshot(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n})

    trainer.add_callback(Snapshot())
    trainer.train()  # evaluates after steps 2 and 4
    attention = [n for n in snapshots[0] if "self_attn" in n]
    assert attention
    # adapters on the 4-bit layers still move after the evaluation at step 2
    assert any(not torch.equal(snapshots[3][n], snapshots[1][n]) for n in attention)


def train_eval_train(model, guard):
    """One LoRA training step, an eval-mode forward, another training step; the guard looks at
    the gradients of both steps as it does inside the Trainer."""
    from transformers import TrainerState

    x = torch.randint(5, 500, (2, 12))
    state = TrainerState()
    for step in range(2):
        model.train()
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        state.global_step = 2 * step
        guard.on_pre_optimizer_step(None, state, None, model=model)
        model.eval()
        with torch.no_grad():
            model(input_ids=x)
        guard.on_evaluate(None, state, None)


def lora_on_attention(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))


def test_guard_stops_when_gradients_vanish():
    """Undo the CPU work-around: bitsandbytes' packed inference kernel then cuts the graph after
    an eval-mode forward (q/v adapters stop learning), and the guard must stop the run."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from moe_tune.training.callbacks import GradientGuard

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16 kernel path to break the graph")
    model, _ = load_model(str(SHIPPED_MODEL), quantization=FOUR_BIT)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    with pytest.raises(MoeTuneError, match="step 3: 8 trainable tensors stopped receiving gradients after "
                                           "evaluation .*q_proj"):
        train_eval_train(lora_on_attention(model), GradientGuard())


def test_work_around_keeps_every_adapter_learning():
    from moe_tune.training.callbacks import GradientGuard

    model, _ = load_model(str(SHIPPED_MODEL), quantization=FOUR_BIT)
    guard = GradientGuard()
    train_eval_train(lora_on_attention(model), guard)
    # every lora_B of q, v and o in the 4 layers (lora_A gets no gradient while B is still zero),
    # and all of them still learning after the evaluation, or the guard would have raised
    assert len(guard.live) == 4 * 3 and all("lora_B" in n for n in guard.live)


@pytest.mark.slow
def test_8bit_lora_trains(tmp_path, capsys):
    code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path / 'r'}", *STEPS,
                 "model.load_in_8bit=true", "trainable.preset=lora_attention"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("overrides, expected", [
    (["model.load_in_4bit=true", "trainable.preset=full"], "trainable.attention: its linear layers are quantized"),
    (["model.load_in_4bit=true", "trainable.preset=experts_only"],
     "trainable.routed_experts: its expert tensors are quantized (model.quantize_experts) and cannot train in full; "
     "use lora or freeze, or model.quantize_experts: false"),
    (["model.load_in_4bit=true", "model.load_in_8bit=true"], "model: set only one of load_in_4bit and load_in_8bit"),
])
def test_quantization_conflicts(tmp_path, capsys, overrides, expected):
    code = main(["plan", str(ROOT / "recipes" / "quickstart.yaml"), *overrides])
    assert code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("experts", [True, False])
def test_plan_memory_counts_4bit_linears_and_experts(experts):
    from moe_tune.plan.accounting import NF4_BYTES
    from moe_tune.training.pipeline import plan_run

    recipe = ROOT / "recipes" / "quickstart.yaml"
    full = plan_run(load_recipe(recipe, ["trainable.preset=lora_attention"])).report
    q4 = plan_run(load_recipe(recipe, ["trainable.preset=lora_attention", "model.load_in_4bit=true",
                                       f"model.quantize_experts={str(experts).lower()}"])).report
    params = {r.part: r.params for r in full.parts}
    quantized = params["attention"] + (params["routed_experts"] if experts else 0)
    saved = quantized * (4 - NF4_BYTES)  # fp32 -> NF4
    assert full.state_bytes - q4.state_bytes == pytest.approx(saved, rel=1e-3)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_with_lora_on_experts_on_gpu(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path / 'r'}", *STEPS,
                 "model.load_in_4bit=true", "model.dtype=bfloat16", "trainable.preset=lora_all"])
    assert code == 0, capsys.readouterr().err
