"""``moe-tune prune``: remove the experts a task does not need, into a standard, smaller checkpoint.

    load  -> score each MoE layer's experts on the task rows (expert_selection.expert_scores:
             frequency, gate or REAP) -> keep the best per layer (per group where routing is
             group-limited) -> cut the expert tensors, router rows and per-expert router biases
             (architecture layer) -> save, reload with plain ``from_pretrained`` -> evaluate the
             pruned model beside the model it came from, into OUT/eval

Every MoE layer keeps the same number of experts: a transformers config declares one expert
count for all layers (``num_local_experts``, ``num_experts``, ``n_routed_experts``, ...), so a
checkpoint whose layers differ would not load. Shared experts are untouched; top-k is capped at
the experts kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_tune.data.rows import read_chat_rows
from moe_tune.errors import MoeTuneError, shown
from moe_tune.evaluation.report import evaluate_and_report
from moe_tune.model.arch import MoeArch, describe, expert_groups, set_expert_count
from moe_tune.model.loading import DTYPES, build_meta_model, load_config
from moe_tune.moe.expert_selection import expert_module, expert_scores
from moe_tune.recipe import EvalSection, ModelSection
from moe_tune.training.run_dir import (
    EVAL_DIR,
    MODEL_DIR,
    RECIPE_FILE,
    REPORT_MD,
    check_replaceable,
    folder_in_place,
    load_run_model,
    load_run_recipe,
    write_json,
    write_pretrained,
)

SCORES = {"frequency": "token", "gate": "gate", "reap": "reap"}  # --by -> expert_scores' method
PRUNING_FILE = "pruning.json"  # in OUT: what was kept and why; marks a folder moe-tune pruned


@dataclass(frozen=True)
class Keep:
    """``--keep``: a fraction of each layer's experts (0.5) or a count (6)."""

    value: float
    is_count: bool

    @classmethod
    def parse(cls, text: str, where: str = "--keep") -> Keep:
        try:
            number = float(text)
        except ValueError:
            raise MoeTuneError(f"{where} {text}: give a fraction of the experts (0.5) or a count per layer (6)") from None
        is_count = "." not in text and "e" not in text.lower()
        if number <= 0 or (not is_count and number > 1) or (is_count and number != int(number)):
            raise MoeTuneError(f"{where} {text}: give a fraction in (0, 1] or a whole count of at least 1 per layer")
        return cls(number, is_count)

    def count(self, num_experts: int) -> int:
        return int(self.value) if self.is_count else max(1, round(self.value * num_experts))


def kept_count(keep: Keep, arch: MoeArch, config, overrides: dict[str, Keep], where: str = "--keep") -> int:
    """The number of experts every MoE layer keeps; one line when it cannot be."""
    counts = {layer.block: (overrides.get(layer.block) or keep).count(layer.num_experts) for layer in arch.layers}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{b}: {n}" for b, n in counts.items())
        raise MoeTuneError(f"--keep-layer: layers would keep different expert counts ({listed}); a transformers "
                           "checkpoint declares one expert count for all layers, so give every layer the same count")
    count = next(iter(counts.values()))
    layer = arch.layers[0]
    if count > layer.num_experts:
        raise MoeTuneError(f"{where}: {count} experts per layer, but the model has {layer.num_experts}")
    if count < layer.top_k:
        raise MoeTuneError(f"{where}: {count} experts per layer is fewer than the {layer.top_k} each token is "
                           f"routed to (top-k); keep at least {layer.top_k}")
    groups = expert_groups(config)
    if count % groups:
        raise MoeTuneError(f"{where}: {count} experts per layer, but this model routes within {groups} equal "
                           f"groups of experts; keep a multiple of {groups}")
    return count


