"""``moe-tune compare SPEC.yaml``: variants of one recipe, over seeds, side by side.

A spec names a base recipe, overrides shared by every run, named variants (each a set of
recipe overrides) and seeds. Every variant x seed runs as its own ``moe-tune train`` process
(its peak memory is that process's), one after another, into OUTPUT_DIR/VARIANT/seed-N; a run
that already finished is skipped, so an interrupted comparison resumes where it stopped.
Results are aggregated as mean and standard deviation over seeds.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator

from moe_tune.data.rows import read_chat_rows
from moe_tune.errors import MoeTuneError
from moe_tune.export.prune import PRUNING_FILE, SCORES
from moe_tune.model.loading import load_config
from moe_tune.plan.report import read_plan_json
from moe_tune.recipe import Section, explain_error, load_recipe, read_yaml, with_absolute_paths
from moe_tune.training.run_dir import (
    COMPARE_FILE,
    EVAL_DIR,
    METRICS_FILE,
    PLAN_FILE,
    REPORT_JSON,
    first_difference,
    load_run_recipe,
    write_json,
)


class PruneGrid(Section):
    """Each trained run pruned several ways (``moe-tune prune``), scored beside the runs."""

    keep: list[float] = Field(min_length=1)
    """Fractions of each layer's experts to keep (1.0 is the trained run itself)."""
    by: list[Literal[tuple(SCORES)]] = Field(min_length=1)
    """Expert scores to prune by: frequency, gate, reap."""
    rows: int = Field(default=512, gt=0)
    """Training rows the experts are scored on."""

    @field_validator("keep")
    @classmethod
    def _fractions(cls, keep: list[float]) -> list[float]:
        if any(not 0 < k <= 1 for k in keep):
            raise ValueError("keep: fractions in (0, 1]")
        return keep


class CompareSpec(Section):
    _cli: list[str] = PrivateAttr(default_factory=list)  # command-line overrides, for every run

    base: str
    """The recipe every run starts from."""
    output_dir: str
    """Where the runs and the comparison go: OUTPUT_DIR/VARIANT/seed-N, comparison.md/.csv."""
    seeds: list[int] = Field(min_length=1)
    """Each variant runs once per seed."""
    overrides: dict[str, Any] = {}
    """Dotted recipe overrides for every run (e.g. sft.max_steps: 300)."""
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    """Name -> dotted recipe overrides, e.g. freeze_router: {trainable.preset: freeze_router}."""
    group: str | None = None
    """Score the held-out rows of this ``group`` only (e.g. new_phrasing); unset: the whole file."""
    prune: PruneGrid | None = None
    """Prune every trained run each of these ways, as rows VARIANT-BY-KEEP of the table."""

    def pruned(self) -> list[tuple[str, float]]:
        """(score, fraction kept) of each pruning, the unpruned (1.0) left out: it is the run itself."""
        return [(by, keep) for by in self.prune.by for keep in self.prune.keep if keep < 1] if self.prune else []


def _as_overrides(values: dict[str, Any]) -> list[str]:
    """{"sft.max_steps": 3} -> ["sft.max_steps=3"]; JSON is valid YAML, so values keep their type."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def load_spec(path: str | Path, cli_overrides: list[str] | None = None) -> CompareSpec:
    """The spec; command-line ``key=value`` overrides apply to every run, after the spec's own."""
    path = Path(path)
    try:
        spec = CompareSpec.model_validate(read_yaml(path))
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise MoeTuneError(explain_error(errors[0], str(path), CompareSpec)) from None
    spec._cli = list(cli_overrides or [])
    return spec


def run_overrides(spec: CompareSpec, variant: str, seed: int) -> list[str]:
    run_dir = Path(spec.output_dir) / variant / f"seed-{seed}"
    return (_as_overrides(spec.overrides) + _as_overrides(spec.variants[variant]) + spec._cli
            + [f"output_dir={run_dir}", f"seed={seed}"])


def check_spec(spec: CompareSpec) -> None:
    """Every variant's recipe validates, and the scored group exists, before the first run starts."""
    for variant in spec.variants:
        try:
            recipe = load_recipe(spec.base, run_overrides(spec, variant, spec.seeds[0]))
            load_config(recipe.model.path)  # a model that is missing stops the comparison before it starts
        except MoeTuneError as e:
            raise MoeTuneError(f"variant '{variant}': {e}") from None
        if spec.group is not None:
            scored = recipe.eval.files[:1]  # the file the comparison scores
            if not scored or not any(r.get("group") == spec.group for r in read_chat_rows(scored[0])):
                raise MoeTuneError(f"group: no row of variant '{variant}''s first eval file "
                                   f"({scored[0] if scored else 'none'}) is in group '{spec.group}'")


