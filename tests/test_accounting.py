"""Parameter accounting on published configs, built on the meta device (nothing downloaded)."""

import json

import pytest
import torch

from moe_tune.plan.accounting import active_params, lora_params, memory_bytes, summary
from moe_tune.model.arch import describe
from moe_tune.cli import main
from moe_tune.model.loading import build_meta_model, load_config

from conftest import ROOT, SHIPPED_MODEL

CONFIGS = ROOT / "moe_tune" / "model" / "configs"  # copies of the published config.json files
# Published counts (model cards). Mistral and Qwen count the input embedding in "active";
# DeepSeek and OpenAI (gpt-oss) leave it out.
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9, "active_params"),
    "qwen3-235b-a22b": (235e9, 22e9, "active_params"),
    "deepseek-v3": (671e9, 37e9, "active_params_no_embed"),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, "active_params"),
    "olmoe-1b-7b": (6.9e9, 1.3e9, "active_params"),
    "deepseek-v2-lite": (15.7e9, 2.4e9, "active_params_no_embed"),
    "gpt-oss-20b": (20.9e9, 3.6e9, "active_params_no_embed"),
}


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def published(request):
    model = build_meta_model(load_config(str(CONFIGS / request.param)))
    return request.param, model, describe(model)


def test_reproduces_published_counts(published):
    name, model, arch = published
    total, active, convention = PUBLISHED[name]
    s = summary(model, arch)
    assert s["total_params"] == pytest.approx(total, rel=0.01)
    assert s[convention] == pytest.approx(active, rel=0.03)
    assert sum(s["parts"].values()) == s["total_params"]


