"""What the router terms cost: training step time on the quickstart, terms off versus all on.

    python benchmarks/router_overhead.py            # about 1 minute on 2 CPU cores

Runs the quickstart recipe (shipped model and data), with the trainer ``moe-tune train`` builds
(moe_tune's experts kernel included), for a few steps with no router terms and
with aux loss + z-loss + anchor KL, alternating the two several times in one process, and
prints one JSON object with the median seconds per step of each and their ratio (target:
at most 1.10).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_tune.model.loading import load_model  # noqa: E402
from moe_tune.recipe import load_recipe  # noqa: E402
from moe_tune.training.pipeline import plan_run, trainer_for  # noqa: E402

VARIANTS = {
    "off": ["router.aux_loss_coef=0"],
    "all_on": ["router.aux_loss_coef=0.01", "router.z_loss_coef=0.001", "router.anchor_kl_coef=0.1"],
}


class StepTimer(TrainerCallback):
    """Seconds per optimizer step, after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def seconds_per_step(overrides: list[str], steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                             [f"output_dir={tmp}", f"sft.max_steps={steps + warmup}", "sft.eval_strategy=no",
                              "sft.logging_steps=1000", "eval.files=[]", *overrides])
        model, tokenizer = load_model(str(ROOT / recipe.model.path))
        with contextlib.redirect_stdout(io.StringIO()):  # its plan table, printed by every build
            trainer, _ = trainer_for(plan_run(recipe), model, tokenizer)  # what `moe-tune train` runs
        timer = StepTimer(warmup)
        trainer.add_callback(timer)
        trainer.train()
        return statistics.median(timer.times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # alternate, so drifts in machine speed hit both alike
        for name, overrides in VARIANTS.items():
            runs[name].append(seconds_per_step(overrides, args.steps, args.warmup))
    off, on = statistics.median(runs["off"]), statistics.median(runs["all_on"])
    print(json.dumps({"seconds_per_step_off": round(off, 4), "seconds_per_step_all_on": round(on, 4),
                      "ratio": round(on / off, 3), "target_max_ratio": 1.10, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
