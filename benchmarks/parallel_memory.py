"""Per-process memory of sharded training (the recipe's parallel section) against `moe-tune plan`.

    python benchmarks/parallel_memory.py                       # the shipped model; about 1 minute on 2 CPU cores
    python benchmarks/parallel_memory.py --shape qwen3-30b-a3b --layers 1 --processes 2

For each layout (FSDP2, FSDP2 x EP) it launches ``torchrun --nproc_per_node N`` on this script:
every rank runs ``moe-tune train``'s own steps (plan_run -> load_model with the layout ->
trainer_for) for a few steps, then counts what it holds of the training state, from its local
shards: the weights, their gradients (just before the optimizer step) and AdamW's two moments.
That is set against the plan's per-GPU ``states`` figure for the same layout (``moe-tune plan
--gpus N``), the part of the plan the layout changes; target ratio 0.8-1.25. Each rank's peak
resident memory is printed beside it (it includes the Python runtime and libraries, which the
plan does not count). With ``--shape``, a published config's layers (benchmarks/throughput.py),
randomly initialised. Prints one JSON object; the CPU's model name is in it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LAYOUTS = {"fsdp2": ["parallel.fsdp_size={n}"], "fsdp2_ep": ["parallel.fsdp_size={n}", "parallel.ep_size={n}"]}
RUN = ["sft.max_steps=2", "sft.logging_steps=1", "sft.warmup_steps=0", "sft.eval_strategy=no", "data.valid=null",
       "data.max_train_rows=64", "eval.files=[]", "eval.retention_file=null", "sft.save_strategy=no",
       "sft.per_device_train_batch_size=4", "sft.max_length=128"]


def overrides(model: str, layout: str, processes: int, out: Path) -> list[str]:
    return [f"model.path={model}", *(o.format(n=processes) for o in LAYOUTS[layout]), *RUN, f"output_dir={out}"]


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(model: str, layout: str, processes: int, out: Path) -> None:
    """One rank: train a few steps, then write what it holds to OUT/rank-R.json."""
    from transformers import TrainerCallback

    from moe_tune.model.loading import load_model
    from moe_tune.recipe import load_recipe
    from moe_tune.training import distributed
    from moe_tune.training.pipeline import check_data, plan_run, trainer_for

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides(model, layout, processes, out))
    setup = plan_run(recipe)
    data = check_data(setup)
    loaded, tokenizer = load_model(recipe.model.path, recipe.model.dtype, tokenizer=data.tokenizer,
                                   sharding=distributed.distributed_config(recipe.parallel))
    held = {}

    class Count(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            held["gradients"] = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            held["weights"] = sum(local_bytes(p) for p in model.parameters())
            held["optimizer"] = sum(local_bytes(t) for s in optimizer.state.values() for t in s.values()
                                    if hasattr(t, "numel") and t.dim() > 0)

    trainer, _ = trainer_for(setup, loaded, tokenizer, data)
    trainer.add_callback(Count())
    trainer.train()
    held["states"] = held["weights"] + held["gradients"] + held["optimizer"]
    held["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / f"rank-{distributed.rank()}.json").write_text(json.dumps({"rank": distributed.rank(), **held}))


def planned_states(model: str, layout: str, processes: int, out: Path) -> float:
    from moe_tune.plan.fit import per_device
    from moe_tune.recipe import load_recipe
    from moe_tune.training.pipeline import plan_run

    setup = plan_run(load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides(model, layout, processes, out)),
                     planning=True)
    return per_device(setup, processes)[layout]["states"]


def measure(model: str, layout: str, processes: int, work: Path) -> dict:
    out = work / layout
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), __file__,
           "--worker", layout, "--model", model, "--processes", str(processes), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{layout}: the run failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]
    plan = planned_states(model, layout, processes, out)
    held = max(r["states"] for r in ranks)
    return {"layout": layout, "processes": processes, "plan_states_gb": round(plan / 1e9, 4),
            "measured_states_gb": round(held / 1e9, 4), "states_vs_plan": round(held / plan, 3),
            "per_rank": [{k: (round(v / 1e9, 4) if k != "rank" else v) for k, v in r.items()} for r in ranks]}


def model_for(args, work: Path) -> str:
    if args.shape is None:
        return str(ROOT / "data" / "tiny-moe")
    from throughput import build_model  # benchmarks/throughput.py: a published config's layers, random weights

    folder = work / "model"
    build_model(folder, args.shape, args.layers)
    return str(folder)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, help="a published config (moe_tune/model/configs/NAME)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of --shape")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS))
    parser.add_argument("--worker", choices=tuple(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.worker, args.processes, args.out)
        return
    from throughput import cpu_model

    with tempfile.TemporaryDirectory() as work:
        model = model_for(args, Path(work))
        results = [measure(model, layout, args.processes, Path(work)) for layout in args.layouts]
    print(json.dumps({"cpu": cpu_model(), "shape": args.shape or "shipped", "layers": args.layers,
                      "results": results}, indent=1))


if __name__ == "__main__":
    cli()
