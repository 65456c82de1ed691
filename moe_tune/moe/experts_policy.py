"""When a run uses moe_tune's experts kernel (experts_kernel), and how its experts are held.

The kernel is registered in transformers' experts interface under NAME and switched on per model
(``use_experts_kernel``); PEFT's LoRA on fused expert parameters is pointed at it
(``route_lora_through``); frozen experts a checkpoint stores in bf16 stay in bf16
(``holds_frozen_experts_in_bf16``); under activation checkpointing each expert's weight is cast
on use (``cast_on_use``).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_tune.model.loading import checkpoint_dtypes
from moe_tune.moe.experts_kernel import experts_forward
from moe_tune.moe.experts_lora import reroute, wrapped_modules
from moe_tune.moe.step_memory import CAST_ON_USE_ATTR

NAME = "moe_tune"  # the name registered in transformers' ExpertsInterface


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: PLC0415

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)


def use_experts_kernel(model: nn.Module) -> bool:
    """Switch every fused-experts module of ``model`` to ``experts_forward``; False when the
    model's experts do not go through transformers' experts interface (nothing changes)."""
    if not getattr(model, "_can_set_experts_implementation", lambda: False)():
        return False
    register()
    model.set_experts_implementation(NAME)
    return True


def stored_in_bf16(path: str) -> bool:
    """Whether the checkpoint folder ``path`` stores every floating-point tensor in bf16, as
    published MoE checkpoints do, routed experts (names with ``.experts.``) among them. Loading
    it in bf16 then rounds nothing: a tensor kept in fp32 (a norm, a router bias) would be."""
    dtypes = checkpoint_dtypes(path)
    if any(d in ("F32", "F16", "F64", "F8_E4M3", "F8_E5M2") for d in dtypes.values()):
        return False
    return any(".experts." in key for key in dtypes)


def holds_frozen_experts_in_bf16(recipe, sft_args, routed_experts_mode: str) -> bool:
    """Whether a run loads its frozen routed experts in bf16 and keeps them so, with every other
    weight in fp32 (loading.load_model's ``bf16_experts``).

    Under bf16 autocast on a CPU, the kernel would cast each fp32 expert weight to bf16 on every
    forward and keep that copy for the backward. Where the checkpoint stores the experts in bf16,
    fp32 would only widen them: kept in bf16 they hold the same values, the kernel computes
    exactly the same, a frozen expert weight takes 2 bytes instead of 4 (plus 2 for the copy), no
    step casts it, and loading never materialises them in fp32. A saved model stores them in
    bf16, as the checkpoint did. Only on a CPU, with fp32 weights, bf16 autocast, this kernel,
    and no FSDP, DeepSpeed or parallel section (which shard parameters by dtype)."""
    return (not torch.cuda.is_available() and bool(sft_args.bf16) and recipe.model.dtype == "float32"
            and recipe.model.bits is None and recipe.model.experts_implementation == NAME
            and routed_experts_mode != "train" and not sft_args.fsdp and not sft_args.deepspeed
            and recipe.parallel is None
            and stored_in_bf16(recipe.model.path))


def cast_on_use(model: nn.Module, expert_modules: list[str], on: bool) -> None:
    """With ``on``, the CPU loop casts each expert's weight to the compute dtype when it uses it,
    in forward and again in backward, instead of casting the whole (E, out, in) tensor once and
    keeping that copy from forward to backward: for activation checkpointing, whose point is
    memory. At the Qwen3-30B-A3B shape the copy is 1.2 GB per layer, which checkpointing would
    otherwise hold through each layer's backward. Nor do the layers keep their activation
    buffers from step to step then (step_memory.kept_activation)."""
    for name in expert_modules:
        setattr(model.get_submodule(name), CAST_ON_USE_ATTR, on)


def route_lora_through(model: nn.Module) -> int:
    """Point PEFT's LoRA on fused expert parameters at ``experts_forward`` (experts_lora.reroute):
    the experts module applies each expert's LoRA to its grouped inputs whenever every wrapper
    has one plain active adapter, and PEFT's own forward runs otherwise. Returns the number of
    experts modules rerouted."""
    rerouted = 0
    for wrapped in wrapped_modules(model):
        # PEFT also wraps plain Linear weights targeted as parameters: only fused experts reroute
        if getattr(getattr(wrapped.module, "config", None), "_experts_implementation", None) == NAME:
            reroute(wrapped)
            rerouted += 1
    return rerouted
