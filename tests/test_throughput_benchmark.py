"""benchmarks/throughput.py's set-up: the real layer shapes it builds, and the FLOPs it counts."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from moe_tune.plan.accounting import expert_intermediate
from moe_tune.model.arch import describe
from moe_tune.model.loading import build_meta_model

from conftest import ROOT, SHIPPED_MODEL, tiny_checkpoint


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPERTS = {"mixtral-8x7b": (8, 2, 14336), "qwen3-30b-a3b": (128, 8, 768), "olmoe-1b-7b": (64, 8, 1024),
           "deepseek-v2-lite": (64, 6, 1408), "gpt-oss-20b": (32, 4, 2880)}


@pytest.mark.parametrize("shape", sorted(EXPERTS))
def test_a_published_shape_keeps_its_layers_and_takes_the_shipped_vocabulary(bench, shape):
    assert shape in bench.SHAPES
    config = bench.shape_config(shape, 2, AutoTokenizer.from_pretrained(SHIPPED_MODEL))
    model = build_meta_model(config)
    arch = describe(model)
    text = config.get_text_config()
    assert text.num_hidden_layers == 2 and text.vocab_size == 1536
    assert model.get_input_embeddings().weight.shape[0] == 1536
    layer = arch.layers[0]  # the expert width read off the parameters, as plan and the benchmark read it
    assert (layer.num_experts, layer.top_k, expert_intermediate(model, arch)) == EXPERTS[shape]


def test_flops_count_weight_gradients_only_where_weights_train(bench):
    dims = {"hidden": 64, "intermediate": 32, "experts": 8, "top_k": 2}
    rows = [{"part": "attention", "params": 100, "mode": "train", "trainable": 100},
            {"part": "routed_experts", "params": 800, "mode": "train", "trainable": 800},
            {"part": "embeddings", "params": 50, "mode": "train", "trainable": 50}]
    active = 100 + 800 * 2 // 8
    every = {"parts": rows, "backward_params": active}  # the backward reaches every layer
    assert bench.flops_per_token(every, active, dims) == 6 * active  # full: 2 + 2 + 2 per weight
    frozen = [dict(r, mode="freeze", trainable=0) if r["part"] == "routed_experts" else r for r in rows]
    assert bench.flops_per_token({**every, "parts": frozen}, active, dims) == 4 * active + 2 * 100
    lora = [dict(r, mode="freeze", trainable=0) for r in rows]
    lora[1] = dict(rows[1], mode="lora", trainable=16)  # LoRA factors of all 8 experts; 2 are active
    assert bench.flops_per_token({**every, "parts": lora}, active, dims) == 4 * (active + 4) + 2 * 4
    # the backward stops at the first trained tensor: only the experts' 200 active weights pass gradients
    assert bench.flops_per_token({"parts": lora, "backward_params": 200}, active, dims) == \
        2 * (active + 4) + 2 * (200 + 4) + 2 * 4


@pytest.mark.parametrize("strategy", ["full", "freeze_experts", "lora_attention", "lora_experts"])
def test_the_flop_count_is_what_a_training_step_runs(bench, strategy, tmp_path):
    """flops_per_token x tokens against torch's FLOP counter over one `moe-tune train` step: its
    matmuls, forward and backward (attention's score and value products aside: the count leaves
    them out), at a Qwen3-MoE whose first layer is dense, where lora_experts' backward reaches
    neither that layer nor the second layer's attention (nor, in that layer, the projections that
    read the hidden states). TRL's fused LM head recomputes its logits in the backward (one more
    2 V H per scored token), which the count, of what a step needs, leaves out; it scores the 63
    of 64 tokens of a row that have a next one. The count's one known excess: where the first
    layer's attention trains (lora_attention), its q/k/v projections pass no gradient back to the
    embeddings, though the count has them do so. The step runs in fp32: under bf16 autocast (where
    the plan measures fast bf16 matmuls, as on AMX CPUs) the experts kernel zero-pads each
    expert's rows (``experts_route.padded_rows``), work the count of what a step needs leaves out."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vocab, hidden = 1536, 256
    tiny_checkpoint("qwen3_moe", tmp_path / "model", num_hidden_layers=3, mlp_only_layers=[0], hidden_size=hidden,
                    intermediate_size=1024, moe_intermediate_size=128, num_experts=8)
    bench.build_data(tmp_path / "train.jsonl", 4, 64)
    report = bench.plan_report(strategy, tmp_path, 2, 64, "float32")
    needed = bench.flops_per_token(report, bench.active_params(tmp_path), bench.layer_dims(tmp_path)) * 2 * 64
    trainer = bench.moe_tune_trainer(strategy, tmp_path, 1, 2, 64, "float32", sft={"bf16": False})
    assert not trainer.args.bf16
    # TRL's head adds its gradients up in place (addmm_), which the counter does not know
    addmm_ = {torch.ops.aten.addmm_: lambda acc, a, b, out_shape=None, **_: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        trainer.train()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if "scaled_dot_product" not in str(op))
    if strategy == "lora_attention":
        reads_input = sum(p.numel() for n, p in trainer.model.named_parameters()  # PEFT's names
                          if ".layers.0.self_attn." in n and n.endswith(".base_layer.weight")
                          and n.split(".")[-3] in ("q_proj", "k_proj", "v_proj"))
        assert reads_input > 0
        needed -= 2 * reads_input * 2 * 64
    assert matmuls == pytest.approx(needed + 2 * vocab * hidden * 2 * 63, rel=0.01)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_weights_mapped_from_the_checkpoint_count_as_training_memory(bench, tmp_path):
    """A weight loaded in its checkpoint's dtype can stay a view of the safetensors file: file
    pages, not anonymous memory. The benchmark counts what of the model's folder is mapped and
    resident, and nothing mapped from elsewhere."""
    import mmap

    import torch

    (tmp_path / "model").mkdir()
    maps = []
    for path in (tmp_path / "model" / "model.safetensors", tmp_path / "elsewhere.bin"):
        path.write_bytes(b"\1" * (8 << 20))  # 8 MiB each
        with path.open("rb") as f:
            maps.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
    assert bench._mapped_gb(tmp_path / "model") < 1e-3  # mapped, not yet read
    for m in maps:  # read, as a forward reads a weight
        torch.frombuffer(m, dtype=torch.uint8).sum()
    assert bench._mapped_gb(tmp_path / "model") == pytest.approx((8 << 20) / 1e9, rel=0.01)
    for m in maps:
        m.close()


