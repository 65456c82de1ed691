"""Every MoE family: the architecture layer finds routers and experts, and `moe-tune train`
runs a few steps with the router frozen and LoRA on the experts; what a run saves and exports
carries the source checkpoint's config.

Tiny random models come from tests/families.py; they use the shipped tokenizer.
"""

import gc
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe_tune.model.arch import describe, moe_shape, text_config
from moe_tune.cli import main
from moe_tune.errors import MoeTuneError

from conftest import ROOT, tiny_checkpoint
from families import FAMILIES, UNSUPPORTED, tiny_config
from test_prune import differing_keys

# Families transformers builds, whose MoE the architecture layer does not take apart (yet).
ARCH_UNSUPPORTED = {
    "inkling_text": "shared experts are a fused 3-D stack, and the router scores 2 more experts than "
                    "there are routed ones",
    "longcat_flash": "zero-computation experts: gate_up_proj and down_proj have different expert counts",
    "nemotron_h": "the MoE block has no router module named gate or router",
    "zaya": "the router is an MLP with several output matrices, none of them (experts, hidden)",
}
SUPPORTED = [f for f in FAMILIES if f not in ARCH_UNSUPPORTED]
# Families whose experts PEFT's LoRA cannot reach: they train their experts in full instead.
NO_EXPERT_LORA = {"dbrx": "experts are 2-D stacks (E*I, H) that the model reads outside their module"}
REQUIRED = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
            "granitemoe", "phimoe", "jetmoe", "dbrx", "glm4_moe", "ernie4_5_moe", "llama4_text"]
WITH_SHARED = {"qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "llama4_text"}
SIGMOID = {"deepseek_v3", "glm4_moe", "llama4_text"}
TRANSPOSED = {"gpt_oss", "llama4_text", "llama4", "aria_text", "ergo"}


def meta_model(family):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family))


def test_the_required_families_are_supported():
    assert set(REQUIRED) <= set(SUPPORTED)
    assert len(SUPPORTED) >= 15


@pytest.mark.parametrize("family", SUPPORTED)
def test_detection(family):
    model = meta_model(family)
    config = text_config(model.config)
    arch = describe(model)
    declared = moe_shape(model.config)
    assert arch.num_experts == declared.num_experts and arch.top_k == declared.top_k
    params = dict(model.named_parameters())
    for layer in arch.layers:
        assert params[layer.router_weight].shape == (arch.num_experts, config.hidden_size)
        for name in layer.expert_params:
            if layer.flat:
                assert params[name].shape[0] % arch.num_experts == 0
            else:
                assert params[name].shape[0] == arch.num_experts
    assert {"embeddings", "attention", "router", "routed_experts"} <= set(arch.parts.values())
    assert set(arch.parts) == set(params)
    if family in REQUIRED:
        assert bool(arch.layers[0].shared) == (family in WITH_SHARED)
        assert arch.layers[0].scoring == ("sigmoid" if family in SIGMOID else "softmax")
        assert "other" not in arch.parts.values()
    assert arch.layers[0].transposed == (family in TRANSPOSED)


@pytest.mark.parametrize("family", sorted(ARCH_UNSUPPORTED))
def test_unsupported_structure_is_a_clear_error(family):
    with pytest.raises(MoeTuneError, match="not supported yet"):
        describe(meta_model(family))


def test_every_moe_family_in_transformers_is_accounted_for():
    """A new MoE family in transformers must land in tests/families.py or in UNSUPPORTED."""
    moe_types = set()
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # configs that cannot be built with defaults are not MoE candidates here
            continue
        if moe_shape(config) is not None:
            moe_types.add(model_type)
    assert moe_types <= set(FAMILIES) | set(UNSUPPORTED), sorted(moe_types - set(FAMILIES) - set(UNSUPPORTED))


def test_readme_lists_the_unsupported_families():
    readme = (ROOT / "README.md").read_text()
    for family in {**UNSUPPORTED, **ARCH_UNSUPPORTED}:
        assert f"`{family}`" in readme, family


def train_tiny(family, tmp_path, capsys, *overrides):
    checkpoint = tiny_checkpoint(family, tmp_path / "model")
    capsys.readouterr()  # only what the command prints counts
    run = tmp_path / "run"
    code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), f"model.path={checkpoint}",
                 f"output_dir={run}", "trainable.router=freeze", *overrides,
                 "sft.max_steps=2", "sft.logging_steps=1", "sft.per_device_train_batch_size=4",
                 f"data.train={ROOT / 'data' / 'train.jsonl'}", "data.max_train_rows=8", "data.valid=null",
                 "sft.eval_strategy=no", "eval.files=[]", "eval.retention_file=null"])
    captured = capsys.readouterr()
    return code, run, captured.err


