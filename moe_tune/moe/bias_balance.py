"""Aux-loss-free load balancing (DeepSeek-V3; Wang et al. 2024, "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts").

Routers of the DeepSeek-V3 kind pick their top-k experts by ``score + b``, where ``b`` (E,) is a
selection-only bias (``e_score_correction_bias``; the gate weights use the score alone). After
every optimizer step each expert's bias moves against its load,

    b_e += u * sign(mean_load - load_e)        load_e: share of the step's top-k slots, padding excluded

so routing evens out with no gradient term in the loss. The bias is the family's own tensor, so
it is saved, resumed and exported with the model as any checkpoint of that family is. Families
without one are refused: adding a bias their code does not read would change nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import MoeArch
from moe_tune.moe.routing import router_bias, router_bias_name


def check_bias_balance(router, arch: MoeArch, modes: dict[str, str], lora: bool, tensors: dict) -> None:
    """``router`` is the recipe's RouterSection; one line where bias balancing cannot apply."""
    if not router.bias_balance_rate:
        return
    if modes["router"] == "lora":
        raise MoeTuneError("router.bias_balance_rate: the router is LoRA-adapted (trainable.router: lora); bias "
                           "balancing moves the router's own selection bias, so set trainable.router to train or freeze")
    if lora:
        raise MoeTuneError("router.bias_balance_rate: a LoRA run saves only its adapter, and the balanced selection "
                           "bias would be lost with the base weights; use it with full or frozen parts, no LoRA")
    if any(router_bias(tensors, layer, correction=True) is None for layer in arch.layers):
        raise MoeTuneError(f"router.bias_balance_rate: {arch.family} routers have no selection (score-correction) "
                           "bias to balance, as DeepSeek-V3, GLM-4-MoE or Ernie-4.5 have; use router.aux_loss_coef "
                           "to balance this family")


class BiasBalancer:
    """Counts each MoE layer's top-k choices in training forwards (``take`` after each forward,
    with its attention mask) and moves the selection biases at each optimizer step (``step``, which
    the trainer calls)."""

    def __init__(self, model: nn.Module, arch: MoeArch, rate: float):
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        self.rate = rate
        # the model's own tensors, (E,) or (1, E): the ones it saves and routes with
        self.bias = {layer.block: tensors[router_bias_name(tensors, layer, correction=True)] for layer in arch.layers}
        self.counts = {layer.block: torch.zeros(layer.num_experts) for layer in arch.layers}
        self._chosen: dict[str, torch.Tensor] = {}
        for layer in arch.layers:
            experts = model.get_submodule(layer.block).experts
            experts.register_forward_pre_hook(
                lambda m, args, b=layer.block: self._chosen.__setitem__(b, args[1].detach()))  # (tokens, k)
        self.freeze()

    def freeze(self) -> None:
        """The bias never gets a gradient (it is moved by ``step`` alone); called again after the
        trainable plan, which may have switched the router's tensors on."""
        for bias in self.bias.values():
            bias.requires_grad_(False)

    def take(self, attention_mask: torch.Tensor | None = None) -> None:
        """Count the last forward's choices, padding tokens left out."""
        keep = attention_mask.reshape(-1).bool().cpu() if attention_mask is not None else None  # (tokens,)
        for block, chosen in self._chosen.items():
            chosen = chosen.reshape(-1, chosen.shape[-1]).cpu()  # (tokens, k)
            if keep is not None and keep.numel() == chosen.shape[0]:
                chosen = chosen[keep]
            self.counts[block] += torch.bincount(chosen.reshape(-1), minlength=len(self.counts[block])).float()
        self._chosen.clear()

    @torch.no_grad()
    def step(self) -> None:
        """Move every bias against its layer's load, then start counting afresh. Under DDP the
        counts are summed over processes first, so every rank moves its copy of the bias alike
        (by the load of the whole step's batch, as DeepSeek-V3 balances it)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = next(iter(self.bias.values())).device  # NCCL reduces on the GPU, gloo on the CPU
            stacked = torch.stack(list(self.counts.values())).to(device)  # (layers, E)
            torch.distributed.all_reduce(stacked)
            for counts, total in zip(self.counts.values(), stacked.cpu()):
                counts.copy_(total)
        for block, counts in self.counts.items():
            if counts.sum() > 0:
                load = counts / counts.sum()  # (E,)
                bias = self.bias[block]
                bias += (self.rate * torch.sign(load.mean() - load)).to(bias.device, bias.dtype).reshape(bias.shape)
            counts.zero_()

    def bias_abs_max(self) -> float:
        return max(float(b.abs().max()) for b in self.bias.values())

