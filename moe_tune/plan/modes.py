"""What trains: a mode per part (train, freeze or LoRA), from a preset plus overrides.

The parts come from the architecture layer, so LoRA targets are derived, never hand-written:
``nn.Linear``/``nn.Embedding`` weights go to PEFT's ``target_modules``; fused expert tensors
(E, out, in) and bare router weights go to ``target_parameters``. After wrapping, every tensor
that should carry LoRA is checked to carry it.

Tokens a chat template added (model.chat_template) have new embedding rows, which must train
whatever the embeddings' mode: with LoRA through PEFT's ``trainable_token_indices``, otherwise by
training the whole tensor with the gradient of every other row zeroed.
"""

from __future__ import annotations

import re
import types
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import MoeArch, param_owners
from moe_tune.recipe import PARTS, PRESETS


@dataclass
class Plan:
    """Per parameter: trained in full, adapted by LoRA (and how), or frozen."""

    modes: dict[str, str]                      # part -> mode
    full: list[str] = field(default_factory=list)            # parameter names trained in full
    lora_modules: list[str] = field(default_factory=list)    # nn.Linear / nn.Embedding module names
    lora_parameters: list[str] = field(default_factory=list)  # fused expert / bare router tensors
    not_adapted: list[str] = field(default_factory=list)     # in a LoRA part, but no LoRA form (biases)
    frozen: list[str] = field(default_factory=list)
    # (vocab, hidden) embedding / LM-head weights not trained in full whose new tokens' rows train
    token_rows: dict[str, list[int]] = field(default_factory=dict)

    @property
    def lora_targets(self) -> list[str]:
        """Parameter names that must carry LoRA."""
        return [f"{m}.weight" for m in self.lora_modules] + self.lora_parameters

    @property
    def with_gradients(self) -> list[str]:
        """Parameter names that get a gradient: trained in full, adapted by LoRA, or with new rows."""
        return self.full + self.lora_targets + list(self.token_rows)


def resolve_modes(preset: str, overrides: dict[str, str | None]) -> dict[str, str]:
    modes = {part: PRESETS[preset].get(part, "freeze") for part in PARTS}
    modes.update({part: mode for part, mode in overrides.items() if mode is not None})
    return modes


