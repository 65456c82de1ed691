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

import contextlib
import inspect
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moe_tune.data.rows import read_chat_rows
from moe_tune.errors import MoeTuneError, shown
from moe_tune.evaluation.heldout import inference_mode
from moe_tune.model.arch import MoeArch
from moe_tune.moe.routing import RouterTap, chat_batches, on_device
from moe_tune.plan.modes import base_name
from moe_tune.training.run_dir import write_json


class _ExpertOutputs:
    """REAP's per-expert statistic, gathered where routing meets the experts: a forward
    pre-hook on each MoE block's experts module sees the tokens (tokens, H), the chosen experts
    (tokens, k) and the weights the block applies to them (tokens, k), after any top-k
    renormalisation or scaling. Each expert's own output f_j(x) is the experts module run on
    the tokens routed to j alone, with weight 1: the family's own expert computation."""

    def __init__(self, model: nn.Module, arch: MoeArch):
        self.experts = {layer.block: expert_module(model, layer) for layer in arch.layers}
        self.sums = {layer.block: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in arch.layers}
        self.counts = {layer.block: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in arch.layers}
        self.keep: torch.Tensor | None = None  # (tokens,) bool: the batch's real tokens
        self._inside, self._handles = False, []

    def _hook(self, block: str):
        def hook(module, args):
            if self._inside:  # our own per-expert calls below
                return
            hidden, index, weight = args[0], args[1], args[2]
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, H)
            index, weight = index.reshape(hidden.shape[0], -1), weight.reshape(hidden.shape[0], -1)  # (tokens, k)
            if self.keep is not None and self.keep.numel() == hidden.shape[0]:
                keep = self.keep.to(hidden.device)
                hidden, index, weight = hidden[keep], index[keep], weight[keep]
            self._inside = True
            try:
                for expert in index.unique().tolist():
                    token, slot = (index == expert).nonzero(as_tuple=True)  # (n,) each
                    n = token.numel()
                    ones = torch.ones(n, 1, dtype=weight.dtype, device=weight.device)
                    out = module(hidden[token], torch.full((n, 1), expert, dtype=index.dtype, device=index.device), ones)  # (n, H)
                    self.sums[block][expert] += float((weight[token, slot].double() * out.double().norm(dim=-1)).sum())
                    self.counts[block][expert] += n
            finally:
                self._inside = False
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(b)) for b, m in self.experts.items()]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def scores(self) -> dict[str, torch.Tensor]:
        """(E,) per layer: mean over the tokens routed to each expert of g_j(x) * ||f_j(x)||; 0
        for an expert no token reached."""
        return {b: (self.sums[b] / self.counts[b].clamp_min(1)).float() for b in self.sums}


def expert_module(model: nn.Module, layer) -> nn.Module:
    """The experts module of ``layer``, where it takes (tokens, top-k experts, their weights)
    as transformers' experts interface does; REAP needs to run one expert at a time through it."""
    module = getattr(model.get_submodule(layer.block), "experts", None)
    params = list(inspect.signature(module.forward).parameters) if module is not None else []
    if len(params) < 3:
        raise MoeTuneError(f"{layer.block}: its experts do not take (tokens, expert ids, weights) "
                           "as transformers' experts interface does, so each expert's output cannot be "
                           "measured alone; score by frequency or gate instead")
    return module


def expert_scores(model: nn.Module, arch: MoeArch, tokenizer, rows: list[dict], method: str,
                  batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Per MoE layer, (E,) scores of its experts on ``rows`` (teacher-forced, padding excluded):

    - gate: the router's probability for the expert, averaged over tokens;
    - token: the share of the top-k slots that go to the expert (sums to 1);
    - reap: REAP (Lasby et al. 2025), the router-weighted norm of the expert's output,
      averaged over the tokens routed to it: mean over x in X_j of g_j(x) * ||f_j(x)||_2."""

    totals = {layer.block: torch.zeros(layer.num_experts) for layer in arch.layers}
    outputs = _ExpertOutputs(model, arch) if method == "reap" else None
    tokens = 0
    with inference_mode(model), RouterTap(model, arch) as tap, outputs or contextlib.nullcontext():
        for _, enc in chat_batches(tokenizer, rows, batch_size):
            if outputs is not None:
                outputs.keep = enc["attention_mask"].reshape(-1).bool()
            model(**on_device(model, enc))
            tokens += int(enc["attention_mask"].sum())
            for block, routing in tap.take(enc["attention_mask"]).items():
                if method == "gate":
                    totals[block] += routing.probs.sum(0)  # (E,)
                else:  # token-selection counts
                    totals[block] += torch.bincount(routing.topk.reshape(-1), minlength=len(totals[block])).float()
    if outputs is not None:
        return outputs.scores()
    if method == "gate":
        return {block: t / max(tokens, 1) for block, t in totals.items()}
    return {block: t / t.sum().clamp_min(1) for block, t in totals.items()}


def score_experts(model: nn.Module, arch: MoeArch, tokenizer, rows: list[dict], method: str,
                  batch_size: int = 32) -> dict[str, list[float]]:
    """Per MoE layer, each expert's share of the routing on ``rows`` (shares sum to 1)."""
    scores = expert_scores(model, arch, tokenizer, rows, method, batch_size)
    return {block: (t / t.sum()).tolist() for block, t in scores.items()}


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
        raise MoeTuneError(f"{shown(path)}: expert selection file not found") from None
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


class ShardedGradMask(NamedTuple):
    """A sharded parameter (DTensor) and its row mask (E, 1, ...), sharded alike: its gradient is
    whole only inside FSDP's backward, so the mask applies to the reduced gradient after it
    (``mask_sharded_grads``), before clipping and the optimizer step."""

    param: nn.Parameter
    mask: torch.Tensor


def _mask_rows(tensor: nn.Parameter, row_mask: torch.Tensor) -> ShardedGradMask | None:
    """Zero the gradient of rows (dim 0 blocks) whose mask is 0."""
    shape = (-1,) + (1,) * (tensor.dim() - 1)
    mask = row_mask.to(tensor.device, tensor.dtype).reshape(shape)
    if isinstance(tensor, DTensor):  # a collective: every rank restricts the same parameters in order
        return ShardedGradMask(tensor, distribute_tensor(mask, tensor.device_mesh, tensor.placements))
    tensor.register_hook(lambda grad: grad * mask)
    return None


def mask_sharded_grads(masks: list[ShardedGradMask]) -> None:
    for param, mask in masks:
        if param.grad is not None:  # None between the micro-batches of a deferred reduction
            param.grad.mul_(mask)


def restrict_full(model: nn.Module, arch: MoeArch, selection: dict[str, list[int]]) -> list[ShardedGradMask]:
    """Full-weight training of the routed experts, limited to the selected experts' slices;
    returns the masks of sharded parameters, which the trainer applies after each backward."""
    params = dict(model.named_parameters())
    sharded = []
    for layer in arch.layers:
        keep = _keep_mask(layer.num_experts, selection[layer.block])  # (E,)
        for name in layer.expert_params + layer.expert_other:
            p = params[name]
            if p.shape[0] % layer.num_experts:  # not per expert (jetmoe's shared output bias): freeze
                p.requires_grad_(False)
                continue
            # (E,) -> one entry per row; flat (dbrx) tensors hold E blocks of rows
            mask = _mask_rows(p, keep.repeat_interleave(p.shape[0] // layer.num_experts))
            if mask is not None:
                sharded.append(mask)
    return sharded


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