def changed_keys(checkpoint, config: dict) -> set[str]:
    """Keys where ``config`` differs from the checkpoint's config.json, less the one a run changes on
    purpose: the vocabulary grows to a tokenizer with more tokens than the checkpoint has rows."""
    source = json.loads((checkpoint / "config.json").read_text())
    changed = differing_keys(source, config)
    if changed and len(AutoTokenizer.from_pretrained(checkpoint)) > source.get("vocab_size", 0):
        changed = {k for k in changed if k.rsplit(".", 1)[-1] != "vocab_size"}
    return changed


def exported_config(run, out, capsys) -> dict:
    """config.json of ``moe-tune export RUN --merged OUT``, checked on 1 row (the fewest it takes).
    What this test process held before is frozen meanwhile: export's gc.collect() would walk its
    ~600k objects (0.8 s an export, two thirds of it; a fresh ``moe-tune export`` holds few)."""
    gc.freeze()
    try:
        code = main(["export", str(run), "--merged", str(out), "--check-rows", "1"])
    finally:
        gc.unfreeze()
    assert code == 0, capsys.readouterr().err
    return json.loads((out / "config.json").read_text())


def check_saved_and_exported_configs(tmp_path, run, capsys):
    """A full run: RUN/model and its merged export carry the source checkpoint's config, key for key."""
    saved = json.loads((run / "model" / "config.json").read_text())
    assert changed_keys(tmp_path / "model", saved) == set()
    assert differing_keys(saved, exported_config(run, tmp_path / "merged", capsys)) == set()


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in SUPPORTED if f not in NO_EXPERT_LORA])
def test_trains_with_router_frozen_and_lora_on_experts(family, tmp_path, capsys):
    """The merged export of a LoRA run carries the source checkpoint's config, key for key: the run
    saves no config.json of its own, export loads the source's and writes it after the merge."""
    code, run, err = train_tiny(family, tmp_path, capsys, "trainable.preset=lora_experts")
    assert code == 0, err
    arch = describe(meta_model(family))
    adapter = load_file(run / "model" / "adapter_model.safetensors")
    for layer in arch.layers:  # every routed expert tensor of every MoE layer carries LoRA
        for name in layer.expert_params:
            module, _, attr = name.rpartition(".")
            assert any(k.startswith(f"base_model.model.{module}") and "lora_A" in k for k in adapter), name
    assert not any(layer.router in k for layer in arch.layers for k in adapter), "router must stay frozen"
    losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses if x is not None)
    assert changed_keys(tmp_path / "model", exported_config(run, tmp_path / "merged", capsys)) == set()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(NO_EXPERT_LORA))
def test_families_without_expert_lora_refuse_it_and_train_experts_in_full(family, tmp_path, capsys):
    code, _, err = train_tiny(family, tmp_path / "lora", capsys, "trainable.preset=lora_experts")
    assert code == 2 and "LoRA cannot reach" in err and len(err.strip().splitlines()) == 1
    code, run, err = train_tiny(family, tmp_path / "full", capsys, "trainable.preset=experts_only")
    assert code == 0, err
    assert (run / "model" / "model.safetensors").is_file()
    check_saved_and_exported_configs(tmp_path / "full", run, capsys)


# A full run saves its own config.json (LoRA runs above are checked through their export, the
# families without expert LoRA in their own test). Families whose configs are built differently:
# plain, nested text config (llama4, gemma4, qwen3_5_moe), sigmoid routing with a correction bias
# (deepseek_v3), router bias and fused experts (gpt_oss), shared experts (qwen2_moe); dbrx's nested
# ffn_config is checked where it trains.
CONFIG_SHAPES = ["qwen3_moe", "qwen2_moe", "llama4", "gemma4", "qwen3_5_moe", "deepseek_v3", "gpt_oss"]


@pytest.mark.slow
@pytest.mark.parametrize("family", CONFIG_SHAPES)
def test_saved_and_exported_configs_are_the_source_config(family, tmp_path, capsys):
    """TRL switches the aux loss off in the model's config (moe_tune computes the term); RUN/model
    and a merged export carry the config the model was loaded with, key for key."""
    code, run, err = train_tiny(family, tmp_path, capsys, "trainable.preset=experts_only")
    assert code == 0, err
    check_saved_and_exported_configs(tmp_path, run, capsys)
