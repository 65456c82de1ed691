"""What trains: every preset on the shipped model, a few real TRL steps each.

Frozen parameters must be bit-identical afterwards, trained ones must move, and LoRA must sit
on exactly the planned tensors.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from moe_tune.model.arch import describe
from moe_tune.recipe import PARTS, PRESETS
from moe_tune.errors import MoeTuneError
from moe_tune.model.loading import load_model
from moe_tune.recipe import LoraSection, load_recipe
from moe_tune.training.pipeline import make_trainable, plan_run
from moe_tune.training.sft_trainer import build_trainer
from moe_tune.plan.modes import adapted_tensors, apply_plan, make_plan, resolve_modes, unwrapped

from conftest import ROOT, SHIPPED_MODEL
from families import tiny_config

STEPS = ["sft.max_steps=3", "sft.learning_rate=1e-2", "sft.eval_strategy=no", "data.max_train_rows=96",
         "eval.files=[]", "sft.warmup_steps=0", "sft.logging_steps=1"]


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unwrap_name(name: str) -> str:
    """PEFT-wrapped parameter name -> base model name; None for LoRA weights and for the
    untouched originals that PEFT keeps beside a fully trained copy (modules_to_save)."""
    if "lora_" in name or ".original_module." in name:
        return None
    return (name.removeprefix("base_model.model.").replace(".base_layer", "")
            .replace(".modules_to_save.default", ""))


def train_preset(tmp_path, *overrides):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={tmp_path}", *STEPS, *overrides])
    model, tokenizer = load_model(str(SHIPPED_MODEL))
    arch = describe(model)
    before = base_weights(model)
    setup = plan_run(recipe)
    model, _ = make_trainable(setup, model, arch, tokenizer)
    trainer = build_trainer(recipe, setup.sft_args, model, tokenizer, arch)
    trainer.train()
    return recipe, arch, before, trainer.model


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_trains_exactly_its_parts(tmp_path, preset):
    recipe, arch, before, model = train_preset(tmp_path, f"trainable.preset={preset}")
    modes = resolve_modes(preset, {})
    after = {}
    for name, p in model.named_parameters():
        base = unwrap_name(name)
        if base is not None:
            after[base] = p.detach()
    assert set(after) == set(before)
    for name, weight in before.items():
        mode = modes[arch.parts[name]]
        if mode == "train":
            assert not torch.equal(after[name], weight), f"{name} should have trained"
        else:  # frozen, or frozen under its LoRA adapter
            assert torch.equal(after[name], weight), f"{name} should be bit-identical"
    if "lora" in modes.values():
        plan = make_plan(load_model(str(SHIPPED_MODEL))[0], arch, modes)
        assert adapted_tensors(model) == set(plan.lora_targets)
        lora_weights = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_weights and any(p.abs().sum() > 0 for p in lora_weights), "LoRA B should move from 0"


@pytest.mark.slow
def test_router_frozen_under_lora_experts_with_overrides(tmp_path):
    _, arch, before, model = train_preset(tmp_path, "trainable.preset=lora_experts", "trainable.norms=train",
                                          "lora.rank_per_part={routed_experts: 2}")
    after = {unwrap_name(n): p for n, p in model.named_parameters() if unwrap_name(n)}
    for name in arch.params_in("router"):
        assert torch.equal(after[name], before[name])
    for name in arch.params_in("norms"):
        assert not torch.equal(after[name], before[name])
    # per-expert rank 2 x 8 experts
    a = [p for n, p in model.named_parameters() if "experts" in n and "lora_A" in n]
    assert a and all(p.shape[0] == 2 * 8 for p in a)


def test_every_part_has_a_mode_in_every_preset():
    for preset in PRESETS:
        assert set(resolve_modes(preset, {})) == set(PARTS)
    assert resolve_modes("full", {"router": "freeze"})["router"] == "freeze"


def test_lora_targets_come_from_the_architecture():
    model, _ = load_model(str(SHIPPED_MODEL))
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes("lora_all", {"router": "lora"}))
    experts = set(arch.expert_params)
    routers = {layer.router_weight for layer in arch.layers}
    assert experts | routers <= set(plan.lora_parameters)
    assert all(m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for m in plan.lora_modules)


def test_norms_cannot_take_lora():
    model, _ = load_model(str(SHIPPED_MODEL))
    with pytest.raises(MoeTuneError, match="trainable.norms: norms have no LoRA form"):
        make_plan(model, describe(model), resolve_modes("full", {"norms": "lora"}))


def test_dropout_on_fused_experts_is_refused():
    from moe_tune.plan.modes import apply_plan

    model, _ = load_model(str(SHIPPED_MODEL))
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes("lora_experts", {}))
    with pytest.raises(MoeTuneError, match="lora.dropout: PEFT cannot apply dropout to fused expert"):
        apply_plan(model, plan, arch, LoraSection(dropout=0.1))


def test_train_and_lora_in_one_module_is_refused():
    """afmoe's MoE block holds a router tensor itself (expert_bias) beside its experts module:
    PEFT would keep a trained copy of the whole block, the LoRA'd experts inside it."""
    model = AutoModelForCausalLM.from_config(tiny_config("afmoe"))
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes("lora_experts", {"router": "train"}))
    with pytest.raises(MoeTuneError, match=r"trainable: 'model\.layers\.1\.mlp' would be both trained in full "
                                           "and LoRA-adapted"):
        apply_plan(model, plan, arch, LoraSection())


