"""Multi-process runs under ``torchrun`` or ``accelerate launch``: who writes, and what the
engines need to know about MoE blocks.

The launcher sets RANK and WORLD_SIZE; Trainer (through accelerate) does the rest: the process
group, a data shard per rank, gradient averaging, FSDP or DeepSpeed wrapping. moe_tune only
keeps run files to rank 0 and tells DeepSpeed ZeRO-3 where MoE blocks are.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from moe_tune.errors import MoeTuneError
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
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def weighted_means(values: dict[str, list[tuple[float, int]]], device) -> dict[str, float]:
    """Per name, the weighted mean of its (value, weight) pairs over every rank (each rank's
    cross-entropy is its share of the batch's; the router terms are the same on every rank)."""
    names = sorted(values)
    sums = torch.tensor([[sum(v * w for v, w in values[n]), sum(w for _, w in values[n])] for n in names],
                        dtype=torch.float64, device=device).reshape(-1, 2)
    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)  # every rank logs at the same steps, with the same names
    return {n: (s / w).item() for n, (s, w) in zip(names, sums)}


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


# --- sharded at load time: the recipe's parallel section on transformers' DistributedConfig -----

def accelerate_sharding() -> str | None:
    """The accelerate or Trainer sharding a launch or the recipe asks for, by name, or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "accelerate's FSDP config"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "accelerate's DeepSpeed config"
    return None


def ep_alone(parallel) -> bool:
    return parallel.ep_size > 1 and parallel.fsdp_size == parallel.tp_size == 1


def batch_sharers(parallel) -> int:
    """Ranks that see the same batch: the tensor-parallel group, or the expert group alone."""
    return parallel.ep_size if ep_alone(parallel) else parallel.tp_size


def processes(parallel) -> int:
    """The processes a parallel section's layout needs."""
    return parallel.dp_replicate_size * parallel.fsdp_size * batch_sharers(parallel)


def check_parallel(parallel, sft: dict, bits: int | None, modes: dict[str, str], meta: nn.Module,
                   arch: MoeArch, planning: bool = False) -> None:
    """Refuse, before anything loads, a ``parallel:`` layout that transformers' engine would reject
    or that cannot run here, each in one line; nothing when the recipe has no parallel section.
    ``planning`` (moe-tune plan, one process): the layout as if launched, for the GPUs it plans."""
    if parallel is None:
        return
    n = processes(parallel) if planning else world_size()
    if processes(parallel) == 1:
        raise MoeTuneError("parallel: every size is 1, which shards nothing; set parallel.fsdp_size (or ep_size, "
                           "tp_size) to the number of processes, or drop the parallel section")
    if n == 1:
        raise MoeTuneError(f"parallel: the layout needs {processes(parallel)} processes and this is one; launch with "
                           f"torchrun --nproc_per_node {processes(parallel)} -m moe_tune.cli train ...")
    if processes(parallel) != n:
        sizes = "dp_replicate_size x ep_size" if ep_alone(parallel) else "dp_replicate_size x fsdp_size x tp_size"
        raise MoeTuneError(f"parallel: {sizes} = {processes(parallel)}, but {n} processes were launched; they must "
                           f"be equal")
    if parallel.ep_size > 1:
        if not ep_alone(parallel) and (parallel.ep_size % parallel.tp_size
                                      or (parallel.fsdp_size * parallel.tp_size) % parallel.ep_size):
            raise MoeTuneError(f"parallel.ep_size: {parallel.ep_size} must be a multiple of tp_size "
                               f"({parallel.tp_size}) and divide fsdp_size x tp_size "
                               f"({parallel.fsdp_size * parallel.tp_size})")
        counts = sorted({layer.num_experts for layer in arch.layers})
        if any(c % parallel.ep_size for c in counts):
            raise MoeTuneError(f"parallel.ep_size: {parallel.ep_size} does not divide the model's "
                               f"{'/'.join(map(str, counts))} routed experts; each rank must hold as many")
        if not getattr(meta, "ep_plan", None):
            raise MoeTuneError(f"parallel.ep_size: {type(meta).__name__} has no expert-parallel plan in "
                               f"transformers; shard it with parallel.fsdp_size alone")
    if parallel.ep_size > 1 and modes["routed_experts"] == "lora":
        raise MoeTuneError("parallel.ep_size: transformers' expert-parallel forward bypasses PEFT's LoRA on the "
                           "routed experts (nothing would train); with LoRA on the experts shard with "
                           "parallel.fsdp_size alone")
    if batch_sharers(parallel) > 1 and not planning:
        # accelerate refuses a tensor-parallel group off GPUs (its ParallelismConfig check), and two
        # ranks cannot share one GPU: no machine this was built on could check it against one process
        what = "expert parallelism alone" if ep_alone(parallel) else "parallel.tp_size"
        why = "moe_tune has not checked against one process" if torch.cuda.is_available() else \
            "accelerate trains on GPUs only"
        raise MoeTuneError(f"parallel: {what} makes ranks share a batch (a tensor-parallel group), which {why}; "
                           f"set parallel.fsdp_size with ep_size (FSDP2 x EP), which shards the experts as EP does")
    if parallel.tp_size > 1 and not getattr(meta, "tp_plan", None):
        raise MoeTuneError(f"parallel.tp_size: {type(meta).__name__} has no tensor-parallel plan in transformers; "
                           f"use parallel.fsdp_size")
    for key in ("fsdp", "fsdp_config", "deepspeed"):
        if sft.get(key):
            raise MoeTuneError(f"sft.{key}: the parallel section already shards the model (transformers' engine); "
                               f"use one of the two, not both")
    other = accelerate_sharding()
    if other:
        raise MoeTuneError(f"parallel: {other} shards the model too; launch with plain torchrun for the parallel "
                           f"section, or drop it and keep the accelerate config")
    if bits is not None:
        raise MoeTuneError(f"model.load_in_{bits}bit: bitsandbytes weights are not sharded by transformers' engine; "
                           f"drop the parallel section or the quantization")


def distributed_config(parallel):
    """transformers' DistributedConfig for the recipe's parallel section (None without one). EP
    alone is transformers' tensor-parallel group with an empty tp_plan: its ranks share a batch,
    keep the dense weights whole and send tokens to their experts with an all-to-all."""
    if parallel is None:
        return None
    from transformers.distributed import DistributedConfig  # noqa: PLC0415

    return DistributedConfig(fsdp_size=parallel.fsdp_size, ep_size=parallel.ep_size, tp_size=batch_sharers(parallel),
                             dp_replicate_size=parallel.dp_replicate_size,
                             tp_plan={} if ep_alone(parallel) else None,
                             fsdp_cpu_offload=parallel.fsdp_cpu_offload,
                             fsdp_mixed_precision=parallel.fsdp_mixed_precision,
                             ep_implementation="all_to_all" if parallel.ep_size > 1 else "auto")


def reshard(model: nn.Module) -> None:
    """Free what a forward left gathered (FSDP2's keep_full_weight units, after expert scoring), so
    that the model holds its sharded parameters again; nothing on an unsharded model."""
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
