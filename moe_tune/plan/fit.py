"""``moe-tune plan --gpu-memory``: will it fit? The peak memory per GPU under DDP, FSDP2 and
ZeRO-3, from the plan report's counts, and the first setting to change when it does not fit.

What one GPU holds at its peak, N GPUs (GB = 1e9 bytes):

    DDP     the whole model's weights, gradients and AdamW states (the plan's memory estimate)
            + the activations of one micro-batch (the plan's activation estimate)
            = the plan's peak, whatever N
    FSDP2   weights, gradients and AdamW states / N (sharded)
            + the activations of one micro-batch (each GPU runs its own: not sharded)
            + the largest decoder layer, gathered whole: accelerate's TRANSFORMER_BASED_WRAP
              wraps the model's ``_no_split_modules``, and FSDP2 all-gathers one wrapped layer
              for its forward and again for its backward, freeing it after
    ZeRO-3  as FSDP2, but the unit gathered whole is the largest MoE block: moe_tune registers
            MoE blocks as DeepSpeed leaf modules (distributed.py), so each is gathered in one piece

Assumed:
  - Sharded training under mixed precision (sft.bf16 / sft.fp16) with 16-bit weights keeps every
    trained weight in fp32: accelerate upcasts trainable parameters for FSDP2, and DeepSpeed keeps
    fp32 master weights. A trained parameter then costs 16 bytes (fp32 weight or master + gradient
    + two AdamW moments) instead of DDP's 4 x 2. LoRA adapters are fp32 already (16 bytes anywhere).
  - A gathered unit costs its weights as the forward reads them (the model's dtype, 4-bit where
    quantized), plus, in backward, its unsharded gradients before they are reduce-scattered
    (full training: in the dtype; LoRA: the fp32 adapter and its gradient). Each decoder layer's
    share of a part's trainable parameters is that part's share in the plan (layers alike).
Not counted: prefetch of the next unit, communication buffers, the CUDA context (0.5-1 GB) and
allocator fragmentation (leave some headroom), and CPU offload (with it, the estimate is an
upper bound).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from moe_tune.errors import MoeTuneError
from moe_tune.plan.accounting import (
    ADAPTER_BYTES,
    DTYPE_BYTES,
    NF4_BYTES,
    memory_bytes,
    micro_batch_activations,
    plan_memory_bytes,
    quantized_weights,
)
from moe_tune.training.distributed import processes

GB, GIB = 1e9, 2**30
# key -> name; recipes/accelerate/KEY.yaml, or the recipe's parallel section (fsdp2, fsdp2_ep)
STRATEGIES = {"ddp": "DDP", "fsdp2": "FSDP2", "fsdp2_ep": "FSDP2 x EP", "zero3": "ZeRO-3"}
DISTRIBUTED_TYPES = {"MULTI_GPU": "ddp", "FSDP": "fsdp2", "DEEPSPEED": "zero3"}  # accelerate's distributed_type


def available_bytes() -> float:
    """Memory this machine can give the run now: the GPU's free memory, or on a CPU the
    kernel's MemAvailable (what a new allocation can get without swapping)."""
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").is_file() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024.0
    return math.inf


def config_path(strategy: str) -> str:
    return f"recipes/accelerate/{strategy}.yaml"


def how_to_run(strategy: str, gpus: int, ep: int) -> str:
    """What sets ``strategy`` up for ``gpus`` GPUs: an accelerate config, or the parallel section
    (FSDP2 runs either way; expert parallelism only there)."""
    if strategy == "fsdp2_ep":
        return f"parallel.fsdp_size: {gpus} with parallel.ep_size: {ep}"
    if strategy == "fsdp2":
        return f"{config_path(strategy)} or parallel.fsdp_size: {gpus}"
    return config_path(strategy)


def expert_parallel_degree(setup, gpus: int) -> int:
    """The recipe's parallel.ep_size, else the most GPUs dividing both the GPU count and every MoE
    layer's expert count; 1 where the family has no expert-parallel plan."""
    if not getattr(setup.meta, "ep_plan", None):
        return 1
    parallel = setup.recipe.parallel
    if parallel is not None and parallel.ep_size > 1:
        return parallel.ep_size
    counts = {layer.num_experts for layer in setup.arch.layers}
    return max(d for d in range(1, gpus + 1) if gpus % d == 0 and all(c % d == 0 for c in counts))