def embedding_weights(model: nn.Module) -> list[str]:
    """Names of the input embedding and the LM head weights (one name when they are tied)."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    return list(dict.fromkeys(names[id(layer.weight)] for layer in layers if layer is not None))


def make_plan(model: nn.Module, arch: MoeArch, modes: dict[str, str], quantized: Collection[str] = (),
              new_tokens: list[int] = ()) -> Plan:
    """The plan for ``modes``; ``quantized``, the names of weights loaded in 4 or 8 bits (which
    cannot train in full); ``new_tokens``, ids a chat template added, train their rows."""
    if modes.get("norms") == "lora":
        raise MoeTuneError("trainable.norms: norms have no LoRA form; use train or freeze")
    if modes.get("routed_experts") == "lora" and any(layer.flat for layer in arch.layers):
        raise MoeTuneError(f"trainable.routed_experts: LoRA cannot reach {arch.family}'s experts (2-D stacks "
                           "that the model reads outside their module, where PEFT's wrapper never sees "
                           "them); use train or freeze")
    fused = {n for layer in arch.layers for n in (*layer.expert_params, layer.router_weight)}
    owners = param_owners(model)
    plan = Plan(modes=modes)
    for name, part in arch.parts.items() if quantized else ():
        if modes[part] == "train" and name in quantized:
            what = "its expert tensors are quantized (model.quantize_experts" if part == "routed_experts" else \
                "its linear layers are quantized (model.load_in_4bit/8bit"
            raise MoeTuneError(f"trainable.{part}: {what}) and cannot train in full; use lora or freeze"
                               + (", or model.quantize_experts: false" if part == "routed_experts" else ""))
    for name, part in arch.parts.items():
        mode = modes[part]
        mod_name, module, attr = owners[name]
        if mode == "train":
            plan.full.append(name)
        elif mode == "freeze":
            plan.frozen.append(name)
        elif isinstance(module, (nn.Linear, nn.Embedding)) and attr == "weight":
            plan.lora_modules.append(mod_name)
        elif name in fused:
            plan.lora_parameters.append(name)
        else:
            plan.not_adapted.append(name)
    for name in embedding_weights(model) if new_tokens else ():
        part = arch.parts[name]
        if modes[part] == "lora":
            raise MoeTuneError(f"trainable.{part}: LoRA on it cannot also train the rows of the tokens "
                               "model.chat_template adds; use train or freeze (the new rows train either way)")
        if modes[part] == "freeze":
            plan.token_rows[name] = list(new_tokens)
    return plan


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _modules_to_save(plan: Plan) -> list[str]:
    """Modules trained in full next to LoRA: PEFT keeps and saves a trainable copy of each."""
    lora_owners = set(plan.lora_modules) | {_module_of(n) for n in plan.lora_parameters}
    modules = sorted({_module_of(n) for n in plan.full})
    for m in modules:
        if any(o == m or o.startswith(m + ".") or m.startswith(o + ".") for o in lora_owners):
            raise MoeTuneError(f"trainable: '{m}' would be both trained in full and LoRA-adapted; "
                               "choose train or lora for the parts it holds")
    return modules


def _rank_pattern(plan: Plan, arch: MoeArch, rank_per_part: dict[str, int]) -> dict[str, int]:
    """PEFT rank_pattern: regexes matched against module names (target_modules) and parameter
    names (target_parameters), so exact names, escaped."""
    keys = [(m, f"{m}.weight") for m in plan.lora_modules] + [(n, n) for n in plan.lora_parameters]
    return {re.escape(key): rank_per_part[arch.parts[param]] for key, param in keys
            if arch.parts[param] in rank_per_part}


def base_name(name: str) -> str:
    """The name a module of a PEFT model has in the base model: PEFT puts the model under
    ``base_model.model.`` and each wrapped module under ``.base_layer``."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def unwrapped(model: nn.Module) -> nn.Module:
    """The base model of a PEFT model (LoRA layers still in it), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_parts_exist(overrides: dict[str, str | None], arch: MoeArch) -> None:
    """A part the recipe names explicitly (not through a preset) must exist in the model."""
    for part, mode in overrides.items():
        if mode in ("train", "lora") and not arch.params_in(part):
            raise MoeTuneError(f"trainable.{part}: {mode}, but this {arch.family} model has no "
                               f"{part.replace('_', ' ')}; leave trainable.{part} unset")


def adapted_tensors(model: nn.Module) -> set[str]:
    """Base-model parameter names that carry a LoRA adapter in a PEFT model."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    return {f"{base_name(name)}.{getattr(module, 'parameter_name', None) or 'weight'}"
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def verify_coverage(model: nn.Module, plan: Plan) -> None:
    """Fail loudly unless LoRA sits exactly on the planned tensors."""
    adapted, wanted = adapted_tensors(model), set(plan.lora_targets)
    if wanted - adapted:
        missing = sorted(wanted - adapted)
        raise MoeTuneError(f"LoRA did not reach {len(missing)} planned tensors, e.g. {missing[0]}; "
                           "this model family is not supported for LoRA on that part")
    if adapted - wanted:
        raise MoeTuneError(f"LoRA was added where the plan says not to: {sorted(adapted - wanted)[0]}")