def _run(command: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident memory in GB) of one ``moe-tune COMMAND ARGS --overwrite`` process."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "moe_tune.cli", command, *args, "--overwrite"])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise MoeTuneError(f"a run failed (exit {proc.returncode}): moe-tune {command} {' '.join(args)}")
    return time.time() - start, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def _last(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def measure(run_dir: Path, wall_s: float, peak_gb: float, group: str | None = None) -> dict:
    """One finished run's numbers, from its files; held-out scores of ``group``'s rows only."""
    metrics = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    # counted by the run itself, after any expert selection
    plan = read_plan_json(run_dir / PLAN_FILE)
    out = {"wall_s": wall_s, "peak_mem_gb": peak_gb, "trainable_params": plan["trainable_params"],
           "params": plan["total_params"],
           # the loss logged at the last step (MetricsLog logs it whatever sft.logging_steps), or
           # the run's mean when no step was logged
           "train_loss": _last(metrics, "loss") or _last(metrics, "train_loss"),
           "valid_loss": _last(metrics, "eval_loss")}
    out.update(heldout(run_dir / EVAL_DIR, "tuned", group))
    out["gap"] = out["heldout_loss"] - out["train_loss"] if out["train_loss"] is not None else None
    out["curve"] = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    out["eval_curve"] = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    return out


def measure_pruned(folder: Path, wall_s: float, peak_gb: float, group: str | None = None) -> dict:
    """One pruned model's numbers (``moe-tune prune``'s pruning.json and eval/), as ``measure``'s."""
    info = json.loads((folder / PRUNING_FILE).read_text())
    return {"wall_s": wall_s, "peak_mem_gb": peak_gb, "params": info["params_after"],
            "experts_kept": info["experts_kept"], **heldout(folder / EVAL_DIR, "pruned", group),
            "curve": [], "eval_curve": []}


def heldout(eval_dir: Path, label: str, group: str | None) -> dict:
    """``label``'s held-out scores, routing and retention from an evaluation's report.json."""
    report = json.loads((eval_dir / REPORT_JSON).read_text())
    data_file, entry = next(iter(report.items()))
    tuned = entry["results"][label]
    scored = tuned["per_group"][group] if group is not None else tuned["overall"]
    # which rows exact match and loss are: the first eval file, one group of it or all of it
    out = {"heldout_exact_match": scored["exact_match"], "heldout_loss": scored["loss"],
           "heldout_file": data_file, "heldout_group": group, "heldout_rows": scored["n"]}
    routing = entry["routing"].get(label, {}).get("mean_over_layers", {})
    out.update(routing_drift=routing.get("js_from_base"), imbalance_cv=routing.get("cv"))
    if "retention" in entry:
        out["retention_loss"] = entry["retention"][label]["loss"]
    return out


COLUMNS = ("heldout_exact_match", "heldout_loss", "train_loss", "gap", "retention_loss", "trainable_params",
           "params", "wall_s", "peak_mem_gb", "routing_drift", "imbalance_cv")


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """variant -> column -> (mean, std over seeds); std is 0 for a single seed."""
    table = {}
    for variant, measured in runs.items():
        row = {}
        for col in COLUMNS:
            values = [m[col] for m in measured if m.get(col) is not None]
            if values:
                row[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        table[variant] = row
    return table


def _shown(path: str) -> str:
    """A file under the working directory by its relative path (run recipes hold absolute ones)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def heldout_line(runs: dict[str, list[dict]]) -> str | None:
    """Which rows the held-out columns score, e.g. 'Held-out columns: data/heldout.jsonl, rows of
    group new_phrasing (360 rows)'; per variant where variants differ, None where no run says."""
    covered: dict[str, list[str]] = {}  # what was scored -> the variants that scored it
    for variant, measured in runs.items():
        for m in measured:
            if "heldout_file" not in m:  # measured before compare_run.json recorded it
                continue
            n, group = m["heldout_rows"], m["heldout_group"]
            rows = f"rows of group {group} ({n} rows)" if group is not None else f"all {n} rows"
            variants = covered.setdefault(f"{_shown(m['heldout_file'])}, {rows}", [])
            if variant not in variants:
                variants.append(variant)
    if not covered:
        return None
    if len(covered) == 1:
        return f"Held-out columns: {next(iter(covered))}."
    return "Held-out columns: " + "; ".join(f"{c} ({', '.join(v)})" for c, v in covered.items()) + "."


def write_outputs(out: Path, table: dict, runs: dict[str, list[dict]], reused: int = 0) -> None:
    """comparison.csv, comparison.md and the plots; ``reused``: runs finished before and not run again."""
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seeds"] + [f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")])
        for variant, row in table.items():
            writer.writerow([variant, len(runs[variant])]
                            + [v for c in COLUMNS for v in row.get(c, ("", ""))])
    fmt = {"heldout_exact_match": "{:.1%}", "trainable_params": "{:,.0f}", "params": "{:,.0f}", "wall_s": "{:.0f}"}
    seeds = max(len(measured) for measured in runs.values())  # every variant runs every seed
    lines = [line for line in [heldout_line(runs)] if line]
    lines += [f"Mean ± standard deviation over {seeds} seeds." if seeds > 1 else "One seed per variant."]
    trained = sum(len(measured) for measured in runs.values() if "experts_kept" not in measured[0])
    if reused:
        lines += [f"{reused} of {trained} training runs had finished before and were reused (--overwrite runs "
                  "them again)."]
    if any("routing_drift" not in row for row in table.values()):
        lines += ["routing_drift is `-` where the runs evaluated no base model to compare routing with "
                  "(eval.compare_base: false in their recipe); set it to true to measure drift."]
    lines += ["", "| variant | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for variant, row in table.items():
        cells = []
        for col in COLUMNS:
            if col not in row:
                cells.append("-")
                continue
            mean, std = row[col]
            f = fmt.get(col, "{:.3f}")
            # a spread only where there are several seeds: one seed's std of 0 says nothing
            cells.append(f.format(mean) + (f" ± {f.format(std)}" if seeds > 1 else ""))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    _plots(out, table, runs)


def _plots(out: Path, table: dict, runs: dict[str, list[dict]]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.ticker import PercentFormatter  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for variant, row in table.items():
        if "trainable_params" in row and "heldout_exact_match" in row:
            (x, _), (y, err) = row["trainable_params"], row["heldout_exact_match"]
            # in percent, as comparison.md shows it
            ax.errorbar(max(x, 1), 100 * y, yerr=100 * err, fmt="o", capsize=3, label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_ylabel("held-out exact match")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_vs_trainable.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.5), layout="constrained")  # makes room for legends outside
    # validation is logged every sft.eval_steps: its points are marked, as one may be all there is
    styles = {"curve": ("-", "", "train"), "eval_curve": ("--", ".", "validation")}
    variants, drawn = [], set()  # legend: a colour per variant, then a line style per curve kind
    for i, (variant, measured) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for key, (style, marker, _) in styles.items():
            if measured[0][key]:  # the first seed's curves
                ax.plot(*zip(*measured[0][key]), color=color, linestyle=style, marker=marker)
                drawn.add(key)
        if any(measured[0][key] for key in styles):
            variants.append(Line2D([], [], color=color, label=variant))
    kinds = [Line2D([], [], color="0.3", linestyle=style, marker=marker, label=label)
             for key, (style, marker, label) in styles.items() if key in drawn]
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    several = max(len(measured) for measured in runs.values()) > 1
    ax.set_title("loss per step" + (" (first seed of each variant)" if several else ""), fontsize=9)
    if variants:  # two legends right of the plot: colours at the top, line styles at the bottom
        fig.legend(handles=variants, title="variant", fontsize=7, title_fontsize=7, loc="outside right upper")
        fig.legend(handles=kinds, title="loss on", fontsize=7, title_fontsize=7, loc="outside right lower")
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    if any("experts_kept" in measured[0] for measured in runs.values()):
        _pruning_plot(out, table, runs)

    drift = {v: row["routing_drift"] for v, row in table.items() if "routing_drift" in row}
    if drift:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.bar(list(drift), [m for m, _ in drift.values()], yerr=[s for _, s in drift.values()], capsize=3)
        ax.set_ylabel("routing drift (JS of expert load)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / "routing_drift.png", dpi=110)
        plt.close(fig)


def _pruning_plot(out: Path, table: dict, runs: dict[str, list[dict]]) -> None:
    """Held-out exact match and retention loss against the parameters kept, one line per trained
    variant and score (``VARIANT-BY-KEEP`` rows), from the unpruned run leftwards."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    trained = [name for name, measured in runs.items() if "experts_kept" not in measured[0]]
    for variant in trained:
        scores = sorted({name[len(variant) + 1:].rsplit("-", 1)[0] for name in runs
                         if name.startswith(f"{variant}-") and "experts_kept" in runs[name][0]})
        for by in scores:
            names = [variant] + [n for n in runs if n.startswith(f"{variant}-{by}-")]
            points = sorted((table[n]["params"][0], table[n]) for n in names if "params" in table[n])
            for ax, col, scale in ((axes[0], "heldout_exact_match", 100), (axes[1], "retention_loss", 1)):
                kept = [(x, row[col]) for x, row in points if col in row]
                if kept:
                    ax.errorbar([x for x, _ in kept], [scale * m for _, (m, _) in kept],
                                yerr=[scale * sd for _, (_, sd) in kept], marker="o", capsize=3,
                                label=f"{variant}, {by}" if len(trained) > 1 else by)
    axes[0].set_ylabel("held-out exact match (%)")
    axes[1].set_ylabel("retention loss (lower is better)")
    for ax in axes:
        ax.set_xlabel("parameters")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_vs_params.png", dpi=110)
    plt.close(fig)


def check_reuse(spec: CompareSpec) -> None:
    """A run finished before is reused only when it was run with the recipe the spec now asks
    for (keys that change only what is logged or kept aside); otherwise stop before any run."""
    for variant in spec.variants:
        for seed in spec.seeds:
            run_dir = Path(spec.output_dir) / variant / f"seed-{seed}"
            if not (run_dir / COMPARE_FILE).is_file():
                continue
            wanted = with_absolute_paths(load_recipe(spec.base, run_overrides(spec, variant, seed)))
            changed = first_difference(wanted, with_absolute_paths(load_run_recipe(run_dir)))
            if changed:
                key, now, then = changed
                raise MoeTuneError(f"variant '{variant}' seed {seed}: {key} is {now!r} now but was {then!r} in the "
                                   f"finished run {run_dir}; pass --overwrite to run every variant again, or set "
                                   "output_dir to a new folder")


def prune_run(spec: CompareSpec, run_dir: Path, by: str, keep: float, folder: Path, overwrite: bool) -> dict:
    """A trained run pruned (``moe-tune prune``, scored on the run's training rows) and measured;
    one pruned before from the same trained run, the same way, is reused."""
    done = folder / COMPARE_FILE
    trained_at = (run_dir / COMPARE_FILE).stat().st_mtime
    if done.is_file() and not overwrite and done.stat().st_mtime > trained_at:
        info = json.loads((folder / PRUNING_FILE).read_text())
        if (info["by"], float(info["keep"]), info["rows"]) == (by, keep, spec.prune.rows):
            print(f"{folder}: pruned before, reused")
            return json.loads(done.read_text())
    print(f"{run_dir}: pruning by {by} to {keep:g} of the experts")
    data = load_run_recipe(run_dir).data.train
    wall, peak = _run("prune", [str(run_dir), "--keep", f"{keep:g}", "--by", by, "--data", data,
                                "--rows", str(spec.prune.rows), "--out", str(folder), "--no-base"])
    measured = measure_pruned(folder, wall, peak, spec.group)
    write_json(done, measured)
    return measured


def run_comparison(spec: CompareSpec, overwrite: bool = False) -> Path:
    """Every variant x seed, skipping runs that finished with the same recipe (all of them
    run again with ``overwrite``)."""
    check_spec(spec)
    if not overwrite:
        check_reuse(spec)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    reused = 0
    for variant in spec.variants:
        for seed in spec.seeds:
            run_dir = out / variant / f"seed-{seed}"
            done = run_dir / COMPARE_FILE
            if done.is_file() and not overwrite:
                print(f"{variant} seed {seed}: finished before, reused")
                runs.setdefault(variant, []).append(json.loads(done.read_text()))
                reused += 1
                continue
            print(f"{variant} seed {seed}: training")
            wall, peak = _run("train", [spec.base, *run_overrides(spec, variant, seed)])
            measured = measure(run_dir, wall, peak, spec.group)
            write_json(done, measured)
            runs.setdefault(variant, []).append(measured)
    for variant in spec.variants:
        for seed in spec.seeds:
            for by, keep in spec.pruned():
                name = f"{variant}-{by}-{keep:g}"
                runs.setdefault(name, []).append(prune_run(spec, out / variant / f"seed-{seed}", by, keep,
                                                           out / name / f"seed-{seed}", overwrite))
    write_outputs(out, aggregate(runs), runs, reused)
    print((out / "comparison.md").read_text())
    return out
