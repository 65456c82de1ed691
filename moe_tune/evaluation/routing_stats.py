"""Routing analytics: which experts fire, how evenly, and how far routing moved from the base.

Measured by teacher forcing on evaluation rows (prompt and answer tokens, padding excluded),
through ``RouterTap``, so it works the same for every family:

- load: per layer, the share of top-k slots each expert receives (sums to 1);
- imbalance: coefficient of variation (std / mean) and max / mean of the load;
- entropy: mean over tokens of the router distribution's entropy (nats);
- never selected: experts with no slot at all;
- drift from the base model on the same rows: Jensen-Shannon divergence (nats) of the layer's
  load, and the share of tokens whose top-1 expert changed;
- usage per task: the load computed on each task's rows alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from moe_tune.evaluation.heldout import inference_mode
from moe_tune.model.arch import MoeArch
from moe_tune.moe.routing import RouterTap, chat_batches, on_device


@dataclass
class RoutingProfile:
    load: dict[str, torch.Tensor]                 # layer -> (E,) share of top-k slots
    entropy: dict[str, float]                     # layer -> mean router entropy (nats)
    top1: dict[str, torch.Tensor]                 # layer -> (tokens,) top-1 expert, in row order
    task_load: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> layer -> (E,)
    removed: dict[str, list[int]] = field(default_factory=dict)  # layer -> experts pruned away (no load)


def profile(model, arch: MoeArch, tokenizer, rows: list[dict], batch_size: int = 32) -> RoutingProfile:

    counts = {layer.block: torch.zeros(layer.num_experts) for layer in arch.layers}
    task_counts: dict[str, dict[str, torch.Tensor]] = defaultdict(
        lambda: {layer.block: torch.zeros(layer.num_experts) for layer in arch.layers})
    entropy_sum, tokens = defaultdict(float), defaultdict(int)
    top1 = defaultdict(list)
    with inference_mode(model), RouterTap(model, arch) as tap:
        for start, enc in chat_batches(tokenizer, rows, batch_size):
            model(**on_device(model, enc))
            routed = tap.take(enc["attention_mask"])
            row_of_token = torch.arange(start, start + enc["input_ids"].shape[0]).repeat_interleave(
                enc["attention_mask"].sum(-1))  # (tokens,) which row each kept token came from
            for block, r in routed.items():
                n = len(counts[block])
                counts[block] += torch.bincount(r.topk.reshape(-1), minlength=n).float()
                p = r.probs.clamp_min(1e-12)
                entropy_sum[block] += float(-(p * p.log()).sum(-1).sum())
                tokens[block] += r.probs.shape[0]
                top1[block].append(r.probs.argmax(-1))  # (tokens,)
                for i, row in enumerate(rows[start:start + enc["input_ids"].shape[0]]):
                    if "task" in row:
                        mine = r.topk[row_of_token == start + i].reshape(-1)
                        task_counts[row["task"]][block] += torch.bincount(mine, minlength=n).float()
    norm = lambda c: c / c.sum().clamp_min(1)  # noqa: E731
    return RoutingProfile(
        load={b: norm(c) for b, c in counts.items()},
        entropy={b: entropy_sum[b] / max(tokens[b], 1) for b in counts},
        top1={b: torch.cat(t) for b, t in top1.items()},
        task_load={task: {b: norm(c) for b, c in layers.items()} for task, layers in sorted(task_counts.items())},
    )


def in_original_ids(prof: RoutingProfile, num_experts: int, ids: dict[str, list[int]]) -> RoutingProfile:
    """A pruned model's profile told in the expert ids of the model it was pruned from
    (``num_experts`` per layer there; ``ids[layer]``: the original id of each kept expert):
    removed experts have no load."""
    def widen(block: str, load: torch.Tensor) -> torch.Tensor:  # (K,) -> (E,)
        out = torch.zeros(num_experts)
        out[ids[block]] = load
        return out

    return RoutingProfile(
        load={b: widen(b, v) for b, v in prof.load.items()},
        entropy=prof.entropy,
        top1={b: torch.tensor(ids[b])[t] for b, t in prof.top1.items()},  # (tokens,) original ids
        task_load={task: {b: widen(b, v) for b, v in layers.items()} for task, layers in prof.task_load.items()},
        removed={b: sorted(set(range(num_experts)) - set(ids[b])) for b in prof.load},
    )


def imbalance(load: torch.Tensor) -> dict[str, float]:
    """Coefficient of variation and max/mean of a (E,) load vector."""
    mean = load.mean()
    return {"cv": float(load.std(unbiased=False) / mean), "max_over_mean": float(load.max() / mean)}


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats) of two distributions over experts."""
    m = (p + q) / 2

    def kl(a, b):
        a = a.clamp_min(0)
        return float((a[a > 0] * (a[a > 0] / b[a > 0]).log()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def summarize(prof: RoutingProfile, base: RoutingProfile | None = None) -> dict:
    """Per layer statistics (JSON-ready), with drift when the base profile is given."""
    layers = {}
    for block, load in prof.load.items():
        removed = prof.removed.get(block, [])
        present = torch.ones(len(load), dtype=torch.bool)
        present[removed] = False  # balance is over the experts the model has
        stats = {"load": [round(x, 6) for x in load.tolist()], **imbalance(load[present]),
                 "entropy": prof.entropy[block],
                 "never_selected": [e for e, x in enumerate(load.tolist()) if x == 0 and e not in removed]}
        if removed:
            stats["removed"] = removed
        if base is not None:
            stats["js_from_base"] = js_divergence(load, base.load[block])
            stats["top1_changed"] = float((prof.top1[block] != base.top1[block]).float().mean())
        layers[block] = stats
    overall = {key: sum(s[key] for s in layers.values()) / len(layers)
               for key in ("cv", "max_over_mean", "entropy", "js_from_base", "top1_changed")
               if all(key in s for s in layers.values())}
    return {"layers": layers, "mean_over_layers": overall,
            "task_load": {t: {b: [round(x, 6) for x in v.tolist()] for b, v in layers_.items()}
                          for t, layers_ in prof.task_load.items()}}
