"""The ``moe-tune`` command. User mistakes (MoeTuneError) become one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import warnings
import sys
from pathlib import Path

from moe_tune.errors import MoeTuneError


def cmd_train(args) -> None:
    from moe_tune.recipe import load_recipe  # noqa: PLC0415  (heavy imports only once the recipe is valid)

    from moe_tune.run_dir import RECIPE_FILE  # noqa: PLC0415

    target = Path(args.recipe)
    if target.is_dir():  # a run folder: its own recipe.yaml, to resume
        if not (target / RECIPE_FILE).is_file():
            raise MoeTuneError(f"{target}: a folder without {RECIPE_FILE}; give a recipe file or a moe-tune run folder")
        if not args.resume:
            raise MoeTuneError(f"{target}: a run folder; add --resume to continue it, or give a recipe file")
        target = target / RECIPE_FILE
    recipe = load_recipe(target, args.overrides)
    if args.resume and args.overwrite:
        raise MoeTuneError("--resume and --overwrite: choose one (continue the run, or start it again)")
    from moe_tune.train import run_training  # noqa: PLC0415

    run_training(recipe, overwrite=args.overwrite, resume=args.resume)


def cmd_compare(args) -> None:
    from moe_tune.compare import load_spec, run_comparison  # noqa: PLC0415

    run_comparison(load_spec(args.spec, args.overrides))


def cmd_plan(args) -> None:
    import json  # noqa: PLC0415

    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    recipe = load_recipe(args.recipe, args.overrides)
    from moe_tune.train import plan_run  # noqa: PLC0415
    from moe_tune.trainable import format_plan  # noqa: PLC0415

    report = plan_run(recipe).report
    print(json.dumps(report, indent=2) if args.json else format_plan(report))


def cmd_select_experts(args) -> None:
    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    recipe = load_recipe(args.recipe, args.overrides)
    from moe_tune.arch import describe  # noqa: PLC0415
    from moe_tune.expert_selection import save_selection, select_experts  # noqa: PLC0415
    from moe_tune.loading import load_model  # noqa: PLC0415
    from moe_tune.recipe import ExpertSelectionSection  # noqa: PLC0415

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MoeTuneError(f"{out}: already exists; pass --overwrite or --out another file")
    cfg = recipe.trainable.selection() or ExpertSelectionSection()
    recipe.trainable.expert_selection = cfg.model_copy(update={"file": None})
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype)
    arch = describe(model)
    shares, selection = select_experts(recipe, model, arch, tokenizer)
    for block, experts in selection.items():
        top = ", ".join(f"{e}:{shares[block][e]:.2f}" for e in experts)
        print(f"{block}: {len(experts)}/{len(shares[block])} experts  {top}")
    save_selection(out, cfg.score, cfg.top_p, shares, selection)
    print(f"written to {out}; use it with trainable.expert_selection.file={out}")


def eval_section(args):
    """The EvalSection of the command line: options not given keep the section's defaults."""
    from pydantic import ValidationError  # noqa: PLC0415

    from moe_tune.recipe import EvalSection  # noqa: PLC0415

    given = {"max_rows": args.max_rows, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    try:
        return EvalSection(files=args.data, retention_file=args.retention,
                           **{key: value for key, value in given.items() if value is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise MoeTuneError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err['input']!r})") from None


def cmd_eval(args) -> None:
    from moe_tune.data import read_chat_rows  # noqa: PLC0415
    from moe_tune.loading import load_model  # noqa: PLC0415
    from moe_tune.recipe import ModelSection  # noqa: PLC0415
    from moe_tune.report import evaluate_and_report  # noqa: PLC0415
    from moe_tune.run_dir import EVAL_DIR, RECIPE_FILE, load_run_model  # noqa: PLC0415

    cfg = eval_section(args)
    dtype = args.dtype or ModelSection.model_fields["dtype"].default
    target = Path(args.model)
    is_run = (target / RECIPE_FILE).is_file()
    for path in args.data:  # bad data is reported before any model loads
        read_chat_rows(path, args.max_rows)
    if args.retention and not Path(args.retention).is_file():
        raise MoeTuneError(f"{args.retention}: --retention file not found")
    if args.adapter and is_run:
        raise MoeTuneError(f"{target}: a run folder already knows its adapter; drop --adapter")
    model, tokenizer, base_path = load_run_model(target, dtype, args.adapter)
    base = load_model(base_path, dtype)[0] if base_path and not args.no_base else None
    default_out = target / EVAL_DIR if is_run else Path(EVAL_DIR) / (Path(args.adapter).name if args.adapter else target.name)
    label = "tuned" if base_path else target.name
    out = Path(args.out) if args.out else default_out
    evaluate_and_report(model, tokenizer, cfg, out, base=base, label=label)
    print(f"written to {out}")


def cmd_export(args) -> None:
    from moe_tune.data import read_chat_rows  # noqa: PLC0415
    from moe_tune.export import merge_and_check, write_checkpoint  # noqa: PLC0415
    from moe_tune.recipe import load_recipe  # noqa: PLC0415
    from moe_tune.run_dir import RECIPE_FILE, load_run_model  # noqa: PLC0415

    run = Path(args.run)
    if not (run / RECIPE_FILE).is_file():
        raise MoeTuneError(f"{run}: not a moe-tune run folder (no {RECIPE_FILE})")
    recipe = load_recipe(run / RECIPE_FILE)
    sample = (recipe.eval.files or [recipe.data.valid or recipe.data.train])[0]
    rows = read_chat_rows(sample, args.check_rows)
    model, tokenizer, _ = load_run_model(run, recipe.model.dtype)
    merged = merge_and_check(model, tokenizer, rows)
    out = write_checkpoint(merged, tokenizer, Path(args.merged), args.overwrite)
    print(f"merged and checked on {len(rows)} rows of {sample}: same logits and routing; written to {out}")


def cmd_inspect(args) -> None:
    import json  # noqa: PLC0415

    from moe_tune.accounting import format_summary, summary  # noqa: PLC0415
    from moe_tune.arch import describe, require_moe  # noqa: PLC0415
    from moe_tune.loading import build_meta_model, load_config  # noqa: PLC0415

    source = args.model
    if Path(source).suffix in (".yaml", ".yml") and Path(source).is_file():
        from moe_tune.recipe import load_recipe  # noqa: PLC0415

        source = load_recipe(source).model.path
    config = load_config(source)
    require_moe(config, source)
    model = build_meta_model(config)
    result = summary(model, describe(model), args.dtype)
    print(json.dumps(result, indent=2) if args.json else format_summary(result))


def _one_of(module: str, name: str):
    """An argparse type accepting the keys of ``module.name``, imported only when the option is
    given (the package's modules load torch; ``moe-tune --help`` stays quick)."""
    def check(value: str) -> str:
        choices = getattr(importlib.import_module(module), name)
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: '{value}' (choose from {', '.join(choices)})")
        return value
    check.__name__ = name
    return check


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error (``--help`` has the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe-tune", description="Instruction-tune pretrained MoE models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model as a recipe says")
    train.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml, or a run folder with --resume")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.max_steps=3 output_dir=/tmp/x")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    train.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in output_dir from its last complete checkpoint")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out scores and routing analytics of a run, a model, or a model + adapter")
    ev.add_argument("model", help="a run folder (from moe-tune train), a model folder, or the base of --adapter")
    ev.add_argument("--data", action="append", required=True,
                    help="held-out data (chat, Alpaca, ShareGPT, prompt/completion, ...); repeat for several")
    ev.add_argument("--adapter", help="a PEFT adapter folder to apply to MODEL (compared with MODEL alone)")
    ev.add_argument("--retention", help="plain text, one passage per line: loss on it shows forgetting")
    ev.add_argument("--no-base", action="store_true", help="do not evaluate the base model side by side")
    ev.add_argument("--out", help="folder for results, report and plots (default: RUN/eval or eval/NAME)")
    # defaults (None here) are the recipe's: EvalSection's and ModelSection.dtype's
    ev.add_argument("--batch-size", type=int, help="prompts generated per batch (default: as in a recipe)")
    ev.add_argument("--max-new-tokens", type=int, help="greedy generation length (default: as in a recipe)")
    ev.add_argument("--max-rows", type=int, help="evaluate only the first N rows of each file")
    ev.add_argument("--dtype", type=_one_of("moe_tune.loading", "DTYPES"),
                    help="dtype the weights are loaded in (default: as in a recipe)")
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser("compare", help="variants of a recipe over seeds, side by side (resumable)")
    cmp.add_argument("spec", help="comparison spec YAML, e.g. recipes/compare/freezing.yaml")
    cmp.add_argument("overrides", nargs="*", help="dotted recipe overrides for every run, e.g. sft.max_steps=50")
    cmp.set_defaults(func=cmd_compare)

    plan = sub.add_parser("plan", help="what a recipe will train, its LoRA coverage and memory, without training")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    sel = sub.add_parser("select-experts", help="score experts on the recipe's training data (ESFT)")
    sel.add_argument("recipe")
    sel.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainable.expert_selection.top_p=0.3")
    sel.add_argument("--out", default="expert_selection.json", help="where to write the selection JSON")
    sel.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sel.set_defaults(func=cmd_select_experts)

    exp = sub.add_parser("export", help="merge a run's LoRA into a standard checkpoint, after checking it")
    exp.add_argument("run", help="a run folder from moe-tune train")
    exp.add_argument("--merged", required=True, help="folder for the merged checkpoint")
    exp.add_argument("--check-rows", type=int, default=8, help="sample rows for the logits/routing check")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --merged")
    exp.set_defaults(func=cmd_export)

    ins = sub.add_parser("inspect", help="experts, parameters per part, active parameters, memory estimates")
    ins.add_argument("model", help="a checkpoint or config folder, a recipe, or a hub id (online only)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--dtype", default="bfloat16", type=_one_of("moe_tune.accounting", "DTYPE_BYTES"),
                     help="weight dtype assumed by the memory estimates")
    ins.set_defaults(func=cmd_inspect)
    return parser


def quiet_libraries() -> None:
    """Library chatter that would bury our one-line errors.

    bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional hub-downloaded
    kernel is missing; it falls back to its own code, and we never download, so say nothing."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Offline, huggingface_hub logs each of its retries; our error line says what happened.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # Deprecation notices between the libraries we drive (PEFT calling a renamed transformers
    # method) are for their developers, not for someone running a recipe.
    for module in ("transformers", "peft", "trl"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    # overrides may come after options too: `train r.yaml --overwrite sft.max_steps=3`
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    if extra:
        args.overrides += extra
    try:
        args.func(args)
    except MoeTuneError as e:
        if args.debug:
            raise
        print(f"moe-tune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-tune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