def _dodge_v4_renames(model: nn.Module, plan: Plan, lora) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) that PEFT will apply as given.

    For MoE families whose experts were fused in transformers 5, PEFT rewrites any target module
    ending in an old per-expert name (``gate_proj``, ``w1``, ...) into the fused expert tensor:
    a DeepSeek shared expert's ``down_proj`` silently becomes LoRA on the routed experts. Ask
    PEFT's own converter which names it would rewrite, and target those linear weights as
    parameters instead.
    """
    from peft import LoraConfig  # noqa: PLC0415
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers  # noqa: PLC0415

    probe = LoraConfig(r=lora.r, target_modules=list(plan.lora_modules))
    convert_peft_config_for_transformers(probe, model, conversions=None)
    renamed = [m for m in plan.lora_modules if m not in set(probe.target_modules)]
    if renamed and lora.dropout:
        raise MoeTuneError(f"lora.dropout: '{renamed[0]}' can only be adapted as a parameter (PEFT would "
                           "mistake it for a fused expert), where PEFT has no dropout; set lora.dropout: 0")
    modules = [m for m in plan.lora_modules if m not in renamed]
    return modules, plan.lora_parameters + [f"{m}.weight" for m in renamed]


def apply_plan(model: nn.Module, plan: Plan, arch: MoeArch, lora) -> nn.Module:
    """Freeze, unfreeze and LoRA-wrap as planned. ``lora`` is the recipe's LoraSection."""
    if not plan.lora_targets:
        train = set(plan.full) | set(plan.token_rows)
        for name, p in model.named_parameters():
            p.requires_grad_(name in train)
        for name, rows in plan.token_rows.items():
            train_rows_only(model.get_parameter(name), rows)
        return model
    if lora.dropout and plan.lora_parameters:
        raise MoeTuneError("lora.dropout: PEFT cannot apply dropout to fused expert or router tensors "
                           "(target_parameters); set lora.dropout: 0, or LoRA-adapt only linear layers")
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    modules, parameters = _dodge_v4_renames(model, plan, lora)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=modules, target_parameters=parameters or None,
        rank_pattern=_rank_pattern(plan, arch, lora.rank_per_part),
        modules_to_save=_modules_to_save(plan) or None,
        trainable_token_indices={_module_of(n): rows for n, rows in plan.token_rows.items()} or None,
    )
    with warnings.catch_warnings():
        # PEFT checks rank_pattern keys against the targeted module names only, so every key for
        # a target_parameters tensor is reported as ignored, though its rank is applied (tested)
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match",
                                category=RuntimeWarning)
        model = get_peft_model(model, config)
    verify_coverage(model, plan)
    if plan.token_rows:
        _pass_head_bias_through(model)
    _adapt_linear_parameters_as_linears(model)
    return model


def _adapt_linear_parameters_as_linears(model: nn.Module) -> None:
    """Give each PEFT ``ParamWrapper`` on a Linear's weight (the renamed ones of
    _dodge_v4_renames, e.g. DeepSeek's shared experts) the forward of PEFT's LoRA Linear:
    ``base(x) + s (x A^T) B^T``. PEFT's own forward adds B A into a copy of the whole weight on
    every call, which autograd keeps for the backward, and computes the whole weight's gradient
    from it: at DeepSeek-V3's shape, 44M weights per layer copied and differentiated, where LoRA
    needs 2r (in + out) per token. Equal outputs and LoRA gradients (tested); where the adapters
    are disabled or merged, or several are active, PEFT's forward runs."""
    from peft.tuners.lora.layer import ParamWrapper  # noqa: PLC0415

    for wrapper in model.modules():
        if isinstance(wrapper, ParamWrapper) and isinstance(wrapper.base_layer, nn.Linear) \
                and wrapper.parameter_name == "weight":
            wrapper.forward = types.MethodType(_linear_lora_forward, wrapper)  # rebound by deepcopy


def _linear_lora_forward(self, x, *args, **kwargs):
    active = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or len(active) != 1 or "adapter_names" in kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[active[0]], self.lora_B[active[0]]
    result = self.base_layer(x, *args, **kwargs)
    lora = lora_b(lora_a(x.to(lora_a.weight.dtype))) * self.scaling[active[0]]
    return result + lora.to(result.dtype)


def _pass_head_bias_through(model: nn.Module) -> None:
    """TRL's fused LM head reads ``lm_head.weight`` and ``lm_head.bias``. PEFT's wrapper of a head
    with trainable tokens passes the weight through, its trained rows merged in, but not the bias
    (MoE LM heads have none; PEFT's own forward would drop one: peft#3649)."""
    from peft.utils.other import TrainableTokensWrapper  # noqa: PLC0415

    for name, module in model.named_modules():
        if isinstance(module, TrainableTokensWrapper) and isinstance(module.original_module, nn.Linear):
            if module.original_module.bias is not None:
                raise MoeTuneError(f"{base_name(name)}: an LM head with a bias cannot train new token rows beside "
                                   "LoRA (PEFT drops the bias); set trainable.lm_head: train")
            module.bias = None


def train_rows_only(weight: nn.Parameter, rows: list[int]) -> None:
    """Train ``rows`` of a (vocab, hidden) weight, the rest kept as they are: their gradient is
    zeroed, so AdamW never moves them (weight decay is off for such a weight, trainer.py)."""
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)  # (vocab, 1)
    keep[rows] = 1
    weight.register_hook(lambda grad: grad * keep)
