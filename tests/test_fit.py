"""`moe-tune plan --gpu-memory`: peak memory per GPU under DDP, FSDP2 and ZeRO-3, checked by hand
on the shipped model and on Qwen3-30B-A3B's published config (meta device, nothing downloaded)."""

import json

import pytest
import torch

from moe_tune.plan.accounting import loss_head_bytes, micro_batch_activations, saved_activation_bytes
from moe_tune.cli import main
from moe_tune.plan.fit import GB, fit_report, parse_memory, per_device, target
from moe_tune.recipe import load_recipe
from moe_tune.training.pipeline import plan_run

from conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
QWEN = ROOT / "recipes" / "hub" / "qwen3-30b-a3b-lora-experts.yaml"
QWEN_CONFIG = f"model.path={ROOT / 'moe_tune' / 'model' / 'configs' / 'qwen3-30b-a3b'}"


@pytest.fixture(scope="module")
def tiny():
    return plan_run(load_recipe(QUICKSTART))  # float32, no mixed precision, everything trains


@pytest.fixture(scope="module")
def qwen_lora():
    return plan_run(load_recipe(QWEN, [QWEN_CONFIG]))  # bf16, LoRA r=8 on the experts


@pytest.fixture(scope="module")
def qwen_full():
    return plan_run(load_recipe(QWEN, [QWEN_CONFIG, "trainable.preset=full"]))


def gpu_activations(setup) -> float:
    """One micro-batch's activations on a GPU, where the experts run as transformers' grouped ops."""
    return micro_batch_activations(setup.meta, setup.arch, setup.report.memory_dtype, setup.sft_args,
                                   on_gpu=True)[0]


def test_ddp_is_the_single_device_plan_on_a_gpu(tiny, qwen_lora):
    for setup in (tiny, qwen_lora):
        ddp = per_device(setup, 8)["ddp"]
        assert ddp["peak"] == setup.report.state_bytes + gpu_activations(setup)
        if not torch.cuda.is_available():  # planned on a CPU, where the two differ both ways:
            assert setup.report.activations.bytes != gpu_activations(setup)
            tokens = setup.sft_args.per_device_train_batch_size * setup.sft_args.max_length
            saved = [saved_activation_bytes(setup.meta, setup.arch, tokens, 2, True, False, on_gpu=gpu)
                     for gpu in (False, True)]
            assert saved[0] < saved[1]  # moe_tune's experts node keeps less than the grouped ops
            heads = [loss_head_bytes(setup.meta, tokens, 2, on_gpu=gpu) for gpu in (False, True)]
            assert heads[0] > heads[1]  # TRL's head without Triton holds fp32 temporaries


def test_sharded_by_hand_on_the_shipped_model(tiny):
    # hidden 128, 4 layers; attention q, o 128x128 and k, v 64x128; router 8x128; experts
    # 8 x (gate_up 512x128 + down 128x256); two norms of 128 per layer
    attention, router, experts, norms = 2 * 128 * 128 + 2 * 64 * 128, 8 * 128, 8 * (512 * 128 + 128 * 256), 2 * 128
    total = sum(r.params for r in tiny.report.parts)
    assert tiny.report.state_bytes == total * 16  # fp32 weight, gradient and 2 AdamW moments
    rows = per_device(tiny, 4)
    acts = gpu_activations(tiny)
    for key in ("fsdp2", "zero3"):
        assert rows[key]["states"] == total * 16 / 4  # no upcast: the weights are fp32 already
        assert rows[key]["activations"] == acts  # each GPU runs its own micro-batch
    # gathered whole with its gradients (fp32, 4 + 4 bytes a parameter): a decoder layer, an MoE block
    assert rows["fsdp2"]["gathered"] == (attention + router + experts + norms) * 8
    assert rows["zero3"]["gathered"] == (router + experts) * 8
    assert rows["fsdp2"]["peak"] == total * 4 + acts + (attention + router + experts + norms) * 8
    # FSDP2 x EP over the 4 GPUs (4 divides the 8 experts): the same shards; a layer gathers its
    # dense part and its own 2 experts
    assert rows["fsdp2_ep"]["states"] == rows["fsdp2"]["states"]
    assert rows["fsdp2_ep"]["gathered"] == (attention + router + experts / 4 + norms) * 8
    assert "fsdp2_ep" not in per_device(tiny, 3)  # 3 GPUs share no divisor with 8 experts


MIXTRAL = [f"model.path={ROOT / 'moe_tune' / 'model' / 'configs' / 'mixtral-8x7b'}", "model.load_in_4bit=false"]


