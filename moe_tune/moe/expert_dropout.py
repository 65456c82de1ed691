"""Expert dropout against overfitting, for every family, through hooks (no copied modeling code).

- ``dropout``: dropout on the output of the routed experts (and, optionally, of the shared
  experts), at its own rate: Switch Transformer fine-tunes with 0.4 at expert layers and 0.1
  elsewhere.
- ``drop_expert_prob``: each of a token's selected experts is dropped with this probability
  and the remaining gate weights are rescaled to the original total (at least one expert is
  kept per token).

Both act only in training mode; in eval mode the hooks return without touching anything, so
outputs are bit-identical to a model without them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import MoeArch


def _routing_args(args: tuple) -> tuple[int, int] | None:
    """Positions of (top_k_index (tokens, k) int, top_k_weights (tokens, k) float) among the
    experts module's positional arguments (transformers 5: ``experts(hidden, index, weights)``)."""
    ints = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not a.is_floating_point()]
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for i in ints:
        for j in floats:
            if args[j].shape == args[i].shape and args[i].dim() == 2:
                return i, j
    return None


def drop_selected(weights: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """weights (tokens, k): zero each entry with probability p, keep at least the largest per
    token, and rescale the kept ones to the original row sum."""
    keep = torch.rand(weights.shape, device=weights.device, generator=generator) >= p
    best = weights.argmax(-1, keepdim=True)
    keep.scatter_(-1, best, True)  # never drop every expert of a token
    kept = weights * keep
    scale = weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-12)
    return kept * scale


class ExpertDropout:
    """``ExpertDropout(model, arch, dropout=0.4, drop_expert_prob=0.1).attach()``; ``detach()`` removes it."""

    def __init__(self, model: nn.Module, arch: MoeArch, dropout: float = 0.0, shared_dropout: bool = False,
                 drop_expert_prob: float = 0.0):
        self.model, self.arch = model, arch
        self.dropout, self.shared_dropout, self.drop_expert_prob = dropout, shared_dropout, drop_expert_prob
        self._handles = []

    def _experts_module(self, block: str) -> nn.Module:
        module = self.model.get_submodule(block)
        return dict(module.named_children()).get("experts", module)  # jetmoe: experts live on the block

    def attach(self) -> ExpertDropout:
        for layer in self.arch.layers:
            experts = self._experts_module(layer.block)
            if self.dropout:
                self._handles.append(experts.register_forward_hook(self._output_dropout))
            if self.drop_expert_prob:
                self._handles.append(experts.register_forward_pre_hook(self._drop_experts))
            if self.dropout and self.shared_dropout:
                for name in layer.shared:
                    if not name.endswith("_gate"):
                        module = self.model.get_submodule(name)
                        self._handles.append(module.register_forward_hook(self._output_dropout))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _output_dropout(self, module, args, output):
        if not module.training:
            return None
        if isinstance(output, tuple):
            return (F.dropout(output[0], self.dropout, training=True), *output[1:])
        return F.dropout(output, self.dropout, training=True)

    def _drop_experts(self, module, args):
        if not module.training:
            return None
        positions = _routing_args(args)
        if positions is None:
            raise MoeTuneError(f"experts.drop_expert_prob: {self.arch.family}'s experts are not called with "
                               "(hidden, top_k_index, top_k_weights); use experts.dropout instead")
        _, j = positions
        args = list(args)
        args[j] = drop_selected(args[j], self.drop_expert_prob)
        return tuple(args)