def test_the_baseline_trains_in_trls_precision_or_in_the_one_moe_tune_chose(bench, tmp_path):
    """TRL's default is bf16 autocast, slow where a CPU emulates bf16 matmuls; with
    ``--baseline-precision moe_tune`` TRL takes the bf16 choice of moe_tune's plan for the shape."""
    bench.build_model(tmp_path / "model", "benchmark", layers=1)
    bench.build_data(tmp_path / "train.jsonl", rows=2, seq=64)
    plan = bench.plan_report("lora_attention", tmp_path, 1, 64, "float32")
    # the choice the plan measured and stated on this machine (no GPU: it always states one)
    assert plan["notes"][0].startswith(f"bf16 autocast {'on' if plan['bf16'] else 'off'}:")
    trl_default = bench.trl_trainer("lora_attention", tmp_path, 1, 1, 64, "float32")
    assert trl_default.args.bf16 is True
    for bf16 in (False, True):
        assert bench.trl_trainer("lora_attention", tmp_path, 1, 1, 64, "float32", bf16=bf16).args.bf16 is bf16


@pytest.mark.slow
def test_loading_and_training_peaks_are_measured_apart(bench, tmp_path):
    """The training peak, which the plan is compared with, and loading's own, each at least the
    fp32 weights that both phases hold (a 1-layer benchmark model, bf16 on disk)."""
    bench.build_model(tmp_path / "model", "benchmark", layers=1)
    bench.build_data(tmp_path / "train.jsonl", rows=4, seq=64)
    # in its own process, as the benchmark measures memory (in this one, freed heap would be reused)
    args = SimpleNamespace(device="cpu", steps=1, warmup=1, batch=2, seq=64, dtype="float32", checkpointing=False)
    result = bench.measure("trl", "full", tmp_path, args, memory=True, trl_bf16=False)
    weights = 4 * (tmp_path / "model" / "model.safetensors").stat().st_size / 2 / 1e9
    assert result["load_peak_gb"] >= 0.9 * weights
    assert result["peak_mem_gb"] >= 0.9 * weights * 4  # full fine-tuning: + gradients and AdamW's two moments


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads /proc/cpuinfo (Linux)")
def test_the_cpu_is_named_with_its_family_and_model(bench):
    """VMs give different CPUs one name, so a result names the CPU's family and model too."""
    first = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    if "model name" not in first:
        pytest.skip("this CPU reports no model name")
    name = bench.cpu_model()
    assert name.startswith(first["model name"])
    if "cpu family" in first:
        assert name.endswith(f"(family {first['cpu family']} model {first['model']})")


@pytest.mark.slow
@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_the_training_peak_meets_the_plan_whatever_dtype_the_checkpoint_stores(bench, tmp_path, stored):
    """freeze_experts on a 2-layer benchmark model saved in bf16 (as published checkpoints are) or
    in float32 (as moe_tune's own full fine-tunes are): the measured training peak against the
    plan's. A float32 checkpoint's file mapping once stayed open, every page loading read
    resident, the stacked per-expert tensors among them: 1.4-1.7x the plan."""
    bench.build_model(tmp_path / "model", "benchmark", layers=2, stored=stored)
    bench.build_data(tmp_path / "train.jsonl", rows=8, seq=256)
    args = SimpleNamespace(device="cpu", steps=1, warmup=1, batch=4, seq=256, dtype="float32", checkpointing=False)
    plan = bench.plan_report("freeze_experts", tmp_path, 4, 256, "float32")
    result = bench.measure("moe_tune", "freeze_experts", tmp_path, args, memory=True)
    assert 0.8 <= result["peak_mem_gb"] / plan["peak_gb"] <= 1.25, (result, plan["peak_gb"])