def test_inspect_json_has_the_documented_keys(capsys):
    assert main(["inspect", str(CONFIGS / "deepseek-v3"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert {"architecture", "num_experts", "top_k", "num_moe_layers", "total_params", "active_params",
            "active_params_no_embed", "parts", "memory_gb"} <= set(s)
    assert (s["architecture"], s["num_experts"], s["top_k"], s["num_moe_layers"]) == \
        ("DeepseekV3ForCausalLM", 256, 8, 58)
    assert s["scoring"] == "sigmoid" and s["shared_experts"] is True
    assert set(s["memory_gb"]) == {"full", "freeze_experts", "lora_experts", "qlora"}


def test_inspect_reads_a_recipe_and_prints_a_table(capsys):
    assert main(["inspect", str(ROOT / "recipes" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "MixtralForCausalLM (mixtral)" in out and "top-2" in out and "routed_experts" in out


def test_inspect_offline_hub_id_is_one_line(capsys):
    assert main(["inspect", "no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "not reachable as a Hugging Face Hub id" in err and len(err.strip().splitlines()) == 1


def test_active_params_by_hand_on_the_shipped_model():
    model = build_meta_model(load_config(str(SHIPPED_MODEL)))
    arch = describe(model)
    # 4 layers x 8 experts x (gate_up 512x128 + down 128x256); top-2 of 8 are active
    experts = 4 * 8 * (512 * 128 + 128 * 256)
    total = sum(p.numel() for p in model.parameters())
    assert active_params(model, arch) == total - experts * 6 // 8
    # tied embeddings: the matrix is still needed as LM head, so nothing is left out
    assert active_params(model, arch, with_input_embedding=False) == active_params(model, arch)


def test_memory_estimates_by_hand():
    model = build_meta_model(load_config(str(SHIPPED_MODEL)))
    arch = describe(model)
    total = sum(p.numel() for p in model.parameters())
    experts = 4 * 8 * (512 * 128 + 128 * 256)
    mem = memory_bytes(model, arch, dtype_bytes=2)
    assert mem["full"] == total * 8
    assert mem["freeze_experts"] == experts * 2 + (total - experts) * 8
    assert mem["lora_experts"] == total * 2 + 4 * (lora_params((8, 512, 128)) + lora_params((8, 128, 256))) * 16
    assert mem["full"] > mem["freeze_experts"] and mem["full"] > mem["lora_experts"]


def test_quantized_experts_count_one_dequantized_expert_of_each_projection():
    """The experts kernel dequantizes one expert of each projection at a time, into buffers that
    every layer reuses: the plan counts them once, in the compute dtype (bf16 under autocast)."""
    from types import SimpleNamespace

    from moe_tune.plan.accounting import micro_batch_activations

    model = build_meta_model(load_config(str(SHIPPED_MODEL)))
    arch = describe(model)
    args = SimpleNamespace(per_device_train_batch_size=2, max_length=64, gradient_checkpointing=False, bf16=True,
                           fp16=False)
    quantized, _ = micro_batch_activations(model, arch, "float32", args, quantized_experts=True)
    held_in_bf16, _ = micro_batch_activations(model, arch, "float32", args, frozen_experts_in_bf16=True)
    assert quantized - held_in_bf16 == 2 * (512 * 128 + 128 * 256)  # no whole-layer copy, one expert's buffers


def test_lora_param_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL)
    arch = describe(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    experts = arch.expert_params
    attention = [n.removesuffix(".weight") for n in arch.params_in("attention")]
    expected = sum(lora_params(shapes[n], rank=4) for n in experts)
    expected += sum(lora_params(shapes[n + ".weight"], rank=4) for n in attention)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=attention, target_parameters=experts))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected


def _tiny_moe(vocab: int, family: str = "mixtral", hidden: int = 256):
    """A 3-layer Mixtral (sdpa attention) or gpt-oss (eager attention with sinks, which keeps
    (B, heads, S, S + 1) probabilities) with moe_tune's experts kernel and TRL's fused LM head,
    as training runs it."""
    from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from moe_tune.moe import experts_policy

    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=3,
                 num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if family == "gpt_oss":
        model = GptOssForCausalLM(GptOssConfig(**shape, head_dim=hidden // 8, sliding_window=128))
        assert model.config._attn_implementation == "eager"  # gpt-oss has no sdpa path
    else:
        model = MixtralForCausalLM(MixtralConfig(**shape))
        assert model.config._attn_implementation == "sdpa"
    experts_policy.use_experts_kernel(model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer adds
    return model


def _loss(model, ids, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return -model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.sum()


def _saved_bytes(model, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward of a (2, 512) batch, weights aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, torch.randint(0, 1536, (2, 512)), autocast)
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("autocast", [False, True])
def test_saved_activation_estimate_matches_autograd(autocast, family):
    """The activation term of `plan` against what autograd actually saves for backward, with sdpa
    attention and with eager attention's probabilities."""
    from moe_tune.plan.accounting import saved_activation_bytes

    model = _tiny_moe(1536, family)
    saved = _saved_bytes(model, autocast)
    estimate = saved_activation_bytes(model, describe(model), 1024, 2 if autocast else 4, autocast, False,
                                      seq_len=512)
    assert estimate == pytest.approx(saved, rel=0.05)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("trained", ["experts", "last_layer_experts"])
def test_layers_ahead_of_the_first_trained_tensor_keep_nothing(trained, family):
    """With only routed experts training (lora_experts, experts_only), autograd keeps nothing ahead
    of the first trained tensor: not the first layer's attention, nor any layer before the first
    trained one (a dense first layer, DeepSeek's). The plan, given the trained names, stays above
    what autograd keeps, by at most a quarter: frozen norms, attention and routers keep less than
    trained ones, which the estimate does not take off."""
    from moe_tune.plan.accounting import saved_activation_bytes

    model = _tiny_moe(1536, family)
    arch = describe(model)
    names = arch.params_in("routed_experts")
    names = [n for n in names if n.startswith("model.layers.2.")] if trained == "last_layer_experts" else names
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    saved = _saved_bytes(model, False)
    estimate = saved_activation_bytes(model, arch, 1024, 4, False, False, seq_len=512, trained=names)
    assert saved <= estimate <= 1.25 * saved


@pytest.mark.parametrize(("vocab", "autocast", "family"), [(1536, False, "mixtral"), (40000, True, "mixtral"),
                                                      (1536, True, "gpt_oss")])
def test_activation_peak_matches_what_torch_allocates(vocab, autocast, family, tmp_path):
    """The activation part of `plan`'s peak against the most memory torch's allocations held at once
    in a forward and backward (torch.profiler's memory timeline), each weight's gradient dropped
    as soon as it is made. At these small widths the peak is in the fused LM head's backward, whose
    tile is as wide as TRL's vocabulary chunk (32768) at any vocabulary; above it, its temporaries
    grow with the chunk, not with the vocabulary."""
    from torch.profiler import ProfilerActivity, profile

    from moe_tune.plan.accounting import activation_bytes

    model = _tiny_moe(vocab, family)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        _loss(model, torch.randint(0, vocab, (2, 512)), autocast).backward()
    prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    peak = max(sum(s) for s in sizes) - sum(p.numel() * p.element_size() for p in model.parameters())
    tokens, act = 1024, 2 if autocast else 4
    estimate = activation_bytes(model, describe(model), tokens, act, autocast, False, seq_len=512)
    assert estimate == pytest.approx(peak, rel=0.1)


LOADING_PEAK = """
import json, sys
sys.path.insert(0, {bench!r})
import moe_tune.training.pipeline  # noqa: F401  (imported before the baseline, as the benchmark does)
from throughput import AnonPeak, _anon_gb
from moe_tune.model.loading import load_model
before = _anon_gb()
sampler = AnonPeak()
model, _ = load_model({path!r}, "float32", frozen_experts_in_bf16={bf16_experts!r})
print(json.dumps({{"peak": sampler.stop() - before}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("bf16_experts", [False, True])
def test_loading_peak_counts_the_experts_being_stacked(tmp_path, bf16_experts):
    """`plan`'s loading peak against the most anonymous memory loading holds, measured in a
    process of its own: a 1-layer Qwen3-MoE (64 experts) whose bf16 checkpoint stores each
    expert apart, loaded in fp32. transformers stacks the experts into fused tensors, and the
    largest of them is held twice for a moment, above the weights loading leaves. With the
    frozen experts held in bf16 (``frozen_experts_in_bf16``) the model loads in bf16 and its other weights
    are widened after: while the experts are stacked, those are views of the checkpoint's file.
    The model's attention and embeddings are large beside its narrow experts, so that the two
    ways of counting differ by more than the tolerance."""
    import subprocess
    import sys

    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from moe_tune.plan.accounting import loading_bytes
    from moe_tune.model.loading import experts_stored_apart

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)  # load_model reads the tokenizer first
    torch.manual_seed(0)
    hidden, width = (2048, 64) if bf16_experts else (256, 512)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=512,
                            moe_intermediate_size=width, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=8)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert experts_stored_apart(str(tmp_path / "model"))
    meta = build_meta_model(load_config(str(tmp_path / "model")))
    experts = sum(p.numel() for n, p in meta.named_parameters() if ".experts." in n)
    weights = 4 * sum(p.numel() for p in meta.parameters())
    if bf16_experts:
        weights -= 2 * experts
    estimate = loading_bytes(meta, describe(meta), weights, 2 if bf16_experts else 4, stacked=True,
                             bf16_expert_bytes=2 * experts if bf16_experts else 0)
    code = LOADING_PEAK.format(bench=str(ROOT / "benchmarks"), path=str(tmp_path / "model"), bf16_experts=bf16_experts)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"] * 1e9
    assert estimate == pytest.approx(peak, rel=0.1)
    if bf16_experts:  # the sum of the weights and the stacked halves, as counted without bf16 experts, is too high
        largest = max(p.numel() for n, p in meta.named_parameters() if ".experts." in n)
        assert weights + 2 * largest > 1.2 * peak
    else:
        assert peak > 1.4 * weights  # the stacking term is most of what is measured above the weights


def test_experts_stored_fused_are_not_stacked(tmp_path):
    from safetensors.torch import save_file

    from moe_tune.model.loading import experts_stored_apart

    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 8, 2, dtype=torch.bfloat16)},
              tmp_path / "model.safetensors")
    assert not experts_stored_apart(str(tmp_path))
    assert experts_stored_apart(str(tmp_path / "absent"))  # unreadable here: as most published checkpoints