def test_a_router_in_its_own_module_trains_beside_lora_experts():
    """The shipped model's router sits in the MoE block next to the LoRA'd experts, but in a module
    of its own: it trains in full (a PEFT copy) while the experts carry LoRA and stay frozen."""
    model, _ = load_model(str(SHIPPED_MODEL))
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes("lora_experts", {"router": "train"}))
    wrapped = apply_plan(model, plan, arch, LoraSection())
    trained = {unwrap_name(n) for n, p in wrapped.named_parameters() if p.requires_grad} - {None}
    assert trained == {layer.router_weight for layer in arch.layers}
    assert adapted_tensors(wrapped) == set(arch.expert_params) == set(plan.lora_targets)


def plan_json(capsys, *overrides):
    from moe_tune.cli import main

    assert main(["plan", str(ROOT / "recipes" / "quickstart.yaml"), "--json", *overrides]) == 0
    import json

    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", ["lora_experts", "lora_all", "freeze_experts"])
def test_plan_counts_match_the_real_wrapped_model(capsys, preset):
    from moe_tune.plan.modes import apply_plan

    report = plan_json(capsys, f"trainable.preset={preset}")
    model, _ = load_model(str(SHIPPED_MODEL))
    arch = describe(model)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"trainable.preset={preset}"])
    plan = make_plan(model, arch, resolve_modes(preset, {}))
    wrapped = apply_plan(model, plan, arch, recipe.lora)
    assert report["trainable_params"] == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert report["total_params"] == sum(p.numel() for p in load_model(str(SHIPPED_MODEL))[0].parameters())
    assert report["lora_tensors"] == len(plan.lora_targets)
    assert report["memory_gb"] > 0


def test_plan_warnings(capsys):
    report = plan_json(capsys, "trainable.preset=lora_experts", "trainable.router=lora")
    assert any("router is set to lora although preset 'lora_experts' has it freeze" in w for w in report["warnings"])
    report = plan_json(capsys, "trainable.preset=lora_attention")
    assert any("LoRA leaves the routed experts untouched (89%" in w for w in report["warnings"])
    assert plan_json(capsys, "trainable.preset=full")["warnings"] == []


def test_select_experts_command(tmp_path, capsys):
    import json

    from moe_tune.cli import main

    out = tmp_path / "sel.json"
    args = ["select-experts", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out),
            "trainable.expert_selection={rows: 16, top_p: 0.5}"]
    assert main(args) == 0
    saved = json.loads(out.read_text())
    assert saved["top_p"] == 0.5 and len(saved["selected"]) == 4
    assert all(sum(s) == pytest.approx(1) for s in saved["shares"].values())
    assert main(args) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    report = plan_json(capsys, "trainable.preset=esft", f"trainable.expert_selection.file={out}")
    assert report["expert_selection"] == saved["selected"]


