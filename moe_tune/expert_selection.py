"""ESFT-style expert selection: train only the experts that matter for the task.

Each MoE layer's experts are scored on the recipe's training data, either by average gate
score (the router's probability for the expert, averaged over tokens) or by token-selection
ratio (the share of top-k slots that go to the expert). Per layer, the smallest set of
experts whose cumulative share reaches ``top_p`` is kept (Wang et al. 2024, ESFT).

Training then updates only those experts' slices of the fused expert tensors: gradient hooks
zero the rest (full weights), or zero the LoRA rows and columns that belong to the rest, so
unselected experts stay bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moe_tune.arch import MoeArch
from moe_tune.data import read_chat_rows
from moe_tune.errors import MoeTuneError
from moe_tune.routing import RouterTap, chat_batches, on_device
from moe_tune.run_dir import write_json
from moe_tune.trainable import base_name


def score_experts(model: nn.Module, arch: MoeArch, tokenizer, rows: list[dict], method: str,
                  batch_size: int = 32) -> dict[str, list[float]]:
    """Per MoE layer, each expert's share of the routing on ``rows`` (shares sum to 1)."""
    from moe_tune.evaluate import inference_mode  # noqa: PLC0415

    totals = {layer.block: torch.zeros(layer.num_experts) for layer in arch.layers}
    with inference_mode(model), RouterTap(model, arch) as tap:
        for _, enc in chat_batches(tokenizer, rows, batch_size):
            model(**on_device(model, enc))
            for block, routing in tap.take(enc["attention_mask"]).items():
                if method == "gate":
                    totals[block] += routing.probs.sum(0)  # (E,)
                else:  # token-selection ratio
                    totals[block] += torch.bincount(routing.topk.reshape(-1), minlength=len(totals[block])).float()
    return {block: (t / t.sum()).tolist() for block, t in totals.items()}


def select_top_p(shares: dict[str, list[float]], top_p: float) -> dict[str, list[int]]:
    """Per layer, the fewest experts (highest share first) whose shares add up to ``top_p``."""
    selection = {}
    for block, layer_shares in shares.items():
        order = sorted(range(len(layer_shares)), key=lambda e: -layer_shares[e])
        kept, total = [], 0.0
        for expert in order:
            kept.append(expert)
            total += layer_shares[expert]
            if total >= top_p - 1e-9:
                break
        selection[block] = sorted(kept)
    return selection


def save_selection(path: Path, method: str, top_p: float, shares: dict, selection: dict) -> None:
    write_json(path, {"method": method, "top_p": top_p, "selected": selection, "shares": shares})


def scoring_rows(recipe) -> list[dict]:
    """The training rows experts are scored on."""
    cfg = recipe.trainable.selection()
    return read_chat_rows(recipe.data.train, cfg.rows, recipe.data.format, recipe.data.skip_bad_rows)


def select_experts(recipe, model: nn.Module, arch: MoeArch, tokenizer,
                   rows: list[dict] | None = None) -> tuple[dict, dict]:
    """(shares, selection) from the recipe's saved file, or by scoring its training data
    (``rows``, where the caller has read them already)."""
    cfg = recipe.trainable.selection()
    if cfg.file:
        return {}, load_selection(cfg.file, arch)
    rows = rows if rows is not None else scoring_rows(recipe)
    shares = score_experts(model, arch, tokenizer, rows, cfg.score)
    return shares, select_top_p(shares, cfg.top_p)


def check_selection(recipe, plan) -> None:
    """Expert selection restricts the routed experts; say early when it cannot."""
    if recipe.trainable.selection() is None:
        return
    mode = plan.modes["routed_experts"]
    if mode == "freeze":
        raise MoeTuneError("trainable.expert_selection: the routed experts are frozen; set "
                           "trainable.routed_experts to train or lora")
    if mode == "train" and plan.lora_targets:
        raise MoeTuneError("trainable.expert_selection: selected experts trained in full cannot be combined "
                           "with LoRA on other parts; use routed_experts: lora, or no LoRA")
    if mode == "train" and recipe.sft.get("weight_decay"):
        raise MoeTuneError("sft.weight_decay: weight decay would move the unselected experts too; "
                           "set it to 0 with expert selection")


def load_selection(path: str | Path, arch: MoeArch) -> dict[str, list[int]]:
    path = Path(path)
    try:
        selected = json.loads(path.read_text())["selected"]
    except FileNotFoundError:
        raise MoeTuneError(f"{path}: expert selection file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MoeTuneError(f"{path}: not an expert selection (JSON with a 'selected' mapping, as written by "
                           "moe-tune select-experts)") from None
    for layer in arch.layers:
        experts = selected.get(layer.block)
        if not isinstance(experts, list) or any(not 0 <= e < layer.num_experts for e in experts):
            raise MoeTuneError(f"{path}: no valid expert list for MoE layer '{layer.block}' "
                               f"(expert ids 0..{layer.num_experts - 1})")
    return {layer.block: selected[layer.block] for layer in arch.layers}


def _keep_mask(n_experts: int, experts: list[int]) -> torch.Tensor:
    mask = torch.zeros(n_experts)
    mask[experts] = 1.0
    return mask


def _mask_rows(tensor: nn.Parameter, row_mask: torch.Tensor) -> None:
    """Zero the gradient of rows (dim 0 blocks) whose mask is 0."""
    shape = (-1,) + (1,) * (tensor.dim() - 1)
    mask = row_mask.to(tensor.device, tensor.dtype).reshape(shape)
    tensor.register_hook(lambda grad: grad * mask)


def restrict_full(model: nn.Module, arch: MoeArch, selection: dict[str, list[int]]) -> None:
    """Full-weight training of the routed experts, limited to the selected experts' slices."""
    params = dict(model.named_parameters())
    for layer in arch.layers:
        keep = _keep_mask(layer.num_experts, selection[layer.block])  # (E,)
        for name in layer.expert_params + layer.expert_other:
            p = params[name]
            if p.shape[0] % layer.num_experts:  # not per expert (jetmoe's shared output bias): freeze
                p.requires_grad_(False)
                continue
            # (E,) -> one entry per row; flat (dbrx) tensors hold E blocks of rows
            _mask_rows(p, keep.repeat_interleave(p.shape[0] // layer.num_experts))


def restrict_lora(model: nn.Module, arch: MoeArch, selection: dict[str, list[int]], adapter: str = "default"):
    """LoRA on fused experts, limited to the selected experts.

    PEFT stores expert e's rank-r factors as rows e*r..(e+1)*r of lora_A (r*E, in) and as
    columns e, e+E, e+2E, ... of lora_B (out, r*E); B starts at zero, so masking both keeps
    every unselected expert's update exactly zero."""
    from peft.tuners.lora import ParamWrapper  # noqa: PLC0415

    by_tensor = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper) and adapter in module.lora_A:
            by_tensor[f"{base_name(name)}.{module.parameter_name}"] = module
    for layer in arch.layers:
        keep = _keep_mask(layer.num_experts, selection[layer.block])  # (E,)
        for name in layer.expert_params:
            module = by_tensor.get(name)
            if module is None:
                continue
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            rank = a.shape[0] // layer.num_experts
            _mask_rows(a, keep.repeat_interleave(rank))  # (r*E, in): expert-major rows
            col_mask = keep.repeat(rank).to(b.device, b.dtype)  # (r*E,): column c belongs to expert c % E
            b.register_hook(lambda grad, m=col_mask: grad * m)
