"""Routed experts held in 4 or 8 bits (model/quantized_experts.py): quantized expert by expert as
they load, read one expert at a time by the experts kernel, and numerically the model whose
experts hold the same dequantized values in full precision."""

import pytest
import torch

from moe_tune.errors import MoeTuneError
from moe_tune.export import serving
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


def adapted(path, out, bits=4, full_precision_experts=False):
    """The model `moe-tune train` builds for a QLoRA recipe (LoRA on attention and experts), LoRA
    factors drawn at random so that every factor gets a gradient; with
    ``full_precision_experts``, its experts dequantized to fp32 parameters before LoRA wraps them."""
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        f"model.path={path}", f"model.load_in_{bits}bit=true", "trainable.preset=lora_all", "trainable.router=freeze",
        "eval.files=[]", f"output_dir={out}"])
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


@pytest.mark.parametrize("family, bits", [(f, 4) for f in FAMILIES] + [("mixtral", 8)])
def test_a_step_through_quantized_experts_equals_one_through_their_values_in_full_precision(family, bits, checkpoints,
                                                                                            monkeypatch, tmp_path):
    quantized = adapted(checkpoints(family), tmp_path / "q", bits)
    reference = adapted(checkpoints(family), tmp_path / "ref", bits, full_precision_experts=True)
    expert_tensors = quantized_expert_tensors(unwrapped(quantized))
    assert len(expert_tensors) == 2 * len(describe(unwrapped(quantized)).layers)
    for module, name in expert_tensors:  # 4 bits a weight, (E, out * in / 2) bytes; or a byte, (E, out, in)
        packed, shape = module.parametrizations[name].original, module.parametrizations[name][0].shape
        assert packed.dtype == (torch.uint8 if bits == 4 else torch.int8)
        assert packed[0].numel() * 8 // bits == shape[1:].numel()

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


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_expert_read_into_a_buffer_equals_bitsandbytes_own_dequantization(quant_type, double_quant, dtype):
    """On a CPU an expert is dequantized by bitsandbytes' C++ kernel into a buffer the kernel
    reuses (QuantizedExperts._dequantized_into), to the bit what bitsandbytes' own
    dequantize_4bit returns in a fresh tensor."""
    from moe_tune.model.quantized_experts import ExpertsQuantization

    weight = torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, quantization = QuantizedExperts.quantize(weight, ExpertsQuantization(4, quant_type, double_quant))
    assert quantization._native_cpu_kernel(packed, dtype) is not None  # the buffer path is the one tested
    buffer = torch.empty(96, 128, dtype=dtype)
    for e in range(3):
        expected = quantization.expert(packed, e, dtype)  # bitsandbytes' dequantize_4bit
        assert quantization.expert(packed, e, dtype, out=buffer) is buffer
        assert torch.equal(buffer, expected), e


def test_each_expert_is_dequantized_once_a_pass_whatever_its_pieces(checkpoints, monkeypatch, tmp_path):
    """Under bf16 an expert's rows run in pieces (experts_route.ROW_PIECE); a quantized expert is
    dequantized once for all of them, in the forward and again in the backward, and the step is
    the one with a single piece per expert."""
    from moe_tune.moe import experts_route

    model = adapted(checkpoints("mixtral"), tmp_path / "q")
    reads, expert = [], QuantizedExperts.expert  # (packed, e, dtype, out) per read
    monkeypatch.setattr(QuantizedExperts, "expert", lambda self, *a, **k: reads.append(a[1]) or expert(self, *a, **k))
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(2))

    def bf16_step():
        reads.clear()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {key: factor.grad.clone() for key, factor in lora_factors(model).items()}

    whole_loss, whole_grads = bf16_step()
    monkeypatch.setattr(experts_route, "ROW_PIECE", experts_route.ROW_BLOCK)  # 64-row pieces
    calls, pieces = [], experts_route.Route.pieces  # each call: one layer's forward or backward

    def recorded(route):
        calls.append(list(pieces(route)))
        return iter(calls[-1])

    monkeypatch.setattr(experts_route.Route, "pieces", recorded)
    loss, grads = bf16_step()
    experts = sum(len({piece.expert for piece in call}) for call in calls)
    assert sum(len(call) for call in calls) > experts  # some experts' rows ran in several pieces
    assert 0 < len(reads) <= 2 * experts  # up and down: once per expert and pass, not per piece
    assert loss == pytest.approx(whole_loss, rel=1e-4)
    for key, grad in grads.items():  # bf16 matmuls of other row counts: 0.4% of the largest at most here
        torch.testing.assert_close(grad, whole_grads[key], rtol=1e-2, atol=1e-2 * whole_grads[key].abs().max().item(),
                                   msg=str(key))