def test_mixtral_8x7b_names_a_sharded_layout_that_fits(capsys):
    """Mixtral-8x7B (94 GB in bf16) fits no single 80 GB GPU; on 8 the plan names the layout."""
    recipe = str(ROOT / "recipes" / "hub" / "mixtral-8x7b-base-chatml.yaml")
    assert main(["plan", recipe, *MIXTRAL, "trainable.preset=lora_experts", "--gpus", "8", "--gpu-memory",
                 "80GB", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["per_device"]
    assert not fit["strategies"]["ddp"]["fits"] and fit["strategies"]["fsdp2"]["fits"]
    assert fit["strategies"]["fsdp2_ep"]["gathered_gb"] < fit["strategies"]["fsdp2"]["gathered_gb"] / 4
    assert "use recipes/accelerate/fsdp2.yaml or parallel.fsdp_size: 8" in fit["verdict"]
    # the recipe's parallel section is the layout judged, on as many GPUs as it names
    assert main(["plan", recipe, *MIXTRAL, "trainable.preset=full", "parallel.fsdp_size=16", "parallel.ep_size=8",
                 "--gpu-memory", "80GB", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["per_device"]
    assert (fit["gpus"], fit["strategy"], fit["fits"]) == (16, "fsdp2_ep", True)
    assert fit["verdict"].startswith("fits: FSDP2 x EP peaks at")


def test_sharded_by_hand_on_qwen3_30b(qwen_lora, qwen_full):
    # per layer: attention q 4096x2048, k, v 512x2048, o 2048x4096; router 128x2048; 128 experts of
    # gate_up 1536x2048 + down 2048x768; norms 2 x 2048 + q_norm, k_norm 128
    attention, router = 2 * 4096 * 2048 + 2 * 512 * 2048, 128 * 2048
    experts, norms = 128 * (1536 * 2048 + 2048 * 768), 2 * 2048 + 2 * 128
    lora = 8 * 128 * (1536 + 2048) + 8 * 128 * (2048 + 768)  # r=8 per expert on both tensors
    total = qwen_lora.report.total_params
    assert qwen_lora.report.trainable_params == 48 * lora
    rows = per_device(qwen_lora, 8)
    state = total * 2 + 48 * lora * 16  # bf16 weights, fp32 adapters with gradient and moments
    assert rows["fsdp2"]["states"] == pytest.approx(state / 8)
    # the layer's bf16 weights, plus its adapters' fp32 weights and gradients
    assert rows["fsdp2"]["gathered"] == pytest.approx((attention + router + experts + norms) * 2 + lora * 8)
    assert rows["zero3"]["gathered"] == pytest.approx((router + experts) * 2 + lora * 8)
    # full fine-tuning under bf16 mixed precision: sharded, each weight trains in fp32 (16 bytes)
    # where DDP keeps bf16 weight, gradient and moments (8 bytes)
    full = per_device(qwen_full, 8)
    assert full["ddp"]["states"] == total * 8
    assert full["fsdp2"]["states"] == total * 16 / 8
    assert full["fsdp2"]["gathered"] == (attention + router + experts + norms) * (2 + 2)


def test_qwen3_30b_full_fine_tune_on_8_x_80gb(qwen_full):
    fit = fit_report(qwen_full, target("80GB", 8, None))
    s = fit["strategies"]
    assert not s["ddp"]["fits"] and s["ddp"]["peak_gb"] > 240  # 30.5B x 8 bytes on every GPU
    assert s["fsdp2"]["fits"] and s["zero3"]["fits"]  # 30.5B x 16 bytes / 8 + activations + a layer
    assert fit["fits"] and "DDP does not; use recipes/accelerate/fsdp2.yaml" in fit["verdict"]
    ddp = fit_report(qwen_full, target("80GB", 8, str(ROOT / "recipes" / "accelerate" / "ddp.yaml")))
    assert not ddp["fits"] and "first change: use recipes/accelerate/fsdp2.yaml" in ddp["verdict"]


def test_what_to_change_when_it_does_not_fit(qwen_full, qwen_lora):
    # four GPUs: the sharded states alone (122 GB each) do not fit; LoRA would, or 7 GPUs
    fit = fit_report(qwen_full, target("80GiB", 4, None))
    assert not fit["fits"]
    assert "trainable.preset: lora_experts" in fit["verdict"] and "; or 7 GPUs of 85.899 GB" in fit["verdict"]
    # activations dominate: checkpointing off, 4 rows of 2048 tokens take 84 GB on a GPU; with it,
    # 1.7 GB a row, and 5.65 GB are left beside the states
    no_ckpt = plan_run(load_recipe(QWEN, [QWEN_CONFIG, "sft.activation_checkpointing=false"]))
    fit = fit_report(no_ckpt, target("40GB", 2, None))
    assert "first change: sft.activation_checkpointing: true and sft.per_device_train_batch_size: 3 (now 4" \
        in fit["verdict"]
    assert fit_report(qwen_lora, target("80GB", 1, None))["verdict"].startswith("fits on one GPU")


def test_gpu_memory_units():
    assert parse_memory("80GB") == (80e9, "80 GB")
    assert parse_memory("80") == (80e9, "80 GB")
    assert parse_memory("141.5GB")[0] == 141.5e9
    assert parse_memory("80GiB") == (80 * 2**30, "80 GiB = 85.899 GB")


def test_accelerate_config_sets_the_strategy_and_the_gpus():
    for name, strategy in (("ddp", "ddp"), ("fsdp2", "fsdp2"), ("zero3", "zero3")):
        tgt = target("80GB", None, str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
        assert (tgt.strategy, tgt.gpus, tgt.notes) == (strategy, 8, [])  # num_processes: 8
    assert target("80GB", 16, str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml")).gpus == 16


def test_json_and_table(capsys):
    assert main(["plan", str(QUICKSTART), "--gpus", "4", "--gpu-memory", "1GB",
                 "--accelerate-config", str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml"), "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["per_device"]
    assert (fit["gpus"], fit["strategy"], fit["fits"]) == (4, "fsdp2", True)
    for row in fit["strategies"].values():
        assert set(row) == {"states_gb", "activations_gb", "gathered_gb", "peak_gb", "fits"}
    assert main(["plan", str(QUICKSTART), "--gpus", "4", "--gpu-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "per GPU, 4 GPUs of 1 GB" in out and "ZeRO-3" in out and out.strip().splitlines()[-1].startswith("fits")
