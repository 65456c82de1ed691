"""The ``moe-tune`` command. User mistakes (MoeTuneError) become one line on stderr and exit 2.

Each command imports what it runs inside its own function, on purpose: torch, transformers and
TRL take seconds to import, and ``moe-tune --help``, ``moe-tune CMD --help`` and a recipe with a
typo must answer at once (tests/test_cli.py checks that --help imports no torch)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from pathlib import Path

from moe_tune.errors import Interrupted, MoeTuneError, shown
from moe_tune.export.gguf import GGUF_TYPES


def cmd_train(args) -> None:
    from moe_tune.recipe import load_recipe  # noqa: PLC0415
    from moe_tune.training.run_dir import RECIPE_FILE  # noqa: PLC0415

    target, overrides = Path(args.recipe), args.overrides
    if target.is_dir():  # a run folder: its own recipe.yaml, to resume, wherever the folder is now
        if not (target / RECIPE_FILE).is_file():
            raise MoeTuneError(f"{target}: a folder without {RECIPE_FILE}; give a recipe file or a moe-tune run folder")
        if not args.resume:
            raise MoeTuneError(f"{target}: a run folder; add --resume to continue it, or give a recipe file")
        target, overrides = target / RECIPE_FILE, [*overrides, f"output_dir={target.resolve()}"]
    recipe = load_recipe(target, overrides)
    if args.resume and args.overwrite:
        raise MoeTuneError("--resume and --overwrite: choose one (continue the run, or start it again)")
    from moe_tune.training.pipeline import run_training  # noqa: PLC0415

    run_training(recipe, overwrite=args.overwrite, resume=args.resume)


def cmd_compare(args) -> None:
    from moe_tune.evaluation.compare import load_spec, run_comparison  # noqa: PLC0415

    run_comparison(load_spec(args.spec, args.overrides), overwrite=args.overwrite)


def cmd_plan(args) -> None:
    import json  # noqa: PLC0415

    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    gpus = None
    if args.gpu_memory or args.gpus is not None or args.accelerate_config:  # checked before anything loads
        from moe_tune.plan.fit import fit_report, format_fit, target  # noqa: PLC0415

        gpus = target(args.gpu_memory, args.gpus, args.accelerate_config)
    recipe = load_recipe(args.recipe, args.overrides)
    from moe_tune.plan.report import first_training_row  # noqa: PLC0415
    from moe_tune.training.pipeline import plan_run  # noqa: PLC0415

    setup = plan_run(recipe, planning=True)
    report = setup.report
    if gpus is not None:
        report.per_device = fit_report(setup, gpus)
    report.first_row = first_training_row(recipe, setup.sft_args, setup.template)  # None: nothing to show
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        # the verdict (fits, or what to change) stays the last line
        print(report.format() + (f"\n{report.first_row}" if report.first_row else "")
              + (f"\n{format_fit(report.per_device)}" if gpus else ""))


def cmd_select_experts(args) -> None:
    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    recipe = load_recipe(args.recipe, args.overrides)
    from moe_tune.model.arch import describe  # noqa: PLC0415
    from moe_tune.model.loading import load_model  # noqa: PLC0415
    from moe_tune.model.templates import recipe_template  # noqa: PLC0415
    from moe_tune.moe.expert_selection import save_selection, scoring_rows, select_experts  # noqa: PLC0415
    from moe_tune.recipe import ExpertSelectionSection  # noqa: PLC0415

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MoeTuneError(f"{out}: already exists; pass --overwrite or --out another file")
    cfg = recipe.trainable.selection() or ExpertSelectionSection()
    recipe.trainable.expert_selection = cfg.model_copy(update={"file": None})  # always scores, even with a file set
    rows = scoring_rows(recipe)
    method = {"gate": "gate score (router probability, averaged over tokens)",
              "token": "token score (share of the top-k slots)"}[cfg.score]
    print(f"scoring experts by {method} on {len(rows)} rows of {recipe.data.train}; top_p {cfg.top_p}")
    print("each line: MoE block: kept/all experts, the kept experts' share of the block's routing "
          "(at least top_p), then id:share per kept expert")
    model, tokenizer = load_model(recipe.model.path, recipe.model.dtype, template=recipe_template(recipe.model))
    shares, selection = select_experts(recipe, model, describe(model), tokenizer, rows)
    for block, experts in selection.items():
        top = ", ".join(f"{e}:{shares[block][e]:.2f}" for e in experts)
        kept = sum(shares[block][e] for e in experts)
        print(f"{block}: {len(experts)}/{len(shares[block])} experts, {kept:.2f} of the routing  {top}")
    save_selection(out, cfg.score, cfg.top_p, shares, selection)
    print(f"written to {out}; use it with trainable.expert_selection.file={out}")


def eval_section(args, base=None):
    """The EvalSection of the command line: ``base`` (a run's own, or the defaults) with the
    options given on top."""
    from pydantic import ValidationError  # noqa: PLC0415

    from moe_tune.recipe import EvalSection  # noqa: PLC0415

    given = {"files": args.data, "retention_file": args.retention, "max_rows": args.max_rows,
             "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    start = base.model_dump() if base is not None else {}
    try:
        return EvalSection(**{**start, **{key: value for key, value in given.items() if value is not None}})
    except ValidationError as e:
        err = e.errors()[0]
        raise MoeTuneError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err['input']!r})") from None


def cmd_eval(args) -> None:
    from moe_tune.data.rows import read_chat_rows  # noqa: PLC0415
    from moe_tune.evaluation.report import evaluate_and_report  # noqa: PLC0415
    from moe_tune.model.loading import load_model  # noqa: PLC0415
    from moe_tune.recipe import ModelSection  # noqa: PLC0415
    from moe_tune.training import run_dir  # noqa: PLC0415

    target = Path(args.model)
    is_run = (target / run_dir.RECIPE_FILE).is_file()
    if args.adapter and is_run:
        raise MoeTuneError(f"{target}: a run folder already knows its adapter; drop --adapter")
    if not is_run and not args.data:
        raise MoeTuneError(f"{target}: not a run folder, so give the held-out data with --data FILE")
    if is_run and not (target / run_dir.MODEL_DIR).is_dir():
        raise MoeTuneError(f"{target}: this run has no saved model yet (did training finish?)")
    # a run is evaluated as it was (its own eval section and dtype) unless an option says otherwise
    recipe = run_dir.load_run_recipe(target) if is_run else None
    cfg = eval_section(args, recipe.eval if recipe else None)
    dtype = args.dtype or (recipe.model.dtype if recipe else ModelSection.model_fields["dtype"].default)
    data = "+".join(Path(f).stem for f in cfg.files)  # each data file gets a folder of its own
    if is_run:  # RUN/eval is the run's own evaluation
        default_out = target / run_dir.EVAL_DIR if not args.data else target / f"{run_dir.EVAL_DIR}-{data}"
    elif args.adapter:  # runs' adapters are all called model: name the folder by the run too
        default_out = Path(run_dir.EVAL_DIR) / f"{Path(args.adapter).resolve().parent.name}-{Path(args.adapter).name}-{data}"
    else:
        default_out = Path(run_dir.EVAL_DIR) / f"{target.name}-{data}"
    out = Path(args.out) if args.out else default_out
    if is_run and not args.data and not args.out and not args.overwrite and (out / run_dir.REPORT_MD).is_file():
        raise MoeTuneError(f"{target}: evaluated when it trained; its report is {out / run_dir.REPORT_MD}. Pass "
                           "--overwrite to evaluate it again, or --data FILE to evaluate it on other data")
    run_dir.check_replaceable(out, args.overwrite, run_dir.is_evaluation, "a moe-tune evaluation")
    for path in cfg.files:  # bad data is reported before any model loads
        read_chat_rows(path, cfg.max_rows)
    if cfg.retention_file and not Path(cfg.retention_file).is_file():
        raise MoeTuneError(f"{shown(cfg.retention_file)}: --retention file not found")
    model, tokenizer, base_path = run_dir.load_run_model(target, dtype, args.adapter)
    base = load_model(base_path, dtype, tokenizer=tokenizer)[0] if base_path and not args.no_base else None
    label = "tuned" if base_path else target.name
    with run_dir.folder_in_place(out) as tmp:  # an evaluation replaced (--overwrite) stays whole until the new one is
        reported = evaluate_and_report(model, tokenizer, cfg, tmp, base=base, label=label)
    print(f"report: {out / run_dir.REPORT_MD}" if reported else f"written to {out}")


def cmd_chat(args) -> None:
    from moe_tune.evaluation.chat import Sampling, chat_loop, load_chat_model  # noqa: PLC0415

    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)  # checked before loading
    model, tokenizer = load_chat_model(Path(args.model), args.adapter, args.dtype)
    chat_loop(model, tokenizer, sampling, args.system, lines=None if args.prompt is None else [args.prompt])


def cmd_export(args) -> None:
    from moe_tune.export import checkpoint  # noqa: PLC0415

    if args.adapter:
        checkpoint.export_adapter(Path(args.run), Path(args.adapter), args.engine, args.overwrite)
        return
    checkpoint.export_run(Path(args.run), merged=args.merged and Path(args.merged), gguf=args.gguf and Path(args.gguf),
                      quant=args.quant, verify=args.verify, data=args.data, verify_rows=args.verify_rows,
                      min_identical=args.min_identical, check_rows=args.check_rows, overwrite=args.overwrite)


def cmd_prune(args) -> None:
    from moe_tune.export.prune import run_prune  # noqa: PLC0415

    run_prune(Path(args.model), args.keep, args.data, Path(args.out), by=args.by, rows=args.rows,
              keep_layer=args.keep_layer or [], eval_data=args.eval_data, retention=args.retention,
              no_base=args.no_base, overwrite=args.overwrite, dtype=args.dtype)


def cmd_inspect(args) -> None:
    import json  # noqa: PLC0415

    from moe_tune.model.arch import describe, require_moe  # noqa: PLC0415
    from moe_tune.model.loading import build_meta_model, load_config  # noqa: PLC0415
    from moe_tune.plan.accounting import format_summary, summary  # noqa: PLC0415

    source = args.model
    if Path(source).suffix in (".yaml", ".yml") and Path(source).is_file():
        from moe_tune.recipe import load_recipe  # noqa: PLC0415

        source = load_recipe(source).model.path
    config = load_config(source)
    require_moe(config, source)
    model = build_meta_model(config)
    result = summary(model, describe(model), args.dtype)
    print(json.dumps(result, indent=2) if args.json else format_summary(result))


PATHS_NOTE = ("Relative paths, in a recipe and on the command line, are read from the current working "
              "directory (as TRL and axolotl read them); a run folder's recipe.yaml holds them made absolute.")


def _add_recipe(command, what: str) -> None:
    """A recipe and dotted overrides of its keys, as train, plan and select-experts take them."""
    command.epilog = PATHS_NOTE
    command.add_argument("recipe", help=what)
    command.add_argument("overrides", nargs="*", help="dotted overrides of recipe keys, e.g. sft.max_steps=3 "
                                                      "trainable.expert_selection.top_p=0.3 output_dir=/tmp/x")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("moe_tune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


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
    parser = _Parser(prog="moe-tune", description="Instruction-tune pretrained MoE models.", epilog=PATHS_NOTE)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # --debug after the command too (`moe-tune train r.yaml --debug`); SUPPRESS keeps the one given first
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", parents=[common], help="fine-tune a model as a recipe says")
    _add_recipe(train, "recipe YAML file, e.g. recipes/quickstart.yaml, or a run folder with --resume")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    train.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in output_dir from its last complete checkpoint")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", parents=[common], help="held-out scores and routing analytics of a run, a model, or a model + adapter")
    ev.add_argument("model", help="a run folder (from moe-tune train), a model folder, or the base of --adapter")
    ev.add_argument("--data", action="append",
                    help="held-out data (chat, Alpaca, ShareGPT, prompt/completion, ...); repeat for several "
                         "(default for a run: its own eval.files)")
    ev.add_argument("--adapter", help="a PEFT adapter folder to apply to MODEL (compared with MODEL alone)")
    ev.add_argument("--retention", help="plain text, one passage per line: loss on it shows forgetting")
    ev.add_argument("--no-base", action="store_true", help="do not evaluate the base model side by side")
    ev.add_argument("--out", help="folder for results, report and plots (default: RUN/eval for a run's own "
                                  "files, RUN/eval-DATA for other data, eval/NAME for a model or adapter)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing evaluation in the output folder")
    # defaults (None here) are the recipe's: EvalSection's and ModelSection.dtype's
    ev.add_argument("--batch-size", type=int, help="prompts generated per batch (default: as in a recipe)")
    ev.add_argument("--max-new-tokens", type=int, help="greedy generation length (default: as in a recipe)")
    ev.add_argument("--max-rows", type=int, help="evaluate only N rows of each file, evenly spaced through it")
    ev.add_argument("--dtype", type=_one_of("moe_tune.model.loading", "DTYPES"),
                    help="dtype the weights are loaded in (default: as in a recipe)")
    ev.set_defaults(func=cmd_eval)

    chat = sub.add_parser("chat", parents=[common], help="talk to a run or a model: answers streamed as they are "
                                                         "generated, one line per turn on stdin (an empty line ends)")
    chat.add_argument("model", help="a run folder (from moe-tune train), a model folder, or the base of --adapter")
    chat.add_argument("--adapter", help="a PEFT adapter folder to apply to MODEL")
    chat.add_argument("--prompt", help="answer this one prompt and exit, instead of reading turns from stdin")
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampled")
    chat.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]; with --temperature")
    chat.add_argument("--max-new-tokens", type=int, default=128, help="the longest answer, in tokens (default 128)")
    chat.add_argument("--seed", type=int, help="seed for sampling, for answers that repeat")
    chat.add_argument("--dtype", type=_one_of("moe_tune.model.loading", "DTYPES"),
                      help="dtype the weights are loaded in (default: a run's, else float32)")
    chat.set_defaults(func=cmd_chat)

    cmp = sub.add_parser("compare", parents=[common], help="variants of a recipe over seeds, side by side (resumable)")
    cmp.add_argument("spec", help="comparison spec YAML, e.g. recipes/compare/freezing.yaml")
    cmp.add_argument("overrides", nargs="*", help="dotted recipe overrides for every run, e.g. sft.max_steps=50")
    cmp.add_argument("--overwrite", action="store_true",
                     help="run every variant again, also those that finished with another recipe")
    cmp.set_defaults(func=cmd_compare)

    plan = sub.add_parser("plan", parents=[common], help="what a recipe will train, its LoRA coverage and memory, without training")
    _add_recipe(plan, "recipe YAML file, e.g. recipes/hub/qwen3-30b-a3b-lora-experts.yaml")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--gpu-memory", help="memory of one GPU: 80GB (GB = 1e9 bytes), 80GiB (2**30 bytes) or 80 "
                      "(GB); adds the peak per GPU under DDP, FSDP2 and ZeRO-3, whether it fits, and what to change")
    plan.add_argument("--gpus", type=int, help="GPUs the run is spread over (default: the --accelerate-config's "
                      "num_processes, else 1); needs --gpu-memory")
    plan.add_argument("--accelerate-config", help="the accelerate config the run will launch with, e.g. "
                      "recipes/accelerate/fsdp2.yaml: its strategy is the one judged; needs --gpu-memory")
    plan.set_defaults(func=cmd_plan)

    sel = sub.add_parser("select-experts", parents=[common], help="score experts on the recipe's training data (ESFT)")
    _add_recipe(sel, "recipe YAML file whose training data and expert_selection settings are used")
    sel.add_argument("--out", default="expert_selection.json", help="where to write the selection JSON")
    sel.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sel.set_defaults(func=cmd_select_experts)

    exp = sub.add_parser("export", parents=[common],
                         help="a standard checkpoint or a GGUF file from a run (LoRA merged), checked before it is written")
    exp.add_argument("run", help="a run folder from moe-tune train")
    where = exp.add_mutually_exclusive_group(required=True)
    where.add_argument("--merged", help="folder for the merged checkpoint (transformers, vLLM, SGLang)")
    where.add_argument("--gguf", help="a .gguf file for llama.cpp (ollama, LM Studio): llama.cpp's converter writes "
                                      "it and llama.cpp's greedy answers are checked against transformers'")
    where.add_argument("--adapter", help="with --for vllm: the run's LoRA adapter, unmerged, in the layout that "
                                         "engine loads for fused experts")
    exp.add_argument("--for", dest="engine", choices=["vllm"], help="the engine --adapter is converted for")
    exp.add_argument("--quant", default="f16", choices=GGUF_TYPES, metavar="TYPE",
                     help=f"GGUF type: {', '.join(GGUF_TYPES)} (default f16)")
    exp.add_argument("--verify", choices=["vllm"], help="with --merged: check the checkpoint's greedy answers in vLLM")
    exp.add_argument("--data", help="held-out chat rows for the serving check (default: the run's eval.files)")
    exp.add_argument("--verify-rows", type=int, default=100, help="prompts for the serving check (default 100)")
    exp.add_argument("--min-identical", type=float,
                     help="share of answers that must match transformers' (default 0.95; for quantized GGUF "
                          "types the agreement is only reported unless this is given)")
    exp.add_argument("--check-rows", type=int, default=8, help="sample rows for the logits/routing check")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing export at the destination")
    exp.set_defaults(func=cmd_export)

    pr = sub.add_parser("prune", parents=[common],
                        help="remove the experts a task uses least: a smaller standard checkpoint, evaluated beside the source")
    pr.add_argument("model", help="a run folder (its tuned model, LoRA merged) or a model folder")
    pr.add_argument("--keep", required=True, help="experts each MoE layer keeps: a fraction (0.5) or a count (6); "
                                                  "at least top-k")
    pr.add_argument("--data", required=True, help="the task's rows (chat, Alpaca, ShareGPT, ...) the experts are scored on")
    pr.add_argument("--out", required=True, help="folder for the pruned checkpoint, pruning.json and eval/")
    pr.add_argument("--by", default="reap", type=_one_of("moe_tune.export.prune", "SCORES"),
                    help="reap: router-weighted norm of each expert's output (default); frequency: share of top-k "
                         "slots; gate: mean router probability")
    pr.add_argument("--keep-layer", action="append", metavar="LAYER=KEEP",
                    help="another --keep for one layer (its number or block name); every layer must still keep "
                         "the same count, which is all a transformers config can declare")
    pr.add_argument("--rows", type=int, default=512, help="rows of --data scored (default 512)")
    pr.add_argument("--eval-data", action="append", help="held-out rows to evaluate base and pruned on; repeat for "
                                                         "several (default: a run's eval.files, else --data)")
    pr.add_argument("--retention", help="plain text, one passage per line: loss on it shows forgetting "
                                        "(default: a run's eval.retention_file)")
    pr.add_argument("--no-base", action="store_true", help="evaluate only the pruned model")
    pr.add_argument("--overwrite", action="store_true", help="replace a folder moe-tune pruned before")
    pr.add_argument("--dtype", type=_one_of("moe_tune.model.loading", "DTYPES"),
                    help="dtype the weights are loaded in (default: a run's, else float32)")
    pr.set_defaults(func=cmd_prune)

    ins = sub.add_parser("inspect", parents=[common], help="experts, parameters per part, active parameters, memory estimates")
    ins.add_argument("model", help="a checkpoint or config folder, a recipe, or a hub id (online only)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--dtype", default="bfloat16", type=_one_of("moe_tune.plan.accounting", "DTYPE_BYTES"),
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
    except Interrupted as e:
        print(f"moe-tune: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("moe-tune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
