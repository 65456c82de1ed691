"""Packing against padding: real tokens per second and the padding share, moe_tune against TRL.

    python benchmarks/packing.py                                  # about 6 minutes on 2 idle CPU cores
    python benchmarks/packing.py --steps 2 --repeats 1            # a quick look
    python benchmarks/packing.py --datasets long_tailed --model benchmark   # a benchmark-size MoE

For each dataset

* ``shipped``: data/train.jsonl (chat rows of 12-17 tokens), at the quickstart's sft.max_length (128);
* ``long_tailed``: 2,400 rows whose lengths are long-tailed like Alpaca's (prompt and answer
  log-normal; rows of median 66 and 95th percentile ~180 tokens, none over 256), made by
  scripts/make_long_tailed_data.py into a temporary folder, at sft.max_length 256 (the shipped
  model's max_position_embeddings);

and each of four paths, it trains the shipped model (data/tiny-moe, or with ``--model benchmark``
benchmarks/throughput.py's hidden-512 MoE, randomly initialised) ``--warmup`` steps, then
``--steps`` timed ones:

* moe_tune padded / packed: ``moe-tune train``'s own steps (plan_run -> load_model -> trainer_for)
  on recipes/quickstart.yaml with the data, sft.max_length, the batch and the steps overridden,
  and ``sft.packing=true`` for packed;
* TRL padded / packed: ``SFTTrainer`` with ``SFTConfig`` as a user of the plain stack writes it,
  on the same model, data, max_length, batch and learning rate (the quickstart's), and
  ``packing=True`` (TRL's default strategy, bfd) for packed; everything else is TRL's default,
  bf16 autocast included (``--baseline-precision moe_tune``: the quickstart's fp32 instead).

It measures, over the timed steps:

* real tokens per second: the rows' tokens (padding excluded) of the batches trained in the timed
  steps, over their wall time. The tokens are counted where the batches are made: the trainer's
  data collator is wrapped, and each batch's rows are counted from the rows it collates (the
  batch's attention mask or row mask must agree). Trainer trains the collated batches in order,
  so the batches of the timed steps are the ``--warmup``-th on;
* the padding share: padding positions / all positions of those batches (when packed: TRL
  flattens the sequences into one row, which nothing pads; moe_tune keeps each sequence a row of
  its own on every attention but flash attention's, and pads the shorter ones to the longest);
* seconds per step: the median wall time from one step's end to the next's, so that fetching
  and collating the batch count, as they do in a run.

Equal real tokens per step: a padded step holds ``--batch`` rows (the quickstart's 32); a packed
one holds sequences of up to max_length tokens, each several rows. The packed batch is chosen
from the data before any run: --batch x the mean row length over the mean length of the
sequences TRL's bfd packing makes of these rows, rounded; both the planned and the measured real
tokens per step are printed.

Each measurement is its own process (each path with the allocator settings its users get:
moe_tune's loading sets glibc's thresholds, TRL's leaves them); the four paths alternate, in
reverse order every other repeat, and the median over repeats is kept. Prints one JSON object
and writes a Markdown table (``--out``; by default benchmarks/results/packing-<cpu>.md, which
is never overwritten: an existing one stops the run before it starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

import make_long_tailed_data  # noqa: E402
from throughput import build_model, cpu_model  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"
SHIPPED_MODEL = ROOT / "data" / "tiny-moe"
DATASETS = ("shipped", "long_tailed")
BENCHMARK_MODEL = "benchmarks/throughput.py's MoE (hidden 512, 4 layers, 8 experts, top-2, random weights)"
PATHS = (("moe_tune", "padded"), ("moe_tune", "packed"), ("trl", "padded"), ("trl", "packed"))


# ---- counting the trained tokens ----

def batch_tokens(examples: list[dict], batch: dict) -> tuple[int, int, int]:
    """(the rows' tokens, all positions, rows) of one collated batch. The rows' tokens are those
    of the examples it was made from (a packed example is its rows' tokens, concatenated); the
    batch's own mask of them must agree: the attention mask of a padded batch, moe_tune's row
    mask of a packed one."""
    from moe_tune.training.packing import ROW_TOKENS  # noqa: PLC0415

    real = sum(len(example["input_ids"]) for example in examples)
    # a bfd sequence holds the rows of its seq_lengths
    rows = sum(len(example["seq_lengths"]) if "seq_lengths" in example else 1 for example in examples)
    mask = batch.get("attention_mask", batch.get(ROW_TOKENS))
    if mask is not None and int(mask.sum()) != real:
        raise RuntimeError(f"the batch's mask counts {int(mask.sum())} tokens, its rows {real}")
    return real, batch["input_ids"].numel(), rows


class CountingCollator:
    """The trainer's collator, recording (rows' tokens, positions, rows) of every batch it makes, in order."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        self.batches.append(batch_tokens(examples, batch))
        return batch


def _step_clock():
    from transformers import TrainerCallback  # noqa: PLC0415

    class StepClock(TrainerCallback):
        """The wall time of every step from the previous step's end (the first: from training's start)."""

        def __init__(self):
            self.times, self._t = [], 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(args.device.type)
            now = time.perf_counter()
            self.times.append(now - self._t)
            self._t = now

    return StepClock()


def _sync(device: str) -> None:
    import torch  # noqa: PLC0415

    if device == "cuda":
        torch.cuda.synchronize()


# ---- the data and the batches ----

@dataclass(frozen=True)
class DataSet:
    """A dataset as the runs train on it: its file, max_length and both batches."""

    name: str
    source: str                  # where the rows come from, for the reader
    path: str                    # the file the runs read
    max_length: int
    padded_batch: int            # rows per padded step
    packed_batch: int            # packed sequences per step, chosen for about as many real tokens
    rows: int
    row_tokens: dict             # median, p95, mean, max of a row's tokens (cut at max_length)
    planned_real_tokens: dict    # per step: padded, packed


def row_lengths(path: Path, tokenizer, max_length: int) -> list[int]:
    """Each row's tokens as the chat template renders it, cut at max_length (as TRL cuts them)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [min(max_length, len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]))
            for r in rows]


def packed_lengths(lengths: list[int], max_length: int) -> list[int]:
    """The lengths of the sequences TRL's bfd packing makes of rows of these lengths."""
    from datasets import Dataset  # noqa: PLC0415
    from trl.data_utils import pack_dataset  # noqa: PLC0415

    rows = Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    packed = pack_dataset(rows, max_length, strategy="bfd")
    return [len(ids) for ids in packed["input_ids"]]


def plan_dataset(name: str, source: str, path: Path, max_length: int, batch: int, tokenizer) -> DataSet:
    """The packed batch that holds about ``batch`` rows' real tokens: batch x mean row / mean sequence."""
    lengths = row_lengths(path, tokenizer, max_length)
    mean_row, mean_packed = statistics.mean(lengths), statistics.mean(packed_lengths(lengths, max_length))
    packed = max(1, round(batch * mean_row / mean_packed))
    quantiles = statistics.quantiles(lengths, n=100, method="inclusive")
    return DataSet(name, source, str(path), max_length, batch, packed, len(lengths),
                   {"median": statistics.median(lengths), "p95": quantiles[94], "mean": round(mean_row, 1),
                    "max": max(lengths)},
                   {"padded": round(batch * mean_row), "packed": round(packed * mean_packed)})


def make_datasets(names: list[str], work: Path, batch: int, tokenizer) -> list[DataSet]:
    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    out = []
    for name in names:
        if name == "shipped":
            path, max_length = ROOT / "data" / "train.jsonl", load_recipe(RECIPE).sft["max_length"]
            source = shown(path)
        else:  # as `python scripts/make_long_tailed_data.py --out WORK/long_tailed.jsonl` writes it
            path, max_length = work / "long_tailed.jsonl", make_long_tailed_data.MAX_TOKENS
            rows, _ = make_long_tailed_data.generate(tokenizer=tokenizer)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            source = "scripts/make_long_tailed_data.py's rows (its defaults)"
        out.append(plan_dataset(name, source, path, max_length, batch, tokenizer))
    return out


# ---- one measurement, in a child process ----

def moe_tune_trainer(model: str, data: str, max_length: int, batch: int, steps: int, packed: bool, run: Path):
    """``moe-tune train recipes/quickstart.yaml`` with the data, length, batch and steps overridden."""
    from moe_tune.model.loading import load_model  # noqa: PLC0415
    from moe_tune.recipe import load_recipe  # noqa: PLC0415
    from moe_tune.training.pipeline import plan_run, trainer_for  # noqa: PLC0415

    recipe = load_recipe(RECIPE, overrides(model, data, max_length, batch, steps, packed, run))
    setup = plan_run(recipe)
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype, recipe.model,
                                  frozen_experts_in_bf16=setup.frozen_experts_in_bf16)
    run.mkdir(parents=True, exist_ok=True)
    return trainer_for(setup, model, tokenizer)[0]  # what `moe-tune train` runs


