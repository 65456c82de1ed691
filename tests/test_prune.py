"""moe_tune/export/prune.py: expert pruning surgery for every family, scores, the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from families import FAMILIES, tiny_config
from moe_tune.model.arch import describe, expert_groups
from moe_tune.errors import MoeTuneError
from moe_tune.export.prune import Keep, check_prunable, choose, kept_count, prune_model
from moe_tune.moe.routing import RouterTap

ROOT = Path(__file__).resolve().parents[1]
REFUSED = {"jetmoe": "not a module of their own", "deepseek_v4": "hash routing"}


def _model(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def _batch(model) -> dict[str, torch.Tensor]:
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, vocab, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _removed(arch, groups: int) -> dict[str, list[int]]:
    """Experts to cut: every other one, from 1 (ids 1, 3, ...), so that kept ids are not a prefix."""
    n = arch.num_experts
    return {layer.block: [e for e in range(n) if e % 2 == 1] for layer in arch.layers}


def never_routed(model, arch, removed: dict[str, list[int]], batch) -> None:
    """Construct the case: point the removed experts' router rows away from every token of the
    batch, layer by layer (a layer's router input depends on the layers below), so that their
    logits are far below the others' and they are never selected: (E, H) rows d with h . d = -1000 for every token h."""
    tensors = dict(model.named_parameters())
    for layer in arch.layers:
        with torch.no_grad(), RouterTap(model, arch) as tap:
            model(**batch)
            hidden = tap._seen[layer.block][0]  # (tokens, H) this router's input
            tap._seen.clear()
            # (H,) with h . d = 1 for every token: 16 tokens in 64 dimensions have an exact solution
            direction = torch.linalg.pinv(hidden.double()) @ torch.ones(hidden.shape[0], dtype=torch.double)
            tensors[layer.router_weight][removed[layer.block]] = (-1000 * direction).to(hidden.dtype)
        with torch.no_grad(), RouterTap(model, arch) as tap:
            model(**batch)
            hidden = tap._seen[layer.block][0]
            logits = hidden.float() @ tensors[layer.router_weight].float().T  # (tokens, E)
            assert logits[:, removed[layer.block]].max() < logits.max(-1).values.min() - 50, "construction failed"


EXPERT_COUNT_KEYS = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"}


def differing_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two config dicts (nested configs compared key by key)."""
    keys = set()
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys |= differing_keys(x, y, f"{prefix}{key}.")
        elif x != y and key not in ("transformers_version", "dtype", "torch_dtype"):
            keys.add(prefix + key)
    return keys


def test_surgery_helper_smoke():
    assert Keep.parse("0.5").count(8) == 4 and Keep.parse("3").count(8) == 3


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_pruned_checkpoint_loads_and_equals_the_original_where_pruned_experts_are_never_selected(family, tmp_path):
    model = _model(family)
    try:
        arch = describe(model)
    except MoeTuneError:
        pytest.skip("not detected at this size")
    batch = _batch(model)
    removed = _removed(arch, expert_groups(model.config))
    never_routed(model, arch, removed, batch)
    with torch.no_grad():
        before = model(**batch).logits
    kept = {b: [e for e in range(arch.num_experts) if e not in r] for b, r in removed.items()}
    model.save_pretrained(tmp_path / "source")  # the unpruned model, saved
    source = json.loads((tmp_path / "source" / "config.json").read_text())
    prune_model(model, arch, kept)
    model.save_pretrained(tmp_path)
    # the saved config is the source's but for the expert count the pruning changed on purpose
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k for k in differing_keys(source, saved) if k.rsplit(".", 1)[-1] not in EXPERT_COUNT_KEYS} == set()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    new = describe(loaded)
    assert all(layer.num_experts == arch.num_experts // 2 for layer in new.layers)
    with torch.no_grad():
        after = loaded.eval()(**batch).logits
    # bit for bit on Intel; where BLAS sums a narrower router's matmul in another order (AMD EPYC,
    # AVX2) the logits differ in the last bit (1.2e-7); cutting a used expert moves them by > 1e-3
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_cutting_an_expert_that_is_selected_changes_the_logits(tmp_path):
    """The check above can fail: the same construction, but one removed expert is routed to."""
    model = _model("mixtral")
    arch = describe(model)
    batch = _batch(model)
    removed = _removed(arch, 1)
    never_routed(model, arch, removed, batch)
    with torch.no_grad():
        before = model(**batch).logits
    with torch.no_grad(), RouterTap(model, arch) as tap:
        model(**batch)
        used = int(tap.take()[arch.layers[0].block].topk[0, 0])  # an expert the first token uses
    kept = {b: [e for e in range(arch.num_experts) if e not in r] for b, r in removed.items()}
    kept[arch.layers[0].block] = sorted(set(kept[arch.layers[0].block]) - {used} | {removed[arch.layers[0].block][0]})
    prune_model(model, arch, kept)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, before, atol=1e-3)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_whose_layout_cannot_be_cut_are_refused(family):
    model = _model(family)
    with pytest.raises(MoeTuneError, match=REFUSED[family]):
        check_prunable(model, describe(model))


def test_group_limited_routing_keeps_equal_groups():
    scores = {"b": torch.tensor([9.0, 8, 7, 6, 1, 2, 3, 0])}  # 2 groups of 4
    assert choose(scores, 4, groups=2) == {"b": [0, 1, 5, 6]}
    assert choose(scores, 4) == {"b": [0, 1, 2, 3]}
    model = _model("deepseek_v3")  # 8 experts in 2 groups, top-2
    with pytest.raises(MoeTuneError, match="multiple of 2"):
        kept_count(Keep.parse("3"), describe(model), model.config, {})


def test_keep_is_checked_against_top_k_and_the_expert_count():
    model = _model("mixtral")  # 4 experts, top-2
    arch = describe(model)
    assert kept_count(Keep.parse("0.5"), arch, model.config, {}) == 2
    with pytest.raises(MoeTuneError, match="fewer than the 2"):
        kept_count(Keep.parse("0.25"), arch, model.config, {})
    with pytest.raises(MoeTuneError, match="model has 4"):
        kept_count(Keep.parse("5"), arch, model.config, {})
    with pytest.raises(MoeTuneError, match="same count"):
        kept_count(Keep.parse("3"), arch, model.config, {arch.layers[0].block: Keep.parse("2")})
    for bad in ("0", "1.5", "-1", "half"):
        with pytest.raises(MoeTuneError, match="--keep"):
            Keep.parse(bad)


def test_reap_score_matches_a_hand_computation(root):
    """REAP on the shipped Mixtral: mean over the tokens routed to expert j of g_j(x) ||f_j(x)||,
    with the router, its renormalised top-2 weights and each expert's SwiGLU computed here from
    the weights alone."""
    from moe_tune.data.rows import read_chat_rows
    from moe_tune.moe.expert_selection import expert_scores
    from moe_tune.model.loading import load_model

    model, tokenizer = load_model(str(root / "data" / "tiny-moe"))
    arch = describe(model)
    rows = read_chat_rows(root / "data" / "train.jsonl", 5)
    got = expert_scores(model, arch, tokenizer, rows, "reap", batch_size=2)  # padded batches
    layer = arch.layers[1]
    p = {n: t.detach() for n, t in model.named_parameters()}
    inputs = []
    hook = model.get_submodule(layer.block).register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding at all
            ids = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), return_tensors="pt",
                            add_special_tokens=False)
            model(**ids)
    hook.remove()
    x = torch.cat(inputs).double()  # (tokens, H)
    probs = (x @ p[layer.router_weight].double().T).softmax(-1)  # (tokens, E)
    top, ids = probs.topk(2, dim=-1)
    gates = top / top.sum(-1, keepdim=True)  # Mixtral renormalises its top-2
    gate_up = p[f"{layer.block}.experts.gate_up_proj"].double()  # (E, 2I, H)
    down = p[f"{layer.block}.experts.down_proj"].double()  # (E, H, I)
    for j in range(layer.num_experts):
        token, slot = (ids == j).nonzero(as_tuple=True)
        g, u = (x[token] @ gate_up[j].T).chunk(2, dim=-1)
        out = (torch.nn.functional.silu(g) * u) @ down[j].T  # (n, H)
        want = float((gates[token, slot] * out.norm(dim=-1)).mean()) if len(token) else 0.0
        assert got[layer.block][j].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert (got[layer.block] > 0).sum() >= 2


@pytest.mark.slow
def test_prune_a_tuned_lora_run_then_fine_tune_the_smaller_model(root, tmp_path, capsys):
    """After fine-tuning (LoRA on the experts, merged before the cut) and before it (a pruned
    base, tuned by a recipe pointing at OUT); inspect counts the smaller model."""
    from moe_tune.cli import main

    quick = str(root / "recipes" / "quickstart.yaml")
    run = tmp_path / "run"
    small = ["sft.max_steps=3", "sft.eval_strategy=no", "data.max_train_rows=64", "eval.max_rows=24"]
    assert main(["train", quick, f"output_dir={run}", "trainable.preset=lora_experts", *small]) == 0
    out = tmp_path / "pruned"
    assert main(["prune", str(run), "--keep", "0.5", "--by", "frequency", "--data", str(root / "data" / "train.jsonl"),
                 "--rows", "64", "--out", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert describe(loaded).num_experts == 4
    info = json.loads((out / "pruning.json").read_text())
    assert info["experts_kept"] == 4 and len(info["kept"]) == 4 and info["params_after"] < info["params_before"]
    report = json.loads((out / "eval" / "report.json").read_text())
    entry = report[str(root / "data" / "heldout.jsonl")]
    assert set(entry["results"]) == {"base", "pruned"} and set(entry["retention"]) == {"base", "pruned"}
    layer = next(iter(entry["routing"]["pruned"]["layers"].values()))
    assert len(layer["load"]) == 8 and len(layer["removed"]) == 4 and "js_from_base" in layer  # original ids
    capsys.readouterr()
    sizes = []
    for model in (root / "data" / "tiny-moe", out):
        assert main(["inspect", str(model), "--json"]) == 0
        sizes.append(json.loads(capsys.readouterr().out))
    assert sizes[1]["num_experts"] == 4 and sizes[1]["total_params"] == info["params_after"]
    assert sizes[1]["total_params"] < sizes[0]["total_params"]
    assert all(sizes[1]["memory_gb"][s] < sizes[0]["memory_gb"][s] for s in sizes[0]["memory_gb"])
    # and the smaller model fine-tunes like any checkpoint
    tuned = tmp_path / "tuned-small"
    assert main(["train", quick, f"output_dir={tuned}", f"model.path={out}", *small]) == 0
    assert json.loads((tuned / "plan.json").read_text())["total_params"] == info["params_after"]
