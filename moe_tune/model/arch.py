"""The architecture layer: what an MoE model looks like, whatever its family.

transformers 5.x MoE families share one shape, under different names:

    decoder layer
      .mlp | .feed_forward | .block_sparse_moe | .ffn     the MoE block
          .gate | .router                               router: weight (E, H) [+ bias, score correction]
          .experts                                      routed experts, fused 3-D tensors
              .gate_up_proj (E, 2I, H) .down_proj (E, H, I)     (gpt_oss, llama4: transposed)
          .shared_expert(s) | .shared_mlp [+ .shared_expert_gate]

Config names differ too (``num_local_experts``, ``num_experts``, ``n_routed_experts``). This
module finds all of it from the built model (it works on the ``meta`` device) and classifies
every parameter into a part. Code outside this module asks it, and never looks at
``model_type`` itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from moe_tune.errors import MoeTuneError
from moe_tune.recipe import PARTS

_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp", "shared_expert_gate")
_CORRECTION_NAMES = ("e_score_correction_bias", "expert_bias")  # sigmoid routers' selection bias
_ATTENTION_NAMES = ("self_attn", "attention", "self_attention", "attn", "mamba", "mixer",
                    "linear_attn", "conv", "temporal_block", "norm_attn_norm")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "mlps")
# Config attribute names, in the order families are tried.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_topk", "top_k_experts",
               "moe_k", "top_k")
_GROUP_KEYS = ("n_group", "num_expert_group")  # group-limited routing: experts in equal groups


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class MoeLayer:
    """One MoE block. Names are full module/parameter paths in the model."""

    block: str                     # e.g. "model.layers.3.mlp"
    router: str                    # router module
    router_weight: str             # parameter, (num_experts, hidden)
    router_extras: tuple[str, ...]  # router bias / score-correction tensors (params or buffers)
    expert_params: tuple[str, ...]  # routed expert tensors, leading dim num_experts
    expert_other: tuple[str, ...]  # other routed-expert parameters (e.g. a shared output bias)
    shared: tuple[str, ...]        # shared-expert modules (and their gate)
    num_experts: int
    top_k: int
    scoring: str                   # "softmax" or "sigmoid" (or the family's own, from its config)
    transposed: bool               # expert tensors stored (E, in, out) instead of (E, out, in)
    flat: bool = False             # expert tensors stored 2-D as (E * rows, cols) (dbrx)


@dataclass(frozen=True)
class MoeArch:
    family: str
    layers: tuple[MoeLayer, ...]
    parts: dict[str, str] = field(repr=False)  # parameter name -> part

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k

    @property
    def expert_params(self) -> list[str]:
        """Every MoE layer's routed expert tensors (leading dim num_experts), in layer order."""
        return [name for layer in self.layers for name in layer.expert_params]

    @property
    def expert_modules(self) -> list[str]:
        """The modules that hold them, one experts module per MoE layer."""
        return sorted({name.rsplit(".", 1)[0] for name in self.expert_params})

    def params_in(self, part: str) -> list[str]:
        return [name for name, p in self.parts.items() if p == part]


def _first_int(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):
        return config


def moe_shape(config) -> MoeShape | None:
    """Experts and top-k from a transformers config, or None when the model is not an MoE."""
    text = text_config(config)
    if getattr(text, "is_moe", True) is False:  # e.g. Doge: experts declared but switched off
        return None
    n = _first_int(text, _EXPERT_COUNT_KEYS)
    ffn = getattr(text, "ffn_config", None)  # dbrx nests its MoE settings
    if not n and ffn is not None:
        n = _first_int(ffn, _EXPERT_COUNT_KEYS)
        text = ffn
    if not n or n < 2:
        return None
    return MoeShape(num_experts=n, top_k=_first_int(text, _TOP_K_KEYS) or 1)


def _moe_configs(config) -> list:
    """The config objects that hold the MoE settings: the text config, and dbrx's nested ffn_config."""
    text = text_config(config)
    ffn = getattr(text, "ffn_config", None)
    return [text] + ([ffn] if ffn is not None and _first_int(ffn, _EXPERT_COUNT_KEYS) else [])


def expert_groups(config) -> int:
    """How many equal groups the routed experts form for group-limited routing (DeepSeek-V3's
    n_group); 1 without it."""
    return max([1, *(v for c in _moe_configs(config) for k in _GROUP_KEYS
                     if isinstance(v := getattr(c, k, None), int))])