def overrides(model: str, data: str, max_length: int, batch: int, steps: int, packed: bool,
              run: Path) -> list[str]:
    """The command line's ``key=value`` overrides of the quickstart recipe for one moe_tune run."""
    return [f"output_dir={run}", f"model.path={model}", f"data.train={data}", "data.valid=null",
            "eval.files=[]", f"sft.max_length={max_length}", f"sft.per_device_train_batch_size={batch}",
            f"sft.max_steps={steps}", "sft.eval_strategy=no", "sft.logging_steps=1000", "sft.report_to=none",
            "sft.disable_tqdm=true", *(["sft.packing=true"] if packed else [])]


def trl_trainer(model: str, data: str, max_length: int, batch: int, steps: int, packed: bool, run: Path,
                bf16: bool | None = None):
    """``bf16``: TRL's SFTConfig default where None."""
    import torch  # noqa: PLC0415
    from datasets import load_dataset  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    quickstart = load_recipe(RECIPE)
    cpu = not torch.cuda.is_available()
    args = SFTConfig(output_dir=str(run), max_steps=steps, per_device_train_batch_size=batch,
                     max_length=max_length, learning_rate=quickstart.sft["learning_rate"], packing=packed,
                     logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=cpu,
                     dataloader_pin_memory=not cpu, **({} if bf16 is None else {"bf16": bf16}))
    weights = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, quickstart.model.dtype))
    rows = load_dataset("json", data_files=data, split="train")
    return SFTTrainer(model=weights, args=args, train_dataset=rows,
                      processing_class=AutoTokenizer.from_pretrained(model))