PEAK = """
import json, sys, threading, time
import torch
from moe_tune.model.loading import load_model
from moe_tune.recipe import ModelSection

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

import transformers.models.qwen3_moe.modeling_qwen3_moe, bitsandbytes  # their imports are not loading
peak, done = [anon()], threading.Event()
before = peak[0]

def sample():  # the anonymous memory's peak while loading (RSS would count the file's mapped pages)
    while not done.is_set():
        peak.append(anon())
        time.sleep(0.002)

threading.Thread(target=sample, daemon=True).start()
section = ModelSection(path=sys.argv[1], **json.loads(sys.argv[2]))
model, _ = load_model(sys.argv[1], "float32", section if section.bits else None)
done.set()
print(json.dumps({"peak": max(peak) - before}))
"""


@pytest.fixture(scope="module")
def experts_heavy_checkpoint(tmp_path_factory):
    """8 Qwen3-MoE layers of 16 experts of 512 x 256, saved in bf16: 200 MB of experts in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024,
                            moe_intermediate_size=512, num_hidden_layers=8, num_experts=16, num_experts_per_tok=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("experts-heavy")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_loading_quantizes_expert_by_expert_never_holding_the_experts_whole(experts_heavy_checkpoint):
    import json
    import subprocess
    import sys

    def peak(**section) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK, str(experts_heavy_checkpoint), json.dumps(section)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak"]

    experts = 8 * 16 * 3 * 512 * 256 * 4  # bytes of the routed experts in fp32 (transformers' own 4-bit loading: 1.1x)
    found = peak(load_in_4bit=True)
    # the experts end at 4 bits (0.13x); loading holds at most a few layers' fp32 tensors beside
    # them (its loader threads), never the experts whole
    assert 0.13 * experts < found < 0.4 * experts, found / experts


@pytest.mark.slow
def test_a_qlora_run_resumes_exports_merged_as_it_trained_and_prunes(tmp_path, capsys):
    """A QLoRA run with 4-bit experts is a normal run: --resume from its adapter checkpoint gives
    the same losses; `export --merged` writes a full-precision checkpoint, LoRA merged into the
    dequantized experts, whose logits are the trained model's; llama.cpp serves it (--gguf);
    prune reads it."""
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moe_tune.cli import main
    from moe_tune.moe.experts_policy import route_lora_through

    run = tmp_path / "run"
    recipe = [str(ROOT / "recipes" / "quickstart.yaml"), "model.load_in_4bit=true", "trainable.preset=lora_all",
              "sft.max_steps=4", "sft.save_strategy=steps", "sft.save_steps=2", "sft.logging_steps=1",
              "sft.learning_rate=5.0e-3", "sft.eval_strategy=no", "data.valid=null", "data.max_train_rows=64",
              "eval.files=[]", "eval.retention_file=null"]
    assert main(["train", *recipe, f"output_dir={run}"]) == 0, capsys.readouterr().err

    def losses():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    whole = losses()
    merged = tmp_path / "merged"
    assert main(["export", str(run), "--merged", str(merged), "--check-rows", "4"]) == 0, capsys.readouterr().err
    saved = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "float32"
    # the trained model: the 4-bit base as it trained, the adapter read through the experts kernel
    section = load_recipe(run / "recipe.yaml").model
    base, _ = load_model(section.path, "float32", section)
    set_experts_implementation(load_recipe(run / "recipe.yaml"), base)
    trained = PeftModel.from_pretrained(base, run / "model")
    assert route_lora_through(trained) == len(describe(base).layers)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    try:  # llama.cpp answers as transformers does from the merged export (make test builds llama.cpp)
        serving.llama_cpp_home()
    except MoeTuneError:
        pass
    else:
        assert main(["export", str(run), "--gguf", str(tmp_path / "run.gguf"), "--data",
                     str(ROOT / "data" / "heldout.jsonl")]) == 0, capsys.readouterr().err
        assert "greedy answers identical to transformers'" in capsys.readouterr().out
    assert main(["prune", str(run), "--keep", "6", "--data", str(ROOT / "data" / "train.jsonl"), "--rows", "16",
                 "--out", str(tmp_path / "pruned"), "--no-base"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_local_experts"] == 6
    # as if killed after checkpoint 2: the adapter (trained in bf16, as TRL trains a quantized
    # model's; PEFT's loading would make it fp32) and the optimizer come back, and it goes on as
    # the uninterrupted run did
    for path in (run / "model", run / "eval", run / "checkpoints" / "checkpoint-4"):
        shutil.rmtree(path, ignore_errors=True)
    assert main(["train", str(run), "--resume"]) == 0, capsys.readouterr().err
    resumed = losses()
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed[3] == pytest.approx(whole[3], rel=1e-4), 3
    assert resumed[4] == pytest.approx(whole[4], rel=1e-4), 4