def test_rank_per_part_on_expert_tensors_applies_without_warning():
    """PEFT warns that rank_pattern keys for target_parameters match nothing; the ranks apply."""
    model = load_model(str(SHIPPED_MODEL))[0]
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes("lora_experts", {}))
    lora = LoraSection(r=4, alpha=8, rank_per_part={"routed_experts": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = apply_plan(model, plan, arch, lora)
    a = [p for n, p in model.named_parameters() if "experts" in n and "lora_A" in n]
    assert a and all(p.shape[0] == 2 * 8 for p in a)  # rank 2 per expert, 8 experts


def test_plan_table_aligns_large_counts():
    """DeepSeek-V3's 653,908,770,816 expert parameters keep the columns in line."""
    config = ROOT / "moe_tune" / "model" / "configs" / "deepseek-v3"
    setup = plan_run(load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"model.path={config}", "trainable.preset=full"]))
    lines = setup.report.format().splitlines()
    table = lines[:len(setup.report.parts) + 1]  # the header and a row per part
    assert any(len(f"{r.params:,}") == len("653,908,770,816") for r in setup.report.parts)
    assert len({len(line) for line in table}) == 1  # every count right-aligned to the same column
    assert {line.index(" train ") + len(" train") for line in table[1:]} == {table[0].index(" mode") + len(" mode")}


@pytest.mark.parametrize("preset", ["experts_only", "lora_experts"])
def test_new_token_rows_train_in_the_embeddings_and_an_untied_lm_head(preset):
    """Tokens a chat template added: their rows of both (vocab, hidden) weights train, frozen or
    beside LoRA (PEFT's trainable_token_indices), and no other row moves."""
    from transformers import AutoModelForCausalLM

    from families import tiny_config

    config = tiny_config("mixtral")
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 2)
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes(preset, {}), new_tokens=[vocab, vocab + 1])
    assert plan.token_rows == {"model.embed_tokens.weight": [vocab, vocab + 1], "lm_head.weight": [vocab, vocab + 1]}
    before = {n: model.get_parameter(n).detach().clone() for n in plan.token_rows}
    model = apply_plan(model, plan, arch, LoraSection())
    # no weight decay: sft_trainer.py keeps such weights out of it (tested end to end in test_templates.py)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([[1, vocab, 5, 6, vocab + 1, 7]])
    backbone, head = unwrapped(model).model, model.get_output_embeddings()
    for _ in range(3):
        # as TRL's fused LM head computes it: the backbone, then the head's weight and bias read directly
        hidden = backbone(input_ids=ids).last_hidden_state[:, :-1]  # (1, 5, hidden)
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias)  # (1, 5, vocab + 2)
        torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model = model.merge_and_unload() if preset == "lora_experts" else model
    for name, old in before.items():
        new = model.get_parameter(name).detach()
        assert torch.equal(new[:vocab], old[:vocab]), name
        assert (new[vocab:] - old[vocab:]).abs().min() > 0, name


def test_a_linear_weight_adapted_as_a_parameter_runs_as_peft_lora_linear():
    """DeepSeek's shared experts are Linear layers whose names PEFT would take for fused experts,
    so their weights are adapted as parameters (PEFT's ParamWrapper). They run as PEFT's LoRA
    Linear does, base(x) + s (x A^T) B^T, never adding B A into a copy of the whole weight: the
    same logits and LoRA gradients as PEFT's own forward, and the base model's logits with the
    adapter disabled."""
    from peft.tuners.lora.layer import ParamWrapper

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3")).float()
    arch = describe(model)
    plan = make_plan(model, arch, resolve_modes("lora_experts", {}))
    model = apply_plan(model, plan, arch, LoraSection(r=4, alpha=8))
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper) and isinstance(m.base_layer, nn.Linear)]
    assert len(wrappers) == 3 * len(arch.layers)  # each MoE layer's shared gate, up and down projections
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:  # PEFT starts B at zero: give both factors values
            p.data = torch.randn(p.shape, generator=g) * 0.05
    reference = copy.deepcopy(model)
    for wrapper in reference.modules():
        if isinstance(wrapper, ParamWrapper):
            wrapper.__dict__.pop("forward", None)  # PEFT's own forward
    parametrized = []
    for wrapper in wrappers:
        wrapper.base_layer.register_forward_pre_hook(lambda m, a: parametrized.append(parametrize.is_parametrized(m)))
    ids = torch.randint(3, 128, (2, 12), generator=g)
    results = []
    for m in (model, reference):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        with torch.no_grad(), m.disable_adapter():
            off = m(input_ids=ids).logits
        results.append((out.logits.detach(), off, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (logits, off, grads), (ref_logits, ref_off, ref_grads) = results
    assert parametrized and not any(parametrized)  # B A never added into the weight
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(off, ref_off)
    assert grads.keys() == ref_grads.keys() and any(".shared_experts." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)
