"""Router regularizers, computed once by moe_tune for every family.

- ``aux_loss``: the Switch/Mixtral load-balancing loss, ``E * sum_e f_e * P_e``, where ``f_e``
  is the share of top-k slots given to expert e and ``P_e`` its mean router probability.
- ``z_loss``: the ST-MoE router z-loss, mean over tokens of ``logsumexp(logits)^2``.
- ``router_kl``: how far routing moved from the base model's, on the same hidden states:
  ``KL(p_base || p_now)`` per token, averaged. A frozen copy of the base router weights (a few
  MB even for large models) stands in for the base model.

Softmax routers use their softmax. Sigmoid routers (DeepSeek-V3 style) score experts
independently: ``P_e`` and ``f_e`` use the scores normalised over experts (and top-k with
the score-correction bias, as the model selects), z-loss is the same function of the logits
(it keeps them small either way), and the KL is the mean over experts of the Bernoulli KL
between base and current scores.

The logits are recomputed from each router's captured input and its weight, so the terms are
differentiable with respect to the router and everything that feeds it, and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moe_tune.arch import MoeArch, MoeLayer
from moe_tune.routing import router_bias, router_probs

TERMS = ("aux_loss", "z_loss", "router_kl")


def load_balancing_loss(probs: torch.Tensor, topk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """probs (tokens, E) fp32 distribution, topk (tokens, k) expert ids -> scalar."""
    f = F.one_hot(topk, num_experts).float().mean(0)  # (k, E): share of each top-k slot per expert
    p = probs.mean(0)  # (E,)
    return num_experts * (f * p.unsqueeze(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits (tokens, E) -> mean of logsumexp^2, in fp32."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def router_kl(logits: torch.Tensor, base_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """KL(base || current) per token, averaged; the base side is a fixed target."""
    base_logits = base_logits.detach().float()
    logits = logits.float()
    if scoring == "sigmoid":  # independent Bernoulli per expert
        p, log_q, log_1mq = base_logits.sigmoid(), F.logsigmoid(logits), F.logsigmoid(-logits)
        log_p, log_1mp = F.logsigmoid(base_logits), F.logsigmoid(-base_logits)
        kl = p * (log_p - log_q) + (1 - p) * (log_1mp - log_1mq)  # (tokens, E)
        return kl.mean(-1).mean()
    base = router_probs(base_logits, scoring)
    log_now = router_probs(logits, scoring).clamp_min(1e-12).log()
    return (base * (base.clamp_min(1e-12).log() - log_now)).sum(-1).mean()


class RouterRegularizer:
    """Captures router inputs during a forward (``with reg.capture(model):``) and turns them
    into the weighted router terms (``reg.terms(attention_mask)``)."""

    def __init__(self, model: nn.Module, arch: MoeArch, aux: float, z: float, kl: float):
        self.arch, self.coef = arch, {"aux_loss": aux, "z_loss": z, "router_kl": kl}
        self.tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        # frozen copy of the base routers, only when the KL term is on
        self.base = {layer.block: self.tensors[layer.router_weight].detach().clone() for layer in arch.layers} \
            if kl else {}
        self.routers = {layer.block: model.get_submodule(layer.router) for layer in arch.layers}
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles = []

    @property
    def active(self) -> bool:
        return any(self.coef.values())

    def __enter__(self):
        for layer in self.arch.layers:
            hook = (lambda m, args, out, b=layer.block: self._inputs.__setitem__(b, args[0]))
            self._handles.append(self.routers[layer.block].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_terms(self, layer: MoeLayer, hidden: torch.Tensor, keep: torch.Tensor | None) -> dict:
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, H)
        if keep is not None and keep.numel() == hidden.shape[0]:
            hidden = hidden[keep]
        weight = self.tensors[layer.router_weight]  # (E, H)
        bias = router_bias(self.tensors, layer, correction=False)
        logits = F.linear(hidden.to(weight.dtype), weight, bias).float()  # (tokens, E)
        out = {}
        if self.coef["aux_loss"]:
            probs = router_probs(logits, layer.scoring)
            correction = router_bias(self.tensors, layer, correction=True)
            select = probs if correction is None else probs + correction.detach().float()
            out["aux_loss"] = load_balancing_loss(probs, select.topk(layer.top_k, -1).indices, layer.num_experts)
        if self.coef["z_loss"]:
            out["z_loss"] = z_loss(logits)
        if self.coef["router_kl"]:
            base_logits = F.linear(hidden.detach().to(weight.dtype), self.base[layer.block], bias)
            out["router_kl"] = router_kl(logits, base_logits, layer.scoring)
        return out

    def terms(self, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Unweighted terms, averaged over MoE layers, for the last forward."""
        keep = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        per_layer = [self._layer_terms(layer, self._inputs[layer.block], keep)
                     for layer in self.arch.layers if layer.block in self._inputs]
        self._inputs.clear()
        if not per_layer:
            return {}
        return {name: torch.stack([t[name] for t in per_layer]).mean() for name in per_layer[0]}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.coef[name] * value for name, value in terms.items())
