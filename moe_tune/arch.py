"""The architecture layer: what an MoE model looks like, whatever its family.

Families name the same things differently (``num_local_experts`` in Mixtral, ``num_experts``
in Qwen-MoE and OLMoE, ``n_routed_experts`` in DeepSeek). Code outside this module asks it,
and never looks at ``model_type`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_tune.errors import MoeTuneError

# Config attribute names, in the order families are tried.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k")


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    top_k: int


def _first_int(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def moe_shape(config) -> MoeShape | None:
    """Experts and top-k from a transformers config, or None when the model is not an MoE."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = _first_int(text, _EXPERT_COUNT_KEYS)
    if not n or n < 2:
        return None
    return MoeShape(num_experts=n, top_k=_first_int(text, _TOP_K_KEYS) or 1)


def require_moe(config, where: str) -> MoeShape:
    shape = moe_shape(config)
    if shape is None:
        raise MoeTuneError(f"{where}: model type '{getattr(config, 'model_type', '?')}' is not a "
                           "Mixture-of-Experts model (no expert count in its config); moe_tune "
                           "fine-tunes MoE checkpoints such as Mixtral, Qwen-MoE or OLMoE")
    return shape
