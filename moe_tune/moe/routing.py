"""What the routers decide, for any family: router probabilities and the selected experts.

Forward hooks on every router (found by the architecture layer) record its input. The router
distribution is recomputed from that input and the router weight, which works the same for
every family; the selected experts are taken from the router's own output when it returns
them as a (tokens, top_k) index tensor (so group-limited routing is exact), and otherwise
recomputed as the top-k of the selection scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moe_tune.model.arch import MoeArch, MoeLayer
from moe_tune.model.loading import padding_side


@dataclass
class Routing:
    probs: torch.Tensor  # (tokens, E) float32, each row sums to 1
    topk: torch.Tensor   # (tokens, k) int64 expert ids


def router_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """(tokens, E) logits -> (tokens, E) distribution, in fp32.

    softmax routers: the softmax. sigmoid routers score each expert independently; their
    scores are normalised over experts so that every family yields a distribution."""
    logits = logits.float()
    if scoring == "softmax":
        return logits.softmax(-1)
    if scoring == "sigmoid":
        scores = logits.sigmoid()
    elif scoring == "sqrtsoftplus":
        scores = nn.functional.softplus(logits).sqrt()
    else:
        raise ValueError(f"unknown router scoring '{scoring}'")
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-9)


def router_bias_name(tensors: dict[str, torch.Tensor], layer: MoeLayer, correction: bool) -> str | None:
    """The name of the router's logit bias (gpt_oss), or with ``correction`` of its selection-only
    score correction (DeepSeek-V3's e_score_correction_bias); None when it has none."""
    for name in layer.router_extras:
        leaf = name.rsplit(".", 1)[-1]
        is_correction = "correction" in leaf or leaf == "expert_bias"
        if is_correction == correction and (correction or leaf == "bias") \
                and tensors[name].numel() == layer.num_experts:
            return name
    return None


def router_bias(tensors: dict[str, torch.Tensor], layer: MoeLayer, correction: bool) -> torch.Tensor | None:
    """(E,) the tensor ``router_bias_name`` names (stored (E,) or, in Ernie-4.5, (1, E))."""
    name = router_bias_name(tensors, layer, correction)
    return whole(tensors[name]).reshape(-1) if name is not None else None


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor sharded at load time (a DTensor) gathered whole, differentiably; any other as it is.
    The gather is a collective: every rank must ask for the same tensors in the same order."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def readable(model: nn.Module, arch: MoeArch) -> bool:
    """Whether every router weight (and bias) is still where ``arch`` found it. PEFT moves a
    router's weight when it wraps the router (LoRA) or keeps a trained copy beside it (a router
    trained in full next to LoRA); the weight left at the old place is then not the one that
    routes, so nothing is read from it."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return all(layer.router_weight in names and set(layer.router_extras) <= names for layer in arch.layers)


def _indices_from_output(output, tokens: int, top_k: int) -> torch.Tensor | None:
    items = output if isinstance(output, tuple) else (output,)
    for item in reversed(items):
        if isinstance(item, torch.Tensor) and not item.is_floating_point() and item.dim() >= 1:
            flat = item.reshape(-1, item.shape[-1])
            if flat.shape == (tokens, top_k):
                return flat.long()
    return None


class RouterTap:
    """``with RouterTap(model, arch) as tap: model(**batch); routing = tap.take(attention_mask)``."""

    def __init__(self, model: nn.Module, arch: MoeArch):
        self.model, self.arch = model, arch
        self.tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        self._seen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._handles = []

    def _hook(self, layer: MoeLayer):
        def hook(module, args, output):
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, H)
            self._seen[layer.block] = (hidden, _indices_from_output(output, hidden.shape[0], layer.top_k))
        return hook

    def __enter__(self) -> RouterTap:
        for layer in self.arch.layers:
            module = self.model.get_submodule(layer.router)
            self._handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def routing(self, layer: MoeLayer, hidden: torch.Tensor, indices: torch.Tensor | None) -> Routing:
        weight = whole(self.tensors[layer.router_weight]).detach().float()  # (E, H)
        logits = hidden.float() @ weight.T  # (tokens, E)
        bias = router_bias(self.tensors, layer, correction=False)
        probs = router_probs(logits if bias is None else logits + bias.detach().float(), layer.scoring)
        if indices is None:
            correction = router_bias(self.tensors, layer, correction=True)
            select = probs if correction is None else probs + correction.detach().float()
            indices = select.topk(layer.top_k, dim=-1).indices  # (tokens, k)
        return Routing(probs=probs, topk=indices)

    def take(self, attention_mask: torch.Tensor | None = None) -> dict[str, Routing]:
        """Routing of every MoE layer for the last forward, padding tokens dropped."""
        out = {}
        for layer in self.arch.layers:
            if layer.block not in self._seen:
                continue
            hidden, indices = self._seen[layer.block]
            routing = self.routing(layer, hidden, indices)
            routing = Routing(routing.probs.cpu(), routing.topk.cpu())  # statistics are kept on the CPU
            if attention_mask is not None and attention_mask.numel() == hidden.shape[0]:
                keep = attention_mask.reshape(-1).bool().cpu()
                routing = Routing(routing.probs[keep], routing.topk[keep])
            out[layer.block] = routing
        self._seen.clear()
        return out


def on_device(model, enc) -> dict[str, torch.Tensor]:
    """A copy of a tokenized batch on the model's device (``BatchEncoding.to`` would move the
    caller's own tensors, and its CPU attention mask still serves the statistics)."""
    return {key: value.to(model.device) for key, value in enc.items()}


def chat_batches(tokenizer, rows: list[dict], batch_size: int):
    """Yield (index of the batch's first row, tokenized batch) of whole chat rows, right-padded,
    for teacher-forced passes over prompts and answers."""
    with padding_side(tokenizer, "right"):
        for start in range(0, len(rows), batch_size):
            texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False)
                     for r in rows[start:start + batch_size]]
            yield start, tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