def worker(framework: str, layout: str, model: str, data: str, max_length: int, batch: int, steps: int,
           warmup: int, run: Path, trl_bf16: bool | None = None) -> dict:
    """One measurement: build the path's trainer, train warmup + steps, count and time the timed steps."""
    packed = layout == "packed"
    with contextlib.redirect_stdout(sys.stderr):  # plan tables and logs: stdout carries the one result
        if framework == "moe_tune":
            trainer = moe_tune_trainer(model, data, max_length, batch, warmup + steps, packed, run)
        else:
            trainer = trl_trainer(model, data, max_length, batch, warmup + steps, packed, run, trl_bf16)
        counter = trainer.data_collator = CountingCollator(trainer.data_collator)
        clock = _step_clock()
        trainer.add_callback(clock)
        trainer.train()
    # the k-th collated batch trains in step k + 1; the collator may have made one more (prefetched)
    timed, times = counter.batches[warmup:warmup + steps], clock.times[warmup:warmup + steps]
    if len(timed) < steps or len(times) < steps:
        raise RuntimeError(f"{framework} {layout}: {len(counter.batches)} batches, {len(clock.times)} steps "
                           f"for {warmup} + {steps}")
    real, positions, rows = (sum(b[i] for b in timed) for i in range(3))
    return {"real_tokens_per_s": real / sum(times), "padding_share": 1 - real / positions,
            "seconds_per_step": statistics.median(times), "real_tokens_per_step": real / steps,
            "positions_per_step": positions / steps, "rows_per_step": rows / steps,
            "batch": batch, "bf16": bool(trainer.args.bf16)}


