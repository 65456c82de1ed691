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

``balance_scope``: transformers balances each micro-batch; with ``global_batch`` (Qwen, arXiv
2501.11873) ``f_e`` counts the choices of the step's whole batch, over every rank and accumulation
step. A micro-batch's gradient can only use the choices counted so far in its step (as Megatron's
and Qwen's buffers do); the logged term is the whole step's ``E * sum_e f_e * P_e``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import MoeArch, MoeLayer, text_config
from moe_tune.moe.routing import router_bias, router_probs, whole


def local_mean(sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """sums (...) over ``tokens`` tokens -> their mean."""
    return sums / tokens


def global_mean(sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """sums (...) over this rank's ``tokens`` -> the mean over every rank's tokens, as one process
    with the whole batch computes it; the gradient reaches each rank's own sums, and Trainer's
    averaging over ranks then gives the whole batch's gradient. Ranks that share a batch (expert
    parallelism alone) count it as often in the sums as in the count, so the mean is the same."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums / tokens
    count = torch.tensor([float(tokens)], dtype=sums.dtype, device=sums.device)
    dist.all_reduce(count)
    return dist_nn.all_reduce(sums) / count


def balance_term(f: torch.Tensor, p: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f (..., k, E) share of each top-k slot, p (..., E) mean probability -> (...) E * sum f * P."""
    return num_experts * (f.detach() * p.unsqueeze(-2)).sum((-2, -1))


def load_balancing_loss(probs: torch.Tensor, topk: torch.Tensor, num_experts: int, mean=local_mean) -> torch.Tensor:
    """probs (..., tokens, E) fp32 distribution, topk (..., tokens, k) expert ids -> (...) loss."""
    tokens = probs.shape[-2]
    f = mean(F.one_hot(topk, num_experts).float().sum(-3), tokens)  # (..., k, E): share of each top-k slot
    return balance_term(f, mean(probs.sum(-2), tokens), num_experts)


def z_loss(logits: torch.Tensor, mean=local_mean) -> torch.Tensor:
    """logits (..., tokens, E) -> (...) mean of logsumexp^2, in fp32."""
    return mean(torch.logsumexp(logits.float(), dim=-1).pow(2).sum(-1), logits.shape[-2])


def router_kl(logits: torch.Tensor, base_logits: torch.Tensor, scoring: str, mean=local_mean) -> torch.Tensor:
    """(..., tokens, E) -> (...): KL(base || current) per token, averaged; the base side is a
    fixed target."""
    base_logits = base_logits.detach().float()
    logits = logits.float()
    if scoring == "sigmoid":  # independent Bernoulli per expert
        p, log_q, log_1mq = base_logits.sigmoid(), F.logsigmoid(logits), F.logsigmoid(-logits)
        log_p, log_1mp = F.logsigmoid(base_logits), F.logsigmoid(-base_logits)
        kl = (p * (log_p - log_q) + (1 - p) * (log_1mp - log_1mq)).mean(-1)  # (..., tokens)
    else:
        base = router_probs(base_logits, scoring)
        log_now = router_probs(logits, scoring).clamp_min(1e-12).log()
        kl = (base * (base.clamp_min(1e-12).log() - log_now)).sum(-1)  # (..., tokens)
    return mean(kl.sum(-1), logits.shape[-2])


def _all_summed(t: torch.Tensor) -> torch.Tensor:
    """t summed over every rank (no gradient); t itself in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@dataclass
class StepChoices:
    """A group of MoE layers' routing over the step so far, every rank's (global-batch balancing)."""

    counts: torch.Tensor      # (L, k, E) top-k choices per slot
    prob_sums: torch.Tensor   # (L, E) router probabilities summed over tokens, no gradient
    tokens: float

    def value(self, num_experts: int) -> torch.Tensor:
        """(L,) the load-balancing term of the step's batch: E * sum f * P over all its tokens."""
        return balance_term(self.counts / self.tokens, self.prob_sums / self.tokens, num_experts)


class RouterRegularizer:
    """Captures router inputs during a forward (``with reg: model(...)``) and turns them into
    the router terms (``reg.terms(attention_mask)``) and their weighted sum (``reg.weighted``)."""

    def __init__(self, model: nn.Module, arch: MoeArch, aux: float, z: float, kl: float,
                 balance_scope: str = "micro_batch"):
        self.arch, self.coef = arch, {"aux_loss": aux, "z_loss": z, "router_kl": kl}
        self.global_batch = balance_scope == "global_batch"
        self.step: dict[tuple[str, ...], StepChoices] = {}  # global batch: per group of layers, by blocks
        self.model = model
        self.tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        # Sharded at load time (FSDP2), a router's weight is whole only inside its layer's forward:
        # the logits are computed there, in the hook, from the weight the forward gathered, and
        # their gradient goes back through FSDP's own reduction. Terms are means over every
        # rank's tokens (global_mean) whenever several processes train.
        self.sharded = any(isinstance(self.tensors[layer.router_weight], DTensor) for layer in arch.layers)
        self.mean = global_mean
        # frozen copy of the base routers, only when the KL term is on
        self.base = {layer.block: whole(self.tensors[layer.router_weight]).detach().clone()
                     for layer in arch.layers} if kl else {}
        self.routers = {layer.block: model.get_submodule(layer.router) for layer in arch.layers}
        self._inputs: dict[str, torch.Tensor] = {}
        self._logits: dict[str, torch.Tensor] = {}  # sharded: (tokens, E) per block, from the hook
        self._handles = []

    @property
    def active(self) -> bool:
        return any(self.coef.values())

    def __enter__(self):
        for layer in self.arch.layers:
            hook = (lambda m, args, out, lay=layer: self._capture(lay, args[0]))
            self._handles.append(self.routers[layer.block].register_forward_hook(hook))
        return self

    def _capture(self, layer: MoeLayer, hidden: torch.Tensor) -> None:
        self._inputs[layer.block] = hidden
        if self.sharded:  # the tensors as this forward holds them: gathered whole
            live = {name: self._live(name) for name in (layer.router_weight, *layer.router_extras)}
            self._logits[layer.block] = self._logits_of([layer], hidden.reshape(1, -1, hidden.shape[-1]), live)[0]

    def _live(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        return getattr(self.model.get_submodule(module), leaf)

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stack(self, name_of, layers: list[MoeLayer]) -> torch.Tensor | None:
        tensors = [name_of(layer) for layer in layers]
        return None if any(t is None for t in tensors) else torch.stack(tensors)

    def _logits_of(self, layers: list[MoeLayer], hidden: torch.Tensor, tensors: dict) -> torch.Tensor:
        """hidden (L, tokens, H) -> router logits (L, tokens, E) in fp32, with the logit bias."""
        weight = torch.stack([tensors[layer.router_weight] for layer in layers])  # (L, E, H)
        logits = torch.bmm(hidden.to(weight.dtype), weight.transpose(1, 2))  # (L, tokens, E)
        bias = self._stack(lambda layer: router_bias(tensors, layer, correction=False), layers)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        return logits.float()

    def _group_terms(self, layers: list[MoeLayer], hidden: torch.Tensor,
                     logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Terms of MoE layers that share expert count, top-k and scoring, computed together:
        hidden (L, tokens, H) -> per-term (L,) values. One batched matmul instead of L small ones
        (or the ``logits`` (L, tokens, E) the hooks computed, on a sharded model)."""
        first = layers[0]
        if logits is None:
            logits = self._logits_of(layers, hidden, self.tensors)
        out = {}
        if self.coef["aux_loss"]:
            probs = router_probs(logits, first.scoring)
            correction = self._stack(lambda layer: router_bias(self.tensors, layer, correction=True), layers)
            select = probs if correction is None else probs + correction.detach().float().unsqueeze(1)
            topk = select.topk(first.top_k, -1).indices  # (L, tokens, k)
            if self.global_batch and self.model.training:
                out["aux_loss"] = self._global_aux(tuple(layer.block for layer in layers), probs, topk, first.num_experts)
            else:  # evaluation balances each batch
                out["aux_loss"] = load_balancing_loss(probs, topk, first.num_experts, self.mean)
        if self.coef["z_loss"]:
            out["z_loss"] = z_loss(logits, self.mean)
        if self.coef["router_kl"]:
            base = torch.stack([self.base[layer.block] for layer in layers])  # (L, E, H)
            base_logits = torch.bmm(hidden.detach().to(base.dtype), base.transpose(1, 2))
            bias = self._stack(lambda layer: router_bias(self.tensors, layer, correction=False), layers)
            if bias is not None:
                base_logits = base_logits + bias.detach().unsqueeze(1)
            out["router_kl"] = router_kl(logits, base_logits, first.scoring, self.mean)
        return out

    def _global_aux(self, blocks: tuple[str, ...], probs: torch.Tensor, topk: torch.Tensor,
                    num_experts: int) -> torch.Tensor:
        """probs (L, tokens, E), topk (L, tokens, k) -> (L,): E * sum f * P, with f the step's
        shares so far (every rank and micro-batch, no gradient) and P this micro-batch's mean
        over every rank's tokens."""
        counts = F.one_hot(topk, num_experts).float().sum(-3)  # (L, k, E), this rank's micro-batch
        seen = _all_summed(torch.cat([counts.flatten(), probs.detach().sum(-2).flatten(),
                                      counts.new_tensor([probs.shape[-2]])]))
        counts, prob_sums = seen[:counts.numel()].view_as(counts), seen[counts.numel():-1].view(probs.shape[0], -1)
        step = self.step.get(blocks)
        self.step[blocks] = step = StepChoices(counts, prob_sums, seen[-1].item()) if step is None else \
            StepChoices(step.counts + counts, step.prob_sums + prob_sums, step.tokens + seen[-1].item())
        return balance_term(step.counts / step.tokens, self.mean(probs.sum(-2), probs.shape[-2]), num_experts)

    def end_step(self) -> float | None:
        """Global batch: the step's load-balancing term (mean over MoE layers), and counting
        starts afresh; None where nothing was counted."""
        if not self.step:
            return None
        experts = {layer.block: layer.num_experts for layer in self.arch.layers}
        value = torch.cat([step.value(experts[blocks[0]]) for blocks, step in self.step.items()]).mean().item()
        self.step.clear()
        return value

    def terms(self, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Unweighted terms, averaged over MoE layers, for the last forward."""
        mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None  # (tokens,)
        # kept positions as indices: index_select's backward is an index_add, much faster on CPU
        # than the accumulating index_put a boolean mask's backward runs; none when nothing is masked
        keep = mask.nonzero().squeeze(1) if mask is not None and not mask.all() else None  # (kept,)
        groups: dict[tuple, list[tuple[MoeLayer, torch.Tensor, torch.Tensor | None]]] = {}
        for layer in self.arch.layers:
            if layer.block not in self._inputs:
                continue
            hidden = self._inputs[layer.block]
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, H)
            logits = self._logits.get(layer.block)  # (tokens, E), sharded only
            if keep is not None and mask.numel() == hidden.shape[0]:
                hidden = hidden.index_select(0, keep)
                logits = logits.index_select(0, keep) if logits is not None else None
            key = (layer.num_experts, layer.top_k, layer.scoring, tuple(hidden.shape))
            groups.setdefault(key, []).append((layer, hidden, logits))
        self._inputs.clear()
        self._logits.clear()
        values: dict[str, list[torch.Tensor]] = {}
        for members in groups.values():
            layers = [layer for layer, _, _ in members]
            logits = torch.stack([lg for _, _, lg in members]) if self.sharded else None
            for name, v in self._group_terms(layers, torch.stack([h for _, h, _ in members]), logits).items():
                values.setdefault(name, []).append(v)
        return {name: torch.cat(v).mean() for name, v in values.items()}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.coef[name] * value for name, value in terms.items())


# --- which coefficients apply ----------------------------------------------------------------------

def check_router(router, router_mode: str) -> None:
    """``router`` is the recipe's RouterSection. The terms read the router weight, which LoRA
    leaves unchanged: with a LoRA router, terms the recipe asks for are refused. Global-batch
    balancing is a choice about how the router learns: refused where it does not train."""
    if router.balance_scope == "global_batch" and router_mode != "train":
        state = {"freeze": "frozen", "lora": "LoRA-adapted"}.get(router_mode, router_mode)
        raise MoeTuneError(f"router.balance_scope: global_batch balances a router that trains, and here it is {state} "
                           "(trainable.router); set trainable.router: train, or leave balance_scope at micro_batch")
    explicit = router.z_loss_coef or router.anchor_kl_coef or router.aux_loss_coef
    if router_mode == "lora" and explicit:
        raise MoeTuneError("router: the router terms are computed from the router weight, which LoRA leaves "
                           "unchanged; set trainable.router to train or freeze, or turn the terms off")


def coefficients(router, config, router_mode: str) -> dict[str, float]:
    """Weights of the three terms. The load-balancing weight defaults to the model config's
    ``router_aux_loss_coef``, as TRL's does, except with a LoRA router (see ``check_router``)."""
    declared = getattr(text_config(config), "router_aux_loss_coef", 0.0) or 0.0
    aux = router.aux_loss_coef if router.aux_loss_coef is not None else declared
    if router_mode == "lora" and router.aux_loss_coef is None:
        aux = 0.0
    return {"aux_loss": aux, "z_loss": router.z_loss_coef, "router_kl": router.anchor_kl_coef}
