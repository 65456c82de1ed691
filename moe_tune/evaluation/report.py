"""The evaluation report of a run: report.json, report.md and PNG plots in RUN/eval/."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moe_tune.data.rows import read_chat_rows, spread  # noqa: E402
from moe_tune.errors import MoeTuneError  # noqa: E402
from moe_tune.evaluation import routing_stats  # noqa: E402
from moe_tune.evaluation.heldout import evaluate, format_table, on_accelerator, save_results, text_loss  # noqa: E402
from moe_tune.model.arch import MoeArch, describe  # noqa: E402
from moe_tune.moe import routing  # noqa: E402
from moe_tune.plan.modes import unwrapped  # noqa: E402
from moe_tune.training.run_dir import REPORT_JSON, REPORT_MD, RETENTION_FILE, write_json, write_text  # noqa: E402


def _short(block: str) -> str:
    """'model.layers.3.mlp' -> 'L3'."""
    parts = block.split(".")
    index = next((p for p in parts if p.isdigit()), block)
    return f"L{index}"


def plot_expert_load(routing: dict[str, dict], path: Path) -> None:
    """Heatmap, layers x experts, one panel per model (base, tuned)."""
    fig, axes = plt.subplots(1, len(routing), figsize=(4.5 * len(routing), 3.2), squeeze=False)
    loads = {label: np.array([s["layers"][b]["load"] for b in s["layers"]]) for label, s in routing.items()}
    vmax = max(load.max() for load in loads.values())  # one colour scale, so panels compare
    for ax, (label, summary) in zip(axes[0], routing.items()):
        layers = list(summary["layers"])
        load = loads[label]
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{label}: share of top-k slots")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [_short(b) for b in layers])
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_drift(summary: dict, path: Path) -> None:
    layers = list(summary["layers"])
    x = np.arange(len(layers))
    js = [summary["layers"][b]["js_from_base"] for b in layers]
    changed = [summary["layers"][b]["top1_changed"] for b in layers]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(x - 0.2, js, 0.4, label="JS divergence of expert load (nats)")
    ax.bar(x + 0.2, changed, 0.4, label="share of tokens whose top-1 expert changed")
    ax.set_xticks(x, [_short(b) for b in layers])
    ax.set_title("routing drift from the base model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_task_usage(summary: dict, path: Path) -> None:
    """Heatmap, tasks x (layer, expert)."""
    tasks = list(summary["task_load"])
    if not tasks:
        return
    layers = list(summary["layers"])
    usage = np.array([np.concatenate([summary["task_load"][t][b] for b in layers]) for t in tasks])
    n_experts = len(summary["layers"][layers[0]]["load"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.22 * usage.shape[1], 0.9 + 0.28 * len(tasks)))
    im = ax.imshow(usage, aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_xticks([i * n_experts + n_experts / 2 - 0.5 for i in range(len(layers))], [_short(b) for b in layers])
    for i in range(1, len(layers)):
        ax.axvline(i * n_experts - 0.5, color="white", lw=0.8)
    ax.set_title("expert usage per task (experts of each layer)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metrics(results: dict[str, dict], path: Path) -> None:
    """Exact match per group (or overall), base next to tuned."""
    first = next(iter(results.values()))
    groups = list(first.get("per_group", {})) or ["all"]
    x = np.arange(len(groups))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(groups), 3.2))
    for i, (label, r) in enumerate(results.items()):
        values = [r["per_group"][g]["exact_match"] if "per_group" in r else r["overall"]["exact_match"]
                  for g in groups]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact match")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(eval_dir: Path, per_file: dict[str, dict]) -> Path:
    """``per_file``: data file -> {"results": {label: metrics}, "routing": {label: summary}}."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Evaluation report", ""]
    for data_file, entry in per_file.items():
        stem = Path(data_file).stem
        routing = entry["routing"]
        plots = {"expert_load": f"{stem}_expert_load.png", "metrics": f"{stem}_metrics.png"}
        plot_expert_load(routing, eval_dir / plots["expert_load"])
        plot_metrics(entry["results"], eval_dir / plots["metrics"])
        tuned = routing.get("tuned") or next(iter(routing.values()))
        if "js_from_base" in tuned["mean_over_layers"]:
            plots["drift"] = f"{stem}_drift.png"
            plot_drift(tuned, eval_dir / plots["drift"])
        if tuned["task_load"]:
            plots["task_usage"] = f"{stem}_task_usage.png"
            plot_task_usage(tuned, eval_dir / plots["task_usage"])
        entry["plots"] = plots
        lines += [f"## {data_file}", "", format_table(entry["results"]), "", "### Routing", "",
                  "| model | CV of load | max/mean | entropy | JS from base | top-1 changed |",
                  "|---|---|---|---|---|---|"]
        for label, summary in routing.items():
            m = summary["mean_over_layers"]
            js = f"{m['js_from_base']:.4f}" if "js_from_base" in m else "-"
            changed = f"{m['top1_changed']:.1%}" if "top1_changed" in m else "-"
            lines.append(f"| {label} | {m['cv']:.3f} | {m['max_over_mean']:.2f} | {m['entropy']:.3f} | "
                         f"{js} | {changed} |")
        if "retention" in entry:
            lines += ["", "Retention, loss on pretraining-domain text (lower is better): "
                      + ", ".join(f"{k} {v['loss']:.3f}" for k, v in entry["retention"].items())]
        lines += [""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    write_json(eval_dir / REPORT_JSON, per_file)
    write_text(eval_dir / REPORT_MD, "\n".join(lines))
    return eval_dir / REPORT_MD


def routing_archs(models: dict[str, object], known: dict[str, MoeArch | None]) -> dict[str, MoeArch | None]:
    """Per model, the architecture its routers are read with: the one the caller knows, or
    found here once; None where the routers carry LoRA (wrapped, so not readable)."""
    archs = {}
    for label, model in models.items():
        inner = unwrapped(model)
        arch = known.get(label)
        if arch is None:
            try:
                arch = describe(inner)
            except MoeTuneError:
                arch = None
        archs[label] = arch if arch is not None and routing.readable(inner, arch) else None
    return archs


def routing_summaries(rows: list[dict], tokenizer, models: dict[str, object], archs: dict[str, MoeArch | None],
                      base_label: str | None, expert_ids: dict[str, tuple[int, dict[str, list[int]]]] | None = None
                      ) -> dict:
    """Routing analytics per model on ``rows``, with drift from ``base_label``'s model; a model
    whose routers cannot be read is left out with a note. ``expert_ids``: for a pruned model,
    the expert count of the model it was pruned from and, per layer, the ids its experts had
    there (its statistics are told in those ids, so that drift compares the same experts)."""
    profiles = {}
    for label, model in models.items():
        if archs[label] is None:
            print(f"note: routing analytics of '{label}' skipped: its routers carry LoRA "
                  "(merge them with moe-tune export first)")
            continue
        profiles[label] = routing_stats.profile(unwrapped(model), archs[label], tokenizer, rows)
        if expert_ids and label in expert_ids:
            profiles[label] = routing_stats.in_original_ids(profiles[label], *expert_ids[label])
    base = profiles.get(base_label) if base_label else None
    return {label: routing_stats.summarize(p, None if label == base_label else base) for label, p in profiles.items()}


def evaluate_files(tuned, tokenizer, cfg, out_dir: Path, base=None, label: str = "tuned",
                   arch: MoeArch | None = None, expert_ids: dict[str, tuple[int, dict[str, list[int]]]] | None = None
                   ) -> dict[str, dict]:
    """Score ``tuned`` (and ``base`` on the same prompts) on every ``cfg.files`` file and on
    ``cfg.retention_file`` and analyse routing; write each file's results and the report's data
    (report.json, without plots) to ``out_dir``. ``cfg`` is an EvalSection (files, max_rows,
    batch_size, max_new_tokens, retention_file); ``arch``, ``tuned``'s architecture where the
    caller has it already; ``expert_ids``, see ``routing_summaries``. Returns the report's data:
    data file -> results, routing, retention."""
    models = {"base": base, label: tuned} if base is not None else {label: tuned}
    models = {name: on_accelerator(m) for name, m in models.items()}
    archs = routing_archs(models, {label: arch})
    report = {}
    for path in cfg.files:
        rows = read_chat_rows(path)
        rows = spread(rows, cfg.max_rows) if cfg.max_rows else rows  # held-out files are grouped by task
        results = {name: evaluate(m, tokenizer, rows, cfg.batch_size, cfg.max_new_tokens) for name, m in models.items()}
        save_results(out_dir / f"{Path(path).stem}.json", path, results)
        print(f"\nHeld-out evaluation of {path}:\n{format_table(results)}")
        routing = routing_summaries(rows, tokenizer, models, archs, "base" if base is not None else None, expert_ids)
        if routing:
            report[path] = {"results": results, "routing": routing}
    if cfg.retention_file:
        texts = [t for t in Path(cfg.retention_file).read_text(encoding="utf-8").splitlines() if t.strip()]
        retention = {name: text_loss(m, tokenizer, texts) for name, m in models.items()}
        write_json(out_dir / RETENTION_FILE, {"file": cfg.retention_file, "results": retention})
        print("retention, loss on pretraining-domain text: "
              + ", ".join(f"{k} {v['loss']:.3f}" for k, v in retention.items()))
        for entry in report.values():
            entry["retention"] = retention
    if report:  # its data now; report phase adds the plots
        write_json(out_dir / REPORT_JSON, report)
    return report


def evaluate_and_report(tuned, tokenizer, cfg, out_dir: Path, base=None, label: str = "tuned",
                        arch: MoeArch | None = None,
                        expert_ids: dict[str, tuple[int, dict[str, list[int]]]] | None = None) -> bool:
    """``evaluate_files``, then the report and its plots in ``out_dir``; False when no model's
    routing could be read, and so there is no report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = evaluate_files(tuned, tokenizer, cfg, out_dir, base, label, arch, expert_ids)
    if report:
        write_report(out_dir, report)
    return bool(report)