def measure(framework: str, layout: str, dataset: DataSet, model: str, work: Path, args) -> dict:
    batch = dataset.packed_batch if layout == "packed" else dataset.padded_batch
    cmd = [sys.executable, __file__, "--worker", framework, layout, "--model-path", model,
           "--data", dataset.path, "--max-length", str(dataset.max_length), "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--work", str(work / f"run-{dataset.name}-{framework}-{layout}")]
    if framework == "trl" and args.baseline_precision == "moe_tune":  # the quickstart's sft.bf16
        from moe_tune.recipe import load_recipe  # noqa: PLC0415

        cmd += ["--trl-bf16", str(int(bool(load_recipe(RECIPE).sft.get("bf16"))))]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        sys.exit(f"{dataset.name} {framework} {layout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the comparison ----

def compare(args) -> dict:
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    load = os.getloadavg()[0]  # other work on the machine slows small steps many times over
    if load > 0.5:
        print(f"warning: load average {load:.1f} before the run: what else runs here skews the timings",
              file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="moe-tune-packing-"))
    try:
        if args.model == "benchmark":
            build_model(work / "model", stored="float32")  # fp32, as the quickstart loads its model
        model = str(work / "model" if args.model == "benchmark" else SHIPPED_MODEL)
        tokenizer = AutoTokenizer.from_pretrained(model)
        datasets = make_datasets(args.datasets, work, args.batch, tokenizer)
        runs = {(d.name, f, layout): [] for d in datasets for f, layout in PATHS}
        for repeat in range(args.repeats):
            # alternate the order of the paths, so that drift in machine speed hits them alike
            for framework, layout in PATHS if repeat % 2 == 0 else PATHS[::-1]:
                for dataset in datasets:
                    found = measure(framework, layout, dataset, model, work, args)
                    runs[dataset.name, framework, layout].append(found)
                    print(f"repeat {repeat + 1} {dataset.name:11s} {framework:8s} {layout:6s} "
                          f"{found['real_tokens_per_s']:8.0f} real tokens/s, "
                          f"padding {found['padding_share']:.0%}, {found['seconds_per_step']:.3f} s/step",
                          file=sys.stderr)
        results = {}
        for dataset in datasets:
            paths = {f"{f} {layout}": summarise(runs[dataset.name, f, layout]) for f, layout in PATHS}
            rate = {path: found["real_tokens_per_s"] for path, found in paths.items()}
            results[dataset.name] = {
                **{k: v for k, v in asdict(dataset).items() if k != "path"}, "paths": paths,
                "packed_vs_padded": {f: round(rate[f"{f} packed"] / rate[f"{f} padded"], 2)
                                     for f in ("moe_tune", "trl")},
                "moe_tune_vs_trl": {layout: round(rate[f"moe_tune {layout}"] / rate[f"trl {layout}"], 2)
                                    for layout in ("padded", "packed")}}
        cuda = torch.cuda.is_available()
        return {"cpu": torch.cuda.get_device_name() if cuda else cpu_model(),
                "device": "cuda" if cuda else "cpu", "torch_threads": torch.get_num_threads(),
                "load_average_before": round(load, 2), "commit": commit(),
                "model": BENCHMARK_MODEL if args.model == "benchmark" else shown(SHIPPED_MODEL),
                "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                "baseline_precision": args.baseline_precision, "datasets": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarise(found: list[dict]) -> dict:
    """The median over repeats of each measure; the settings as the runs had them."""
    out = {k: statistics.median(r[k] for r in found) for k in found[0] if k not in ("batch", "bf16")}
    rounding = {"padding_share": 3, "seconds_per_step": 4}
    return {**{k: round(v, rounding.get(k, 1)) for k, v in out.items()}, "batch": found[0]["batch"],
            "bf16": found[0]["bf16"], "repeats": [round(r["real_tokens_per_s"]) for r in found]}


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def commit() -> str:
    """HEAD's short hash, marked where tracked files differ from it."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no")
    return head + (" (with uncommitted changes)" if changed else "")


def cpu_tag() -> str:
    """The CPU kind in result file names, as benchmarks/results/ names them: cpu-amx-family6-model207."""
    flags, info = set(), {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    kind = "amx" if "amx_tile" in flags else "avx512bf16" if "avx512_bf16" in flags else \
        "avx2" if "avx2" in flags else None
    known = {"cpu family", "model"} <= set(info)
    numbers = f"family{info['cpu family']}-model{info['model']}" if known else None
    parts = ["cpu", "amd" if info.get("vendor_id") == "AuthenticAMD" else None, kind, numbers]
    return "-".join(p for p in parts if p)


def markdown(result: dict, command: str) -> str:
    lines = ["# Packing against padding: real tokens per second, moe_tune and TRL", "",
             f"- CPU: {result['cpu']} (lscpu's model name; {result['device']}, "
             f"torch threads: {result['torch_threads']}); load average {result['load_average_before']} "
             "when the run started",
             f"- Command: `{command}`", f"- Commit: {result['commit']}",
             f"- Model: {result['model']}; {result['warmup']} warm-up + {result['steps']} timed steps, "
             f"the median over repeats ({result['repeats']}); TRL's precision: "
             + ("its default" if result["baseline_precision"] == "trl" else "moe_tune's (fp32)"),
             f"- Wall time: {result['wall_s']} s",
             "- real tokens: the rows' tokens, padding excluded; padding share: padding / all positions; "
             "s/step: one step's end to the next's", ""]
    cols = ("batch", "rows_per_step", "real_tokens_per_step", "positions_per_step", "padding_share",
            "seconds_per_step", "real_tokens_per_s", "bf16", "repeats")
    for name, found in result["datasets"].items():
        rows = found["row_tokens"]
        lines += [f"## {name}: {found['source']}, {found['rows']} rows of median {rows['median']:g}, "
                  f"p95 {rows['p95']:g}, max {rows['max']} tokens; max_length {found['max_length']}", "",
                  f"Planned real tokens per step: padded {found['planned_real_tokens']['padded']} "
                  f"({found['padded_batch']} rows), packed {found['planned_real_tokens']['packed']} "
                  f"({found['packed_batch']} sequences of up to {found['max_length']} tokens).", "",
                  "| path | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {path} | " + " | ".join(str(row[c]) for c in cols) + " |"
                  for path, row in found["paths"].items()]
        ratio, versus = found["packed_vs_padded"], found["moe_tune_vs_trl"]
        lines += ["", f"Real tokens/s, packed over padded: moe_tune {ratio['moe_tune']}x, "
                  f"TRL {ratio['trl']}x; moe_tune over TRL: padded {versus['padded']}x, "
                  f"packed {versus['packed']}x.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=list(DATASETS),
                        help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--model", choices=("shipped", "benchmark"), default="shipped",
                        help="data/tiny-moe, or benchmarks/throughput.py's hidden-512 MoE (random weights)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows per padded step (default: the quickstart's per_device_train_batch_size)")
    parser.add_argument("--baseline-precision", choices=("trl", "moe_tune"), default="trl",
                        help="TRL's precision: its SFTConfig default (bf16 autocast), or the quickstart's")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown table (default: benchmarks/results/packing-<cpu>.md, if not there)")
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trl-bf16", type=int, choices=(0, 1), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        framework, layout = args.worker
        trl_bf16 = None if args.trl_bf16 is None else bool(args.trl_bf16)
        print(json.dumps(worker(framework, layout, args.model_path, args.data, args.max_length, args.batch,
                                args.steps, args.warmup, args.work, trl_bf16)))
        return
    if set(args.datasets) - set(DATASETS):
        unknown = sorted(set(args.datasets) - set(DATASETS))[0]
        parser.error(f"--datasets: {unknown} is none of {', '.join(DATASETS)}")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps and --repeats take at least 1, --warmup at least 0")
    if args.batch is None:
        from moe_tune.recipe import load_recipe  # noqa: PLC0415

        args.batch = load_recipe(RECIPE).sft["per_device_train_batch_size"]
    out = args.out
    if out is None:
        import torch  # noqa: PLC0415

        name = "cuda" if torch.cuda.is_available() else cpu_tag()
        name += "-benchmark-model" if args.model == "benchmark" else ""
        out = ROOT / "benchmarks" / "results" / f"packing-{name}.md"
        if out.exists():  # checked before the run, not after it
            parser.error(f"{shown(out)} exists; pass --out to write there (or elsewhere)")
    started = time.time()
    result = compare(args)
    result["wall_s"] = round(time.time() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result, "python benchmarks/packing.py " + " ".join(sys.argv[1:])))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