def choose(scores: dict[str, torch.Tensor], count: int, groups: int = 1) -> dict[str, list[int]]:
    """Per layer, the ``count`` best-scored experts (ids ascending); with group-limited routing,
    the best ``count / groups`` of each group, so that the groups stay equal. Ties: lower id."""
    kept = {}
    for block, score in scores.items():  # (E,)
        size = len(score) // groups
        ids = []
        for g in range(groups):
            group = score[g * size:(g + 1) * size]  # (E / groups,)
            order = sorted(range(size), key=lambda e: (-float(group[e]), e))
            ids += [g * size + e for e in order[:count // groups]]
        kept[block] = sorted(ids)
    return kept


def check_prunable(model: nn.Module, arch: MoeArch) -> None:
    """Families whose expert layout the surgery below cannot rewrite, refused in one line."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for layer in arch.layers:
        if getattr(model.get_submodule(layer.block), "experts", None) is None:
            raise MoeTuneError(f"{arch.family}: the routed experts of {layer.block} are not a module of their own "
                               "(their expert count may drive other parts, as jetmoe's attention experts); "
                               "pruning is not supported for this family")
        for name in layer.router_extras:
            if not tensors[name].is_floating_point():
                raise MoeTuneError(f"{arch.family}: {name} maps tokens to expert ids (hash routing); pruning is "
                                   "not supported for this family")


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` where the parameter or buffer ``name`` is, as the same kind of tensor."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


def prune_model(model: nn.Module, arch: MoeArch, kept: dict[str, list[int]]) -> None:
    """Keep only ``kept[block]``'s experts in every MoE layer of ``model``, in place: expert
    tensors, router weight rows and per-expert router biases or score corrections, then the
    config's expert count (and top-k, capped)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    count = len(next(iter(kept.values())))
    with torch.no_grad():
        for layer in arch.layers:
            n = layer.num_experts
            ids = torch.tensor(kept[layer.block])  # (K,)
            for name in layer.expert_params:
                t = tensors[name]
                if layer.flat:  # dbrx: (E * rows, cols) -> (K * rows, cols)
                    cut = t.reshape(n, -1, t.shape[-1])[ids].reshape(-1, t.shape[-1])
                else:  # (E, ...) -> (K, ...), transposed layouts alike
                    cut = t[ids]
                _replace(model, name, cut.clone())
            for name in (*layer.expert_other, layer.router_weight, *layer.router_extras):
                t = tensors[name]
                if t.dim() >= 1 and t.shape[0] == n:  # per expert: (E, ...) -> (K, ...)
                    _replace(model, name, t[ids].clone())
                elif t.dim() == 2 and t.shape[-1] == n and t.shape[0] == 1:  # ernie: (1, E)
                    _replace(model, name, t[:, ids].clone())
            experts = getattr(model.get_submodule(layer.block), "experts", None)
            if getattr(experts, "num_experts", None) == n:  # the in-memory module loops over it
                experts.num_experts = count
    set_expert_count(model.config, count)


def merged(model):
    """A run's LoRA merged into its weights (pruning cuts whole expert tensors)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_prune(source: Path, keep: str, data: str, out: Path, by: str = "reap", rows: int = 512,
              keep_layer: list[str] = (), eval_data: list[str] | None = None, retention: str | None = None,
              no_base: bool = False, overwrite: bool = False, dtype: str | None = None) -> Path:
    """``moe-tune prune``: score, cut, save to ``out``, reload, evaluate beside the source."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415


    # everything a user can get wrong is checked before any weights load
    check_replaceable(out, overwrite, lambda folder: (folder / PRUNING_FILE).is_file(), "a folder moe-tune pruned")
    if by not in SCORES:
        raise MoeTuneError(f"--by {by}: choose one of {', '.join(SCORES)}")
    base_keep = Keep.parse(keep)
    if rows < 1:
        raise MoeTuneError(f"--rows {rows}: score the experts on at least 1 row")
    is_run = (source / RECIPE_FILE).is_file()
    if is_run and not (source / MODEL_DIR).is_dir():
        raise MoeTuneError(f"{source}: this run has no saved model yet (did training finish?)")
    if not is_run and not (source / "config.json").is_file():
        raise MoeTuneError(f"{source}: neither a moe-tune run folder nor a model folder (no config.json)")
    recipe = load_run_recipe(source) if is_run else None
    task_rows = read_chat_rows(data, rows)
    weights = source / MODEL_DIR if is_run else source
    # a LoRA run saved an adapter: the layout is its base model's
    meta = build_meta_model(load_config(str(weights) if (weights / "config.json").is_file() else recipe.model.path))
    arch = describe(meta)
    overrides = {}
    for item in keep_layer:
        layer, sep, value = item.partition("=")
        blocks = [b.block for b in arch.layers if b.block == layer or b.block.split(".")[-2:-1] == [layer]]
        if not sep or len(blocks) != 1:
            raise MoeTuneError(f"--keep-layer {item}: give LAYER=KEEP, LAYER a decoder layer number with an MoE block "
                               f"or its name ({', '.join(b.block for b in arch.layers[:3])}, ...)")
        overrides[blocks[0]] = Keep.parse(value, f"--keep-layer {item}")
    count = kept_count(base_keep, arch, meta.config, overrides)
    check_prunable(meta, arch)
    if by == "reap":
        for layer in arch.layers:
            expert_module(meta, layer)
    # held-out rows: --eval-data, a run's own eval files, else the task rows themselves
    given = {"files": eval_data, "retention_file": retention}
    cfg = EvalSection(**{**(recipe.eval.model_dump() if recipe else {}),
                         **{key: value for key, value in given.items() if value is not None}})
    if not cfg.files:
        cfg = cfg.model_copy(update={"files": [data]})
        print(f"note: no held-out files given (--eval-data); the pruned model is scored on {data}, "
              "the rows its experts were chosen on")
    for path in cfg.files:
        read_chat_rows(path, cfg.max_rows)
    if cfg.retention_file and not Path(cfg.retention_file).is_file():
        raise MoeTuneError(f"{shown(cfg.retention_file)}: --retention file not found")
    dtype = dtype or (recipe.model.dtype if recipe else ModelSection.model_fields["dtype"].default)

    model, tokenizer, _ = load_run_model(source, dtype)
    model = merged(model)
    arch = describe(model)
    print(f"scoring the experts of {len(arch.layers)} MoE layers by {by} on {len(task_rows)} rows of {data}")
    scores = expert_scores(model, arch, tokenizer, task_rows, SCORES[by])
    kept = choose(scores, count, expert_groups(model.config))
    before = param_count(model)
    base = None if no_base else copy.deepcopy(model)
    prune_model(model, arch, kept)
    with folder_in_place(out) as tmp:
        write_pretrained(model, tokenizer, tmp)
        del model
        pruned, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[dtype], output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            kind, names = next(iter(problems.items()))
            raise MoeTuneError(f"{arch.family}: transformers does not load the pruned checkpoint as written "
                               f"({kind.replace('_', ' ')}: {sorted(map(str, names))[:3]}); pruning is not "
                               "supported for this family")
        after = param_count(pruned)
        write_json(tmp / PRUNING_FILE, {
            "source": str(source.resolve()), "by": by, "keep": keep, "keep_layer": list(keep_layer),
            "experts_before": arch.num_experts, "experts_kept": count, "data": str(Path(data).resolve()),
            "rows": rows, "rows_scored": len(task_rows), "params_before": before, "params_after": after,
            "kept": kept, "scores": {b: [round(float(x), 8) for x in s] for b, s in scores.items()}})
        print(f"kept {count} of {arch.num_experts} experts in each of {len(arch.layers)} MoE layers: "
              f"{before:,} -> {after:,} parameters ({after / before:.1%})")
        evaluate_and_report(pruned, tokenizer, cfg, tmp / EVAL_DIR, base=base, label="pruned",
                            expert_ids={"pruned": (arch.num_experts, kept)})
    print(f"pruned model: {out}\nreport: {out / EVAL_DIR / REPORT_MD}")
    return out

