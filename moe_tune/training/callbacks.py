"""The callbacks moe_tune adds to TRL's trainer: a guard against tensors that stop learning,
metrics.jsonl, and a routing summary at each evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from moe_tune.errors import MoeTuneError
from moe_tune.evaluation import routing_stats


class GradientGuard(TrainerCallback):
    """Stop, rather than train on silently, when trainable weights stop receiving gradients.

    At the first step, the tensors that get a gradient are noted (none at all is an error);
    at the first step after each evaluation, all of them must still get one. Quantized CPU
    kernels have been seen to cut the graph right after an eval-mode forward."""

    def __init__(self):
        self.check, self.live = True, None

    def on_evaluate(self, args, state, control, **kwargs):
        self.check = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.check or model is None:
            return
        self.check = False
        live = {n for n, p in model.named_parameters()
                if p.requires_grad and p.grad is not None and bool(p.grad.abs().sum() > 0)}
        if self.live is None:
            if not live:
                raise MoeTuneError(f"step {state.global_step + 1}: no trainable tensor received a gradient; "
                                   "stopping instead of training on silently")
            self.live = live
        elif self.live - live:
            dead = sorted(self.live - live)
            raise MoeTuneError(f"step {state.global_step + 1}: {len(dead)} trainable tensors stopped receiving "
                               f"gradients after evaluation (e.g. {dead[0]}); stopping instead of training on "
                               "silently")


class MetricsLog(TrainerCallback):
    """Appends every logged dict (loss, learning_rate, aux_loss, eval_loss, ...) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        # the last step is logged too, whatever sft.logging_steps: the final training loss is
        # what a comparison's train-to-held-out gap is measured from
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True


class RoutingProbe:
    """Routing summary of the model on a fixed sample of validation rows, with drift from the
    routing the model had when the probe was made (before training)."""

    SAMPLE = 64  # rows: enough for a stable load estimate, a fraction of a second on the tiny model

    def __init__(self, model, arch, tokenizer, rows: list[dict]):
        self.model, self.arch, self.tokenizer, self.rows = model, arch, tokenizer, rows[:self.SAMPLE]
        self.base = routing_stats.profile(model, arch, tokenizer, self.rows)

    def __call__(self) -> dict[str, float]:
        now = routing_stats.profile(self.model, self.arch, self.tokenizer, self.rows)
        summary = routing_stats.summarize(now, self.base)["mean_over_layers"]
        # eval_: TensorBoard files it under eval/, beside the validation loss it goes with
        return {f"eval_routing/{key}": value for key, value in summary.items()}


class AfterOptimizerStep(TrainerCallback):
    """Calls ``fn()`` after every optimizer step (bias balancing, global-batch balancing)."""

    def __init__(self, fn):
        self.fn = fn

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.fn()