def set_expert_count(config, num_experts: int) -> None:
    """Declare ``num_experts`` routed experts per MoE layer in ``config`` (every key the family
    uses for the count), with top-k capped at it."""
    for cfg in _moe_configs(config):
        old = _first_int(cfg, _EXPERT_COUNT_KEYS)
        if old is None:  # dbrx's outer config: its count is in ffn_config
            continue
        for key in _EXPERT_COUNT_KEYS:
            if getattr(cfg, key, None) == old:
                setattr(cfg, key, num_experts)
        for key in _TOP_K_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > num_experts:
                setattr(cfg, key, num_experts)


def require_moe(config, where: str) -> MoeShape:
    shape = moe_shape(config)
    if shape is None:
        raise MoeTuneError(f"{where}: model type '{getattr(config, 'model_type', '?')}' is not a "
                           "Mixture-of-Experts model (no expert count in its config); moe_tune "
                           "fine-tunes MoE checkpoints such as Mixtral, Qwen-MoE or OLMoE")
    return shape


def _children(module: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_children() if n in names]


def own_parameters(module: nn.Module, recurse: bool = True) -> list[tuple[str, torch.Tensor]]:
    """``module.named_parameters()``, each parametrized tensor under its own name (``gate_up_proj``,
    not ``parametrizations.gate_up_proj.original``) and as a meta tensor of its own shape: the
    values of quantized experts (model/quantized_experts.py) are packed, not (E, out, in)."""
    found, seen = [], set()  # a tied weight is listed once, as named_parameters does
    for mod_name, mod in module.named_modules() if recurse else [("", module)]:
        if isinstance(mod, parametrize.ParametrizationList):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        parametrized = parametrize.is_parametrized(mod)
        for name, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                found.append((prefix + name, p))
        for name in mod.parametrizations if parametrized else ():
            shape = getattr(mod.parametrizations[name][0], "shape", mod.parametrizations[name].original.shape)
            found.append((prefix + name, torch.empty(shape, device="meta")))
    return found


def _tensors(module: nn.Module, prefix: str) -> list[tuple[str, object]]:
    """Parameters and buffers under ``module``, with full names."""
    return ([(f"{prefix}.{n}", t) for n, t in module.named_parameters()]
            + [(f"{prefix}.{n}", t) for n, t in module.named_buffers()])


def _scoring(config, router: nn.Module, block: nn.Module) -> str:
    """How router logits become gate weights. DeepSeek-style configs say so (``scoring_func``);
    otherwise read the code that routes: the router's forward first, then the block's. A
    function that uses only one of softmax and sigmoid decides (a block's forward may also
    apply a sigmoid to a shared-expert gate, so one that uses both does not)."""
    declared = getattr(text_config(config), "scoring_func", None)
    if isinstance(declared, str):
        return declared
    for fn in (getattr(type(router), "forward", None), getattr(type(block), "route_tokens_to_experts", None),
               getattr(type(block), "forward", None)):
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            continue
        uses = {name for name in ("softmax", "sigmoid") if name in source}
        if len(uses) == 1:
            return uses.pop()
    return "softmax"


