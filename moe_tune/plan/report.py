"""The plan report: what a run will train and what it needs, built once per run by
``training.pipeline.plan_run``, shown by ``moe-tune plan`` and at the start of ``moe-tune train``,
and written to RUN/plan.json. Later steps update its fields; none recomputes it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from moe_tune.data.rows import read_chat_rows
from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import MoeArch
from moe_tune.model.loading import experts_stored_apart, load_tokenizer
from moe_tune.model.templates import PREVIEW_ROWS, GivenTemplate, first_row, masking, packing_preview
from moe_tune.plan.accounting import (
    DTYPE_BYTES,
    loading_bytes,
    lora_params,
    micro_batch_activations,
    plan_memory_bytes,
    quantized_weights,
)
from moe_tune.plan.modes import Plan
from moe_tune.recipe import PARTS, PRESETS


@dataclass
class PartRow:
    """One part of the model in the plan: its parameters, mode and trainable parameters."""

    part: str
    params: int
    mode: str            # train, freeze or lora
    trainable: int       # LoRA counted as PEFT builds it; with an expert selection, the selected share
    lora_tensors: int    # tensors of this part that carry a LoRA adapter


@dataclass
class Activations:
    """One micro-batch's activations, with activation checkpointing as the run sets it and the other way."""

    bytes: float
    basis: str           # what the estimate assumes (tokens, precision, checkpointing)
    checkpointing: bool
    other_bytes: float   # with checkpointing the other way: memory against speed


@dataclass
class PlanReport:
    """What the run trains and what it needs (GB = 1e9 bytes)."""

    parts: list[PartRow]
    total_params: int
    trainable_params: int
    lora_tensors: int
    expert_selection: dict[str, list[int]] | None
    state_bytes: float           # weights, gradients and AdamW states
    memory_dtype: str
    frozen_experts_in_bf16: bool  # experts_policy.holds_frozen_experts_in_bf16
    load_bytes: float            # loading's own peak: the weights, and per-expert tensors being stacked
    weight_bytes: float
    activations: Activations
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # bf16 and checkpointing decisions, selection to come
    new_tokens: list[str] = field(default_factory=list)
    chat_template: str | None = None
    first_row: str | None = None  # the first training row with its trained tokens marked
    per_device: dict | None = None  # plan.fit's per-GPU figures, with --gpu-memory

    @property
    def trainable_pct(self) -> float:
        return 100 * self.trainable_params / self.total_params

    @property
    def peak_bytes(self) -> float:
        return self.state_bytes + self.activations.bytes

    @property
    def other_peak_bytes(self) -> float:
        return self.state_bytes + self.activations.other_bytes

    def trained_in_full(self) -> int:
        return sum(r.trainable for r in self.parts if r.mode == "train")

    def checkpointing_turned_on(self) -> None:
        """Activation checkpointing decided on after the report was built (``auto``): the two
        activation estimates trade places."""
        a = self.activations
        if not a.checkpointing:
            self.activations = Activations(a.other_bytes, a.basis.replace("checkpointing off", "checkpointing on"),
                                           True, a.bytes)

    def take_counts(self, recounted: PlanReport) -> None:
        """The counts of the same plan counted again once the experts to train are selected
        (ESFT scores them when training starts); decisions and notes stay."""
        for name in ("parts", "trainable_params", "expert_selection", "state_bytes", "load_bytes", "weight_bytes",
                     "activations"):
            setattr(self, name, getattr(recounted, name))
        self.warnings += [w for w in recounted.warnings if w not in self.warnings]

    def to_json(self) -> dict:
        """plan.json and ``moe-tune plan --json``: every field, with GB figures rounded for reading."""
        out = {"parts": [dataclasses.asdict(r) for r in self.parts],
               "total_params": self.total_params, "trainable_params": self.trainable_params,
               "trainable_pct": self.trainable_pct, "lora_tensors": self.lora_tensors,
               "expert_selection": self.expert_selection,
               "memory_gb": round(self.state_bytes / 1e9, 3), "state_bytes": self.state_bytes,
               "memory_dtype": self.memory_dtype, "frozen_experts_in_bf16": self.frozen_experts_in_bf16,
               "load_peak_gb": round(self.load_bytes / 1e9, 3),
               "load_stacking_gb": round((self.load_bytes - self.weight_bytes) / 1e9, 3),
               "activation_gb": round(self.activations.bytes / 1e9, 3), "activation_bytes": self.activations.bytes,
               "activation_basis": self.activations.basis, "checkpointing": self.activations.checkpointing,
               "peak_gb": round(self.peak_bytes / 1e9, 3), "other_peak_gb": round(self.other_peak_bytes / 1e9, 3),
               "warnings": self.warnings, "notes": self.notes, "new_tokens": self.new_tokens,
               "chat_template": self.chat_template, "first_row": self.first_row}
        if self.per_device is not None:
            out["per_device"] = self.per_device
        return out

    def format(self) -> str:
        rows = self.parts
        w = max(len("trainable"), *(len(f"{getattr(r, key):,}") for r in rows for key in ("params", "trainable")))
        lines = [f"{'part':<15} {'params':>{w}} {'mode':>7} {'trainable':>{w}}"]
        for r in rows:
            lora = f"  ({r.lora_tensors} tensors with LoRA)" if r.mode == "lora" else ""
            lines.append(f"{r.part:<15} {r.params:>{w},} {r.mode:>7} {r.trainable:>{w},}{lora}")
        lines.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} base parameters "
                     f"({self.trainable_pct:.2f}%)")
        if self.lora_tensors:
            lines.append(f"LoRA coverage: all {self.lora_tensors} planned tensors carry an adapter")
        if self.new_tokens:
            lines.append(f"new tokens: {', '.join(self.new_tokens)} ({self.chat_template}); their embedding "
                         "rows train, counted above")
        bf16 = ", frozen routed experts in bf16 as the checkpoint stores them" if self.frozen_experts_in_bf16 else ""
        lines.append(f"memory estimate: {self.state_bytes / 1e9:.3f} GB ({self.memory_dtype} weights{bf16}, "
                     "gradients, AdamW states)")
        a = self.activations
        lines.append(f"  + activations {a.bytes / 1e9:.3f} GB ({a.basis}) = peak {self.peak_bytes / 1e9:.3f} GB")
        lines.append(f"  with activation checkpointing {'off' if a.checkpointing else 'on'}: peak "
                     f"{self.other_peak_bytes / 1e9:.3f} GB ({'faster' if a.checkpointing else 'slower'}: "
                     "the forward runs once more in backward when it is on)")
        if self.load_bytes > self.peak_bytes:
            lines.append(f"loading peak {self.load_bytes / 1e9:.3f} GB: the weights, + "
                         f"{(self.load_bytes - self.weight_bytes) / 1e9:.3f} GB while transformers stacks the "
                         "checkpoint's per-expert tensors into one layer's fused ones")
        lines += self.notes
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def read_plan_json(path: Path) -> dict:
    """A run's plan.json, as ``PlanReport.to_json`` wrote it (compare reads its counts)."""
    return json.loads(path.read_text())


