"""ESFT expert selection: scores against the router's own outputs, top-p sets, and training that
leaves every unselected expert slice bit-identical."""

import json

import pytest
import torch

from moe_tune.model.arch import describe
from moe_tune.data.rows import read_chat_rows
from moe_tune.errors import MoeTuneError
from moe_tune.moe.expert_selection import check_selection, load_selection, score_experts, select_top_p
from moe_tune.model.loading import load_model
from moe_tune.recipe import load_recipe
from moe_tune.moe.routing import RouterTap
from moe_tune.training.pipeline import make_trainable, plan_run
from moe_tune.training.sft_trainer import build_trainer
from moe_tune.plan.modes import make_plan, resolve_modes

from conftest import ROOT, SHIPPED_MODEL

STEPS = ["sft.max_steps=3", "sft.learning_rate=1e-2", "sft.eval_strategy=no", "data.max_train_rows=96",
         "eval.files=[]", "sft.warmup_steps=0"]


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load_model(str(SHIPPED_MODEL))
    return model, tokenizer, describe(model)


def test_select_top_p_by_hand():
    shares = {"a": [0.5, 0.1, 0.3, 0.1], "b": [0.25, 0.25, 0.25, 0.25]}
    assert select_top_p(shares, 0.2) == {"a": [0], "b": [0]}
    assert select_top_p(shares, 0.7) == {"a": [0, 2], "b": [0, 1, 2]}
    assert select_top_p(shares, 1.0) == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}


def test_routing_matches_the_routers_own_output(shipped):
    model, tokenizer, arch = shipped
    seen = {}
    hooks = [model.get_submodule(layer.router).register_forward_hook(
        lambda m, a, out, b=layer.block: seen.__setitem__(b, out)) for layer in arch.layers]
    enc = tokenizer(["The capital of Falfenia is Zorbro."], return_tensors="pt")
    try:
        with RouterTap(model, arch) as tap, torch.no_grad():
            model(**enc)
            routing = tap.take(enc["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    for layer in arch.layers:
        logits, _, indices = seen[layer.block]  # Mixtral's router: (logits, scores, indices)
        torch.testing.assert_close(routing[layer.block].probs, logits.float().softmax(-1))
        assert torch.equal(routing[layer.block].topk, indices)


@pytest.mark.parametrize("method", ["gate", "token"])
def test_scores_are_shares_of_the_routing(shipped, method):
    model, tokenizer, arch = shipped
    rows = read_chat_rows(ROOT / "data" / "train.jsonl", 8)
    shares = score_experts(model, arch, tokenizer, rows, method, batch_size=3)
    assert set(shares) == {layer.block for layer in arch.layers}
    for layer_shares in shares.values():
        assert len(layer_shares) == 8 and sum(layer_shares) == pytest.approx(1.0)
    # by hand for one layer, one batch with no padding
    block = arch.layers[0].block
    text = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with RouterTap(model, arch) as tap, torch.no_grad():
        model(**enc)
        r = tap.take()[block]
    one = score_experts(model, arch, tokenizer, rows[:1], method)[block]
    expected = r.probs.mean(0) if method == "gate" else torch.bincount(r.topk.reshape(-1), minlength=8) / r.topk.numel()
    assert one == pytest.approx(expected.tolist(), abs=1e-6)


def unselected_slices(arch, selection):
    for layer in arch.layers:
        for name in layer.expert_params:
            for e in range(layer.num_experts):
                yield name, e, e in selection[layer.block]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "lora"])
def test_esft_leaves_unselected_experts_bit_identical(tmp_path, mode):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                         [f"output_dir={tmp_path}", *STEPS, "trainable.preset=esft",
                          f"trainable.routed_experts={mode}", "trainable.expert_selection={top_p: 0.5}"])
    model, tokenizer = load_model(str(SHIPPED_MODEL))
    arch = describe(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    setup = plan_run(recipe)
    model, _ = make_trainable(setup, model, arch, tokenizer)
    build_trainer(recipe, setup.sft_args, model, tokenizer, arch).train()
    selection = json.loads((tmp_path / "expert_selection.json").read_text())["selected"]
    # the run's plan.json (what compare reports) counts only the selected experts' share
    counted = json.loads((tmp_path / "plan.json").read_text())["parts"]
    experts = next(r for r in counted if r["part"] == "routed_experts")
    if mode == "train":
        sizes = {n: p[0].numel() for n, p in before.items()}  # one expert's slice
        assert experts["trainable"] == sum(sizes[n] for n, _, chosen in unselected_slices(arch, selection)
                                           if chosen)
    assert 0 < experts["trainable"] < experts["params"]
    if mode == "lora":
        model = model.merge_and_unload()  # effective weights: base + each expert's LoRA update
    after = dict(model.named_parameters())
    for name, e, selected in unselected_slices(arch, selection):
        same = torch.equal(after[name][e], before[name][e])
        assert same != selected, f"{name}[{e}] selected={selected}"
    for name in before:
        if arch.parts[name] != "routed_experts":
            assert torch.equal(after[name], before[name]), name


def test_selection_file_round_trip_and_errors(shipped, tmp_path):
    _, _, arch = shipped
    good = {layer.block: [0, 3] for layer in arch.layers}
    (tmp_path / "sel.json").write_text(json.dumps({"selected": good}))
    assert load_selection(tmp_path / "sel.json", arch) == good
    (tmp_path / "bad.json").write_text(json.dumps({"selected": {**good, arch.layers[1].block: [9]}}))
    with pytest.raises(MoeTuneError, match="no valid expert list for MoE layer 'model.layers.1.mlp'"):
        load_selection(tmp_path / "bad.json", arch)
    with pytest.raises(MoeTuneError, match="expert selection file not found"):
        load_selection(tmp_path / "none.json", arch)


@pytest.mark.parametrize("overrides, expected", [
    (["trainable.routed_experts=freeze"], "the routed experts are frozen"),
    (["sft.weight_decay=0.1"], "sft.weight_decay: weight decay would move the unselected experts"),
    (["trainable.attention=lora"], "cannot be combined with LoRA on other parts"),
])
def test_selection_conflicts_are_refused(shipped, overrides, expected):
    model, _, arch = shipped
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["trainable.preset=esft", *overrides])
    plan = make_plan(model, arch, resolve_modes(recipe.trainable.preset, recipe.trainable.overrides()))
    with pytest.raises(MoeTuneError, match=expected):
        check_selection(recipe, plan)


def test_select_experts_says_how_it_scored_and_what_its_columns_are(tmp_path, capsys):
    from moe_tune.cli import main

    out = tmp_path / "sel.json"
    assert main(["select-experts", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out),
                 "trainable.expert_selection={rows: 16, top_p: 0.5, score: token}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("scoring experts by token score (share of the top-k slots) on 16 rows of "
                        "data/train.jsonl; top_p 0.5")
    assert lines[1].startswith("each line: MoE block: kept/all experts, the kept experts' share")
    saved = json.loads(out.read_text())
    assert set(saved) == {"method", "top_p", "selected", "shares"} and saved["method"] == "token"
    for block, experts in saved["selected"].items():
        line = next(line for line in lines if line.startswith(f"{block}: "))
        kept = sum(saved["shares"][block][e] for e in experts)
        assert f"{len(experts)}/8 experts, {kept:.2f} of the routing  " in line and kept >= 0.5 - 1e-9