@dataclass(frozen=True)
class Target:
    """The GPUs the plan is judged against."""

    memory: float              # bytes per GPU
    memory_text: str           # as the user gave it, e.g. "80 GiB = 85.899 GB"
    gpus: int
    strategy: str | None       # from --accelerate-config, else None (all three judged)
    notes: list[str] = field(default_factory=list)  # what the accelerate config sets that is not modelled


def parse_memory(text: str) -> tuple[float, str]:
    """'80GB' or '80' -> 80e9 bytes; '80GiB' -> 80 * 2**30 bytes; '141.5GB' -> 141.5e9 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(gb|gib)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise MoeTuneError(f"--gpu-memory {text}: not a size; give the memory of one GPU, above 0, e.g. 80GB "
                           "(GB = 1e9 bytes), 80GiB (2**30 bytes) or 80 (GB)")
    value, gib = float(m.group(1)), (m.group(2) or "").lower() == "gib"
    size = value * (GIB if gib else GB)
    return size, f"{value:g} GiB = {_gb(size)}" if gib else _gb(size)


def _gb(size: float) -> str:
    return f"{round(size / GB, 3):g} GB"


def read_accelerate_config(path: str) -> tuple[str, int | None, list[str]]:
    """(strategy, num_processes, notes) of an accelerate config file (``accelerate config``'s YAML)."""
    if not Path(path).is_file():
        raise MoeTuneError(f"{path}: --accelerate-config not found (e.g. {config_path('fsdp2')})")
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        cfg = None
    kind = cfg.get("distributed_type") if isinstance(cfg, dict) else None
    problem = (f"not an accelerate config (no distributed_type); give one written by `accelerate config`, "
               f"e.g. {config_path('fsdp2')}" if kind is None else
               f"distributed_type {kind}: `moe-tune plan` judges {', '.join(DISTRIBUTED_TYPES)} (DDP, FSDP2, "
               "DeepSpeed ZeRO-3)" if kind not in DISTRIBUTED_TYPES else None)
    if problem:
        raise MoeTuneError(f"{path}: {problem}")
    fsdp, ds = cfg.get("fsdp_config") or {}, cfg.get("deepspeed_config") or {}
    if kind == "DEEPSPEED" and ds.get("zero_stage") != 3:
        raise MoeTuneError(f"{path}: deepspeed_config.zero_stage {ds.get('zero_stage')}: `moe-tune plan` judges "
                           f"ZeRO-3 only; set zero_stage: 3 (as {config_path('zero3')} does)")
    notes = []
    if fsdp.get("fsdp_offload_params") or any(ds.get(k, "none") != "none"
                                               for k in ("offload_optimizer_device", "offload_param_device")):
        notes.append("CPU offload is not counted: the estimate is an upper bound")
    if kind == "FSDP" and fsdp.get("fsdp_version") != 2:
        notes.append(f"fsdp_version {fsdp.get('fsdp_version', 1)} is counted as FSDP2 (both shard parameters, "
                     "gradients and optimizer states)")
    if kind == "FSDP" and fsdp.get("fsdp_reshard_after_forward") is False:
        notes.append("fsdp_reshard_after_forward: false keeps every layer gathered from forward to backward; "
                     "not counted: the estimate is a lower bound")
    processes = cfg.get("num_processes")
    return DISTRIBUTED_TYPES[kind], processes if isinstance(processes, int) and processes > 0 else None, notes


def target(gpu_memory: str | None, gpus: int | None, accelerate_config: str | None) -> Target:
    """The command line's GPUs, checked before anything loads. --gpus and --accelerate-config need
    --gpu-memory; the number of GPUs is --gpus, else the config's num_processes, else 1."""
    if gpu_memory is None:
        given = "--gpus" if gpus is not None else "--accelerate-config"
        raise MoeTuneError(f"{given} needs --gpu-memory, the memory of one GPU (e.g. --gpu-memory 80GB), "
                           "to say whether the run fits")
    if gpus is not None and gpus < 1:
        raise MoeTuneError(f"--gpus {gpus}: give the number of GPUs the run is spread over, 1 or more")
    memory, text = parse_memory(gpu_memory)
    strategy, processes, notes = read_accelerate_config(accelerate_config) if accelerate_config else (None, None, [])
    return Target(memory, text, gpus or processes or 1, strategy, notes)


def _largest_gathered(setup, units: list[str], dtype_bytes: int, expert_share: float = 1.0) -> float:
    """Bytes of the largest of ``units`` (module names) gathered whole, with its gradients; of its
    routed experts, ``expert_share`` (1 / ep_size: expert parallelism gathers a rank's own only)."""
    rows = {r.part: r for r in setup.report.parts}
    bits = setup.recipe.model.bits
    quantized = set(quantized_weights(setup.meta, setup.recipe.model.quantize_experts)) if bits else set()
    size, q, grads = dict.fromkeys(units, 0), dict.fromkeys(units, 0), dict.fromkeys(units, 0.0)
    for name, p in setup.meta.named_parameters():
        pieces = name.split(".")
        unit = next((u for u in (".".join(pieces[:i]) for i in range(1, len(pieces))) if u in size), None)
        if unit is None:  # embeddings, final norm, LM head: gathered outside the decoder layers
            continue
        row = rows[setup.arch.parts[name]]
        n = p.numel() * (expert_share if row.part == "routed_experts" else 1)
        size[unit] += n
        q[unit] += n if name in quantized else 0
        # trained in full: a gradient in dtype; LoRA: fp32 adapter + its gradient; frozen: no trainable share
        grads[unit] += n * row.trainable / row.params * (dtype_bytes if row.mode == "train" else 8)
    double_quant = setup.recipe.model.bnb_4bit_use_double_quant
    return max(plan_memory_bytes(size[u], 0, 0, dtype_bytes, q[u], bits, double_quant=double_quant) + grads[u]
               for u in units)


def per_device(setup, gpus: int) -> dict[str, dict[str, float]]:
    """Bytes per GPU, per strategy: states, activations, gathered unit, and their sum, the peak."""
    report = setup.report
    dtype_bytes = DTYPE_BYTES[report.memory_dtype]
    state = report.state_bytes
    # on a GPU the experts run as transformers' grouped ops, whatever this machine planned with
    acts = micro_batch_activations(setup.meta, setup.arch, report.memory_dtype, setup.sft_args, on_gpu=True,
                                   trained=setup.plan.with_gradients)[0]
    full = report.trained_in_full()  # ESFT: selected experts' share
    mixed = bool(setup.sft_args.bf16 or setup.sft_args.fp16)
    # e.g. bf16: 8 more bytes per trained parameter (16 in fp32 against DDP's 2 + 2 + 2 x 2)
    upcast = full * (ADAPTER_BYTES - 4 * dtype_bytes) if mixed and dtype_bytes == 2 else 0
    wrapped = set(getattr(setup.meta, "_no_split_modules", None) or ())
    layers = [n for n, m in setup.meta.named_modules() if type(m).__name__ in wrapped]
    blocks = [layer.block for layer in setup.arch.layers]
    units = {"fsdp2": layers or [b.rsplit(".", 1)[0] for b in blocks], "zero3": blocks}
    rows = {"ddp": {"states": state, "activations": acts, "gathered": 0.0}}
    for key, unit in units.items():
        rows[key] = {"states": (state + upcast) / gpus, "activations": acts,
                     "gathered": _largest_gathered(setup, unit, dtype_bytes)}
    ep = expert_parallel_degree(setup, gpus)
    if ep > 1:  # FSDP2 x EP: the same shards; a layer gathers its dense part and its own experts
        rows["fsdp2_ep"] = {**rows["fsdp2"], "gathered": _largest_gathered(setup, units["fsdp2"], dtype_bytes, 1 / ep)}
    for row in rows.values():
        row["peak"] = row["states"] + row["activations"] + row["gathered"]
    return rows


def _smaller_batch(b: int, batch: int) -> str:
    return (f"sft.per_device_train_batch_size: {b} (now {batch}; raise sft.gradient_accumulation_steps "
            "to keep the global batch)")


def _activation_remedy(setup, room: float) -> str:
    """The first change that fits one micro-batch's activations into ``room`` bytes: a smaller
    micro-batch, then activation checkpointing (with a smaller micro-batch if need be), then
    shorter rows."""
    sft, dtype = setup.sft_args, setup.report.memory_dtype
    batch, checkpointing = sft.per_device_train_batch_size, bool(sft.gradient_checkpointing)
    left = f"{room / GB:.3f} GB left beside the states"
    for ckpt in dict.fromkeys((checkpointing, True)):  # as the recipe sets it, then with checkpointing
        for b in range(batch, 0, -1):
            acts = micro_batch_activations(setup.meta, setup.arch, dtype, sft, b, ckpt, on_gpu=True,
                                           trained=setup.plan.with_gradients)[0]
            if acts < room:
                change = _smaller_batch(b, batch) if ckpt == checkpointing else \
                    "sft.activation_checkpointing: true" + (f" and {_smaller_batch(b, batch)}" if b < batch else "")
                return f"{change}: activations {acts / GB:.3f} GB, with {left}"
    return f"lower sft.max_length (now {sft.max_length}): one row's activations, checkpointed, exceed the {left}"


def _least_activations(setup) -> tuple[float, str]:
    """(bytes, the changes) of one checkpointed row per micro-batch: the least activations short of
    shorter rows."""
    sft = setup.sft_args
    acts = micro_batch_activations(setup.meta, setup.arch, setup.report.memory_dtype, sft, 1, True,
                                   on_gpu=True)[0]
    changes = ([] if sft.gradient_checkpointing else ["sft.activation_checkpointing: true"]) + (
        [] if sft.per_device_train_batch_size == 1 else [_smaller_batch(1, sft.per_device_train_batch_size)])
    return acts, " and ".join(changes) or f"lower sft.max_length (now {sft.max_length})"


def _state_remedy(setup, row: dict, acts: float, tgt: Target, strategy: str) -> str:
    """Sharded states that do not fit beside ``acts``: train fewer weights (LoRA) or quantize them,
    else more GPUs."""
    report = setup.report
    dtype_bytes = DTYPE_BYTES[report.memory_dtype]
    free = tgt.memory - acts - row["gathered"]  # what the sharded states may take
    total = row["states"] * tgt.gpus  # the states of all GPUs together
    if free <= 0:
        return (f"lower sft.max_length (now {setup.sft_args.max_length}): one micro-batch's activations "
                f"({acts / GB:.3f} GB) and the gathered unit ({row['gathered'] / GB:.3f} GB) alone fill a GPU")
    options = []
    if any(r.mode == "train" for r in report.parts) and not any(layer.flat for layer in setup.arch.layers):
        lora = memory_bytes(setup.meta, setup.arch, dtype_bytes)["lora_experts"] / tgt.gpus  # r=16, fp32 adapters
        if lora < free:
            options.append(f"trainable.preset: lora_experts (states {lora / GB:.3f} GB per GPU)")
    elif not setup.recipe.model.bits and "lora" in (r.mode for r in report.parts):
        sizes = {n: p.numel() for n, p in setup.meta.named_parameters()}
        quantized = quantized_weights(setup.meta, setup.recipe.model.quantize_experts)
        saved = sum(sizes[n] for n in quantized) * (dtype_bytes - NF4_BYTES) / tgt.gpus
        if row["states"] - saved < free:  # nn.Linear layers and (model.quantize_experts) the routed experts
            options.append(f"model.load_in_4bit: true (states {(row['states'] - saved) / GB:.3f} GB per GPU)")
    # states / n < free  <=>  n > total / free
    options.append(f"{math.floor(total / free) + 1} GPUs of {_gb(tgt.memory)}")
    return (f"with {STRATEGIES[strategy]} ({how_to_run(strategy, tgt.gpus, expert_parallel_degree(setup, tgt.gpus))}): "
            f"{'; or '.join(options)}")


def _remedy(setup, rows: dict, key: str, tgt: Target) -> str:
    """The first setting to change: the activations when the states fit, else the states (after
    the activations, when those are the larger part)."""
    room = tgt.memory - rows[key]["states"] - rows[key]["gathered"]  # left for one micro-batch's activations
    if room > 0:
        return _activation_remedy(setup, room)
    if key == "ddp":  # the whole model's states alone fill a GPU: they need sharding
        key = "fsdp2"
    acts, first = rows[key]["activations"], ""
    # activations dominate (more than the states, or than the room they leave the states): shrink them first
    if acts >= min(rows[key]["states"], tgt.memory - acts - rows[key]["gathered"]):
        acts, change = _least_activations(setup)
        first = f"{change}, which leaves {acts / GB:.3f} GB of activations; then "
    return first + _state_remedy(setup, rows[key], acts, tgt, key)


def _verdict(setup, rows: dict, fits: list[str], tgt: Target) -> str:
    def at(key):
        return f"{STRATEGIES[key]} peaks at {rows[key]['peak'] / GB:.3f} GB of {_gb(tgt.memory)} per GPU"

    chosen = tgt.strategy
    ep = expert_parallel_degree(setup, tgt.gpus)
    if chosen in fits:
        return f"fits: {at(chosen)}"
    if chosen is None and tgt.gpus == 1 and "ddp" in fits:  # no launcher needed
        return f"fits on one GPU: peaks at {rows['ddp']['peak'] / GB:.3f} GB of {_gb(tgt.memory)}"
    if chosen is None and fits:  # fits[0]: DDP where it fits (simplest, fastest), else FSDP2, else ZeRO-3
        note = "" if fits[0] == "ddp" else ", DDP does not"
        return f"fits: {at(fits[0])}{note}; use {how_to_run(fits[0], tgt.gpus, ep)}"
    if chosen == "ddp" and fits:  # sharding is enough
        return f"does not fit: {at('ddp')}; first change: use {how_to_run(fits[0], tgt.gpus, ep)} ({at(fits[0])})"
    # remedies for the chosen strategy; without one, for DDP if it peaks lower (one GPU), else FSDP2
    key = chosen or ("ddp" if rows["ddp"]["peak"] <= rows["fsdp2"]["peak"] else "fsdp2")
    return f"does not fit: {at(key)}; first change: {_remedy(setup, rows, key, tgt)}"


def fit_report(setup, tgt: Target) -> dict:
    """What ``moe-tune plan --gpu-memory ... --json`` adds to the plan report, as ``per_device``."""
    parallel = setup.recipe.parallel
    if parallel is not None and tgt.strategy is None:  # the recipe's layout is the one judged
        gpus = tgt.gpus if tgt.gpus > 1 else processes(parallel)
        tgt = replace(tgt, gpus=gpus, strategy="fsdp2_ep" if parallel.ep_size > 1 else "fsdp2")
    rows = per_device(setup, tgt.gpus)
    fits = [key for key in STRATEGIES if key in rows and rows[key]["peak"] < tgt.memory]
    return {
        "gpus": tgt.gpus,
        "gpu_memory": tgt.memory_text,
        "gpu_memory_gb": round(tgt.memory / GB, 3),
        "strategy": tgt.strategy,
        "strategies": {key: {**{f"{name}_gb": round(value / GB, 3) for name, value in row.items()},
                             "fits": key in fits} for key, row in rows.items()},
        "fits": tgt.strategy in fits if tgt.strategy else bool(fits),
        "verdict": _verdict(setup, rows, fits, tgt),
        "notes": tgt.notes,
    }


def format_fit(fit: dict) -> str:
    gpus = f"{fit['gpus']} GPU{'s' if fit['gpus'] > 1 else ''}"
    lines = [f"per GPU, {gpus} of {fit['gpu_memory']} (GB = 1e9 bytes):",
             f"  {'strategy':<10} {'states':>10} {'activations':>12} {'gathered':>10} {'peak':>10}"]
    for key, row in fit["strategies"].items():
        mark = ">" if key == fit["strategy"] else " "
        lines.append(f"{mark} {STRATEGIES[key]:<10} {row['states_gb']:>10.3f} {row['activations_gb']:>12.3f} "
                     f"{row['gathered_gb']:>10.3f} {row['peak_gb']:>10.3f}  {'fits' if row['fits'] else 'does not fit'}")
    lines += ["  states: weights, gradients, AdamW states (FSDP2, ZeRO-3: sharded; trained weights in fp32 under "
              "mixed precision)", "  gathered: the largest decoder layer (FSDP2; with EP, its own experts only) or MoE "
              "block (ZeRO-3), whole, with its gradients"]
    lines += [f"note: {n}" for n in fit["notes"]]
    lines.append(fit["verdict"])
    return "\n".join(lines)