def part_rows(model: nn.Module, arch: MoeArch, plan: Plan, lora,
              selection: dict[str, list[int]] | None = None) -> list[PartRow]:
    """Per part: parameters, mode and trainable parameters (LoRA counted as PEFT builds it;
    with an expert selection, routed experts count only the selected experts' share)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    share = dict.fromkeys(sizes, 1.0)
    for layer in arch.layers if selection else ():
        for n in layer.expert_params + layer.expert_other:
            share[n] = len(selection[layer.block]) / layer.num_experts
    train, targets = set(plan.full), set(plan.lora_targets)
    rows = []
    for part in PARTS:
        names = arch.params_in(part)
        if not names:
            continue
        rank = lora.rank_per_part.get(part, lora.r)
        trainable = round(sum(sizes[n] * share[n] for n in names if n in train))
        trainable += round(sum(lora_params(shapes[n], rank) * share[n] for n in names if n in targets))
        trainable += sum(len(plan.token_rows[n]) * shapes[n][1] for n in names if n in plan.token_rows)
        rows.append(PartRow(part, sum(sizes[n] for n in names), plan.modes[part], trainable,
                            sum(n in targets for n in names)))
    return rows


def plan_warnings(plan: Plan, preset: str, rows: list[PartRow],
                  selection: dict[str, list[int]] | None = None) -> list[str]:
    warnings = []
    preset_router = PRESETS[preset].get("router", "freeze")
    if plan.modes["router"] != preset_router:
        warnings.append(f"the router is set to {plan.modes['router']} although preset '{preset}' has it "
                        f"{preset_router}: routing will change")
    expert_share = next((r.params for r in rows if r.part == "routed_experts"), 0) / sum(r.params for r in rows)
    if "lora" in plan.modes.values() and plan.modes["routed_experts"] == "freeze":
        warnings.append(f"LoRA leaves the routed experts untouched ({expert_share:.0%} of the parameters)")
    if plan.not_adapted:
        warnings.append(f"{len(plan.not_adapted)} tensors in LoRA parts have no LoRA form and stay frozen, "
                        f"e.g. {plan.not_adapted[0]}")
    for block, experts in (selection or {}).items():
        if not experts:
            warnings.append(f"expert selection is empty in {block}: none of its experts will train")
    return warnings


def plan_report(model: nn.Module, arch: MoeArch, plan: Plan, recipe, sft_args,
                selection: dict[str, list[int]] | None = None, frozen_experts_in_bf16: bool = False) -> PlanReport:
    """The report of ``plan`` for a weightless ``model``, with the run's SFTConfig ``sft_args``
    (the activations of one micro-batch). ``frozen_experts_in_bf16``: the frozen routed experts
    are held in bf16 while training (experts_policy.holds_frozen_experts_in_bf16)."""
    rows = part_rows(model, arch, plan, recipe.lora, selection)
    total = sum(r.params for r in rows)
    full = sum(r.trainable for r in rows if r.mode == "train")
    lora = sum(r.trainable for r in rows if r.mode == "lora")
    new_rows = sum(r.trainable for r in rows if r.mode == "freeze")  # new tokens' rows (token_rows)
    dtype = recipe.model.dtype if recipe.model.dtype in DTYPE_BYTES else "bfloat16"
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    quantized = sum(sizes.get(n, 0) for n in quantized_weights(model, recipe.model.quantize_experts)) \
        if recipe.model.bits else 0
    double_quant = recipe.model.bnb_4bit_use_double_quant
    # the new rows: PEFT's own copy of them beside LoRA; otherwise the whole tensor has gradients and moments
    memory_full, memory_lora = (full, lora + new_rows) if plan.lora_targets else \
        (full + sum(sizes[n] for n in plan.token_rows), lora)
    bf16_expert_params = sum(sizes[n] for n in arch.expert_params) if frozen_experts_in_bf16 else 0
    state = plan_memory_bytes(total, memory_full, memory_lora, DTYPE_BYTES[dtype], quantized, recipe.model.bits,
                              bf16_expert_params, double_quant)
    weights = plan_memory_bytes(total, 0, 0, DTYPE_BYTES[dtype], quantized, recipe.model.bits, bf16_expert_params,
                                double_quant)
    load = loading_bytes(model, arch, weights, 2 if frozen_experts_in_bf16 else DTYPE_BYTES[dtype],
                         experts_stored_apart(recipe.model.path), bf16_expert_bytes=2 * bf16_expert_params)
    checkpointing = bool(sft_args.gradient_checkpointing)
    quantized_experts = recipe.model.bits is not None and recipe.model.quantize_experts
    acts, basis = micro_batch_activations(model, arch, dtype, sft_args, frozen_experts_in_bf16=frozen_experts_in_bf16,
                                          trained=plan.with_gradients, quantized_experts=quantized_experts)
    other, _ = micro_batch_activations(model, arch, dtype, sft_args, checkpointing=not checkpointing,
                                       frozen_experts_in_bf16=frozen_experts_in_bf16, trained=plan.with_gradients,
                                       quantized_experts=quantized_experts)
    return PlanReport(rows, total, full + lora + new_rows, len(plan.lora_targets), selection, state, dtype,
                      frozen_experts_in_bf16, load, weights, Activations(acts, basis, checkpointing, other),
                      plan_warnings(plan, recipe.trainable.preset, rows, selection))


def first_training_row(recipe, args, template: GivenTemplate | None = None) -> str | None:
    """``first_row`` of a recipe's training data, for ``moe-tune plan``; None where all tokens
    train (``args``, the run's SFTConfig, says), or there is no tokenizer or data to show (a
    published config alone, a hub dataset): a plan needs neither."""
    if not args.assistant_only_loss or not Path(recipe.data.train).exists():  # a hub dataset: not read here
        return None
    try:
        tokenizer = load_tokenizer(recipe.model.path, template)
    except MoeTuneError:
        return None
    # a local file's mistakes (data.format, a bad first row) are told now, as train would tell them
    rows = read_chat_rows(recipe.data.train, PREVIEW_ROWS if args.packing else 1, recipe.data.format,
                          recipe.data.skip_bad_rows)
    how = masking(tokenizer)
    first = first_row(tokenizer, rows, how)
    if args.packing:
        first += "\n" + packing_preview(tokenizer, rows, how, args.max_length)
    return first
