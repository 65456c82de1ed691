"""Multi-process runs under ``torchrun`` or ``accelerate launch``: who writes, and what the
engines need to know about MoE blocks.

The launcher sets RANK and WORLD_SIZE; Trainer (through accelerate) does the rest: the process
group, a data shard per rank, gradient averaging, FSDP or DeepSpeed wrapping. moe_tune only
keeps run files to rank 0 and tells DeepSpeed ZeRO-3 where MoE blocks are.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import nn

from moe_tune.model.arch import MoeArch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """The process that writes run files, prints reports and evaluates."""
    return rank() == 0


def join(args) -> None:
    """Join the process group now (TrainingArguments sets it up on the first use of its device),
    so that ranks can wait for each other before anything is written."""
    if world_size() > 1:
        _ = args.device


def barrier() -> None:
    """Wait for every rank (no-op in a single process or before the process group exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce; a plain bool alone)."""
    if world_size() == 1 or not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch  # noqa: PLC0415

    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def zero3_enabled() -> bool:
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":  # set by accelerate launch
        return True
    from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: PLC0415

    return is_deepspeed_zero3_enabled()


def register_moe_leaf_modules(model: nn.Module, arch: MoeArch) -> list[str]:
    """ZeRO-3 gathers parameters module by module as hooks fire; a MoE block calls only the
    experts its tokens route to, so ranks fire different hooks and hang. Registered as leaf
    modules, each block's parameters are gathered whole. Returns the classes registered."""
    if not zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules  # noqa: PLC0415

    classes = sorted({type(model.get_submodule(layer.block)) for layer in arch.layers}, key=lambda c: c.__name__)
    set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]
