"""PEFT's LoRA on fused expert parameters, read and rerouted for moe_tune's experts kernel.

moe_tune's one reach into PEFT's internals: the LoRA factors of a ``ParamWrapper`` (their layout,
scaling and active adapter) and the rebinding of its forward. PEFT keeps owning the factors
(saving, loading and merging for export are PEFT's). Kept here alone, and guarded by
tests/test_experts_kernel.py (test_lora_really_goes_through_the_grouped_inputs and the numeric
comparisons with PEFT's own path), which fail if PEFT changes underneath.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch
from torch import nn

LORA_ATTR = "_moe_tune_lora"  # on an experts module: {parameter name: PEFT ParamWrapper}


class LoraFactors(NamedTuple):
    """One fused expert parameter's LoRA: y += scaling * (x A_e^T) B_e^T for expert e."""

    a: torch.Tensor  # (E, r, in)
    b: torch.Tensor  # (E, out, r)
    scaling: float


def lora_factors(wrapper) -> LoraFactors | None:
    """The factors of a PEFT ParamWrapper's one active adapter, or None when it contributes
    nothing here (adapters disabled, merged into the weight, or not exactly one active adapter:
    then PEFT's own forward handles it)."""
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if wrapper.disable_adapters or wrapper.merged or len(active) != 1:
        return None
    name, experts = active[0], wrapper.num_experts
    a = wrapper.lora_A[name].weight  # (r*E, in): rows grouped by expert, r per expert
    b = wrapper.lora_B[name].weight  # (out, r*E): columns interleaved, expert index fastest
    a = a.view(experts, -1, a.shape[-1])  # (E, r, in)
    b = b.view(b.shape[0], -1, experts).permute(2, 0, 1).contiguous()  # (E, out, r), small
    return LoraFactors(a, b, wrapper.scaling[name])


class Wrapped(NamedTuple):
    """A module whose parameters LoRA targets, as PEFT wraps it: one ParamWrapper per targeted
    parameter, nested."""

    outer: nn.Module  # the outermost ParamWrapper
    module: nn.Module  # the module they wrap
    chain: dict[str, nn.Module]  # {parameter name: its ParamWrapper}, outermost first


def wrapped_modules(model: nn.Module) -> list[Wrapped]:
    """Every module of ``model`` whose parameters LoRA targets."""
    from peft.tuners.lora.layer import ParamWrapper  # noqa: PLC0415 -- PEFT loads only where LoRA is used

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    found = []
    for outer in (w for w in wrappers if id(w) not in inner):
        chain, layer = {}, outer
        while isinstance(layer, ParamWrapper):
            chain[layer.parameter_name] = layer
            layer = layer.base_layer
        found.append(Wrapped(outer, outer.get_base_layer(), chain))
    return found


def reroute(wrapped: Wrapped) -> None:
    """Let the wrapped module learn its wrappers (LORA_ATTR), and make the outermost wrapper's
    forward call the module directly when every wrapper has one plain active adapter, falling
    back to PEFT's own forward otherwise (several adapters, merged, disabled)."""
    outer, experts = wrapped.outer, wrapped.module
    setattr(experts, LORA_ATTR, wrapped.chain)
    outer.forward = types.MethodType(_rerouted_forward(outer.forward, experts, list(wrapped.chain.values())), outer)


def _rerouted_forward(peft_forward, experts, chain):
    def forward(self, x, *args, **kwargs):
        if "adapter_names" not in kwargs and all(lora_factors(w) is not None for w in chain):
            return experts(x, *args, **kwargs)
        return peft_forward(x, *args, **kwargs)
    return forward