def _is_transposed(experts: nn.Module | None, tensor, hidden: int) -> bool:
    """Expert tensors are (E, out, in) as in nn.Linear, or (E, in, out) ("transposed": gpt_oss,
    llama4). transformers marks most experts classes; otherwise the input side is the one of
    size hidden for the first tensor (gate_up_proj / up_proj)."""
    flag = getattr(experts, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    return tensor.dim() == 3 and tensor.shape[-1] != hidden and tensor.shape[-2] == hidden


def _find_layer(name: str, block: nn.Module, model: nn.Module) -> MoeLayer | None:
    routers = _children(block, _ROUTER_NAMES)
    if len(routers) != 1:
        return None
    router_name, router = routers[0]
    shared_names = [n for n, _ in _children(block, _SHARED_NAMES)]
    skip = {router_name, *shared_names}
    experts_module = dict(block.named_children()).get("experts")
    if experts_module is not None:
        routed = [(f"{name}.experts.{n}", p) for n, p in own_parameters(experts_module)]
    else:  # jetmoe: expert tensors sit on the block itself
        routed = [(f"{name}.{n}", p) for n, p in block.named_parameters()
                  if n.split(".")[0] not in skip and n not in _CORRECTION_NAMES]
    cubes = [(n, p) for n, p in routed if p.dim() == 3]
    router_mats = [(f"{name}.{router_name}.{n}", p) for n, p in router.named_parameters() if p.dim() == 2]
    if cubes:
        num_experts = cubes[0][1].shape[0]
        if any(p.shape[0] != num_experts for _, p in cubes):
            return None
        expert_params = cubes
    elif len(router_mats) == 1 and routed:
        # dbrx: experts as 2-D (E * rows, cols) tensors
        num_experts = router_mats[0][1].shape[0]
        expert_params = [(n, p) for n, p in routed if p.dim() == 2 and p.shape[0] % num_experts == 0]
        if not expert_params:
            return None
    else:
        return None
    router_mats = [(n, p) for n, p in router_mats if p.shape[0] == num_experts]
    weights = [n for n, _ in router_mats]
    if len(weights) != 1:
        return None
    expert_names = {n for n, _ in expert_params}
    extras = [n for n, t in _tensors(router, f"{name}.{router_name}") if n != weights[0]]
    extras += [f"{name}.{n}" for n, _ in list(block.named_parameters(recurse=False))
               + list(block.named_buffers(recurse=False)) if n in _CORRECTION_NAMES]
    return MoeLayer(
        block=name, router=f"{name}.{router_name}", router_weight=weights[0],
        router_extras=tuple(extras),
        expert_params=tuple(expert_names),
        expert_other=tuple(n for n, _ in routed if n not in expert_names),
        shared=tuple(f"{name}.{n}" for n in shared_names),
        num_experts=num_experts,
        top_k=getattr(router, "top_k", None) or getattr(block, "top_k", None) or _config_top_k(model.config),
        scoring=_scoring(model.config, router, block),
        transposed=_is_transposed(experts_module, expert_params[0][1], router_mats[0][1].shape[1]),
        flat=not cubes,
    )


def _config_top_k(config) -> int:
    shape = moe_shape(config)
    return shape.top_k if shape else 1


def _inside_attention(name: str) -> bool:
    return any(part in _ATTENTION_NAMES for part in name.split("."))


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    layers = []
    for name, module in model.named_modules():
        if name and not _inside_attention(name):
            layer = _find_layer(name, module, model)
            if layer is not None:
                layers.append(layer)
    return layers


def decoder_layer_of(model: nn.Module) -> Callable[[str], int | None]:
    """Maps a parameter or module name to the index of the decoder layer holding it, or None
    outside the layers (embeddings, final norm, LM head). The layers are the first ModuleList
    (in module order) as long as the config's ``num_hidden_layers``; where none is, every name
    maps to None."""
    count = getattr(text_config(model.config), "num_hidden_layers", None)
    prefix = next((f"{name}." for name, m in model.named_modules()
                   if isinstance(m, nn.ModuleList) and len(m) == count), None)

    def layer_of(name: str) -> int | None:
        if prefix is None or not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])
    return layer_of


def param_owners(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """Parameter name -> (name of the module holding it, that module, attribute name)."""
    out = {}
    for mod_name, module in model.named_modules():
        for attr, _ in own_parameters(module, recurse=False):
            out[f"{mod_name}.{attr}" if mod_name else attr] = (mod_name, module, attr)
    return out


def _classify(model: nn.Module, layers: list[MoeLayer]) -> dict[str, str]:
    parts: dict[str, str] = {}
    for layer in layers:
        for n, _ in model.get_submodule(layer.router).named_parameters():
            parts[f"{layer.router}.{n}"] = "router"
        for n in layer.router_extras:
            parts.setdefault(n, "router")
        for n in layer.expert_params + layer.expert_other:
            parts[n] = "routed_experts"
    # shared experts, also where a family keeps them beside the MoE block (granitemoeshared)
    for mod_name, module in model.named_modules():
        if mod_name.rsplit(".", 1)[-1] in _SHARED_NAMES:
            for n, _ in module.named_parameters():
                parts.setdefault(f"{mod_name}.{n}", "shared_experts")
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    owners = param_owners(model)
    names = [name for name, _ in own_parameters(model)]
    for name in names:
        if name in parts:
            continue
        mod_name, module, _ = owners[name]
        if module is embed:
            parts[name] = "embeddings"
        elif module is head:
            parts[name] = "lm_head"
        elif "norm" in type(module).__name__.lower():
            parts[name] = "norms"
        elif _inside_attention(mod_name):
            parts[name] = "attention"
        elif any(p in _MLP_NAMES for p in mod_name.split(".")):
            parts[name] = "dense_mlp"
        else:
            parts[name] = "other"
    return {name: parts[name] for name in names}


def describe(model: nn.Module) -> MoeArch:
    """Routers, experts and parts of an MoE causal LM (works on the meta device)."""
    layers = find_moe_layers(model)
    family = getattr(model.config, "model_type", type(model).__name__)
    if not layers:
        if moe_shape(model.config) is None:
            require_moe(model.config, type(model).__name__)
        raise MoeTuneError(f"{type(model).__name__} ({family}): its config declares experts, but no MoE "
                           "block with a router and routed experts was found; this family is not "
                           "supported yet (see the README's list)")
    return MoeArch(family=family, layers=tuple(layers), parts=_classify(model, layers))
