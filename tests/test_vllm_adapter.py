"""``export --adapter OUT --for vllm``: PEFT's fused-expert LoRA in vLLM's per-expert layout.

The numeric check is done in transformers: each converted module's delta ``scale * B @ A`` is
added to the per-expert weight of the checkpoint layout (what vLLM's LoRA applies at serving
time), the result is loaded as a standard checkpoint, and its logits must equal the PEFT model's.
Serving the converted adapter in vLLM itself needs vLLM's GPU build (its CPU build's LoRA-on-MoE
path needs triton): ``test_vllm_serves_the_converted_adapter`` is a GPU test.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from moe_tune.cli import main
from moe_tune.errors import MoeTuneError
from moe_tune.export.vllm_adapter import PREFIX, vllm_layout

from conftest import SHIPPED_MODEL
from families import tiny_config


def _base(model_type):
    torch.manual_seed(0)
    if model_type == "shipped":
        return AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL).eval()
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def _adapter(base, folder):
    """A PEFT adapter on the fused experts and two attention projections, with random factors
    (PEFT starts B at zero, which would make every conversion look right)."""
    experts = [name for name, p in base.named_parameters() if p.dim() == 3]
    # down_proj: the shared experts' and dense layers' projections where a family has them
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        target_parameters=experts, init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(folder)
    return model


def _served_by_the_converted_adapter(model_type, tensors, config, dest):
    """The base checkpoint, in its per-expert layout, with each converted module's delta added."""
    fresh = _base(model_type)
    weights = {k: v.clone() for k, v in revert_weight_conversion(fresh, fresh.state_dict()).items()}
    scale = config["lora_alpha"] / config["r"]
    modules = {key.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for key in tensors}
    for module in modules:
        a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
        weights[f"{module}.weight"] += scale * b @ a  # vLLM: y = x W^T + scale * x A^T B^T
    fresh.config.save_pretrained(dest)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dest / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(dest).eval(), len(modules)


@pytest.mark.parametrize("model_type", ["shipped", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2"])
def test_converted_adapter_gives_the_peft_logits(model_type, tmp_path):
    peft_model = _adapter(_base(model_type), tmp_path / "adapter")
    meta = _base(model_type)
    tensors, config = vllm_layout(tmp_path / "adapter", meta)
    (tmp_path / "served").mkdir()
    served, modules = _served_by_the_converted_adapter(model_type, tensors, config, tmp_path / "served")
    fused = [p for p in meta.parameters() if p.dim() == 3]
    per_expert = {key.rsplit(".lora_", 1)[0] for key in tensors if ".experts." in key and "lora_A" in key}
    assert len(per_expert) >= len(fused) * fused[0].shape[0]  # each fused tensor: a module per expert, at least
    ids = torch.randint(3, meta.config.get_text_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, served(input_ids=ids).logits
        plain = _base(model_type)(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_command_writes_the_converted_adapter(shared_run, tmp_path, capsys):
    run = shared_run("lora_experts")  # test_serving serves it
    out = tmp_path / "vllm-adapter"
    assert main(["export", str(run), "--adapter", str(out), "--for", "vllm"]) == 0
    assert "96 LoRA modules in vLLM's per-expert layout" in capsys.readouterr().out  # 4 layers x 8 experts x w1/w2/w3
    tensors, config = vllm_layout(run / "model", _base("shipped"))
    assert "block_sparse_moe.experts.7.w3" in " ".join(tensors)  # the checkpoint's own per-expert names
    assert sorted(config["target_modules"]) == ["w1", "w2", "w3"] and not config["target_parameters"]
    assert main(["export", str(run), "--adapter", str(out), "--for", "vllm"]) == 2  # never replaced silently


@pytest.mark.parametrize("model_type, module, expected", [
    ("shipped", "embed_tokens", r"holds base_model\.model\.model\.embed_tokens\..*, which vLLM's LoRA does not load"),
    ("phimoe", "router", r"adapts model\.layers\.0\.mlp\.router \(router\); vLLM's LoRA serves the attention, "
                         r"shared_experts, dense_mlp and routed experts' projections only")])
def test_an_adapter_on_what_vllm_does_not_adapt_is_refused(model_type, module, expected, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", module])
    get_peft_model(_base(model_type), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(MoeTuneError, match=expected):
        vllm_layout(tmp_path / "adapter", _base(model_type))


def test_families_vllm_reads_as_they_are_are_not_converted(tmp_path):
    base = _base("gpt_oss")
    _adapter(base, tmp_path / "adapter")
    with pytest.raises(MoeTuneError, match="vLLM loads gpt_oss adapters in PEFT's layout as they are"):
        vllm_layout(tmp_path / "adapter", _base("gpt_oss"))


@pytest.mark.slow
@pytest.mark.gpu
def test_vllm_serves_the_converted_adapter(tmp_path):
    """On a GPU with vLLM installed: the converted adapter served by vLLM answers as the merged model."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    vllm = pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    base = _base("shipped")
    peft_model = _adapter(base, tmp_path / "adapter")
    tensors, config = vllm_layout(tmp_path / "adapter", _base("shipped"))
    converted = tmp_path / "converted"
    converted.mkdir()
    save_file(tensors, str(converted / "adapter_model.safetensors"))
    (converted / "adapter_config.json").write_text(__import__("json").dumps(config))
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (merged / name).write_bytes((SHIPPED_MODEL / name).read_bytes())
    prompts = ["<|bos|><|user|>\nWhat city is Telrosia's capital?\n<|assistant|>",
               "<|bos|><|user|>\nWrite dog in capital letters.\n<|assistant|>"]
    params = vllm.SamplingParams(temperature=0, max_tokens=8)
    with_lora = vllm.LLM(str(SHIPPED_MODEL), dtype="float32", enable_lora=True, max_lora_rank=8, enforce_eager=True)
    got = [o.outputs[0].text for o in with_lora.generate(prompts, params, lora_request=LoRARequest("t", 1, str(converted)))]
    del with_lora
    want = [o.outputs[0].text for o in vllm.LLM(str(merged), dtype="float32", enforce_eager=True).generate(prompts, params)]
    assert got == want
