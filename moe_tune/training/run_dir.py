"""The run folder: its layout, how it is claimed, resumed, and written without half-files.

    RUN/
      recipe.yaml          the fully resolved recipe, local paths absolute (it marks a moe-tune run)
      phases.json          the phases completed: train, save, evaluate, report (what --resume skips)
      plan.json            what trained, counted after expert selection (compare reads it)
      expert_selection.json  experts scored at the start of an ESFT run
      data_report.json     rows skipped under data.skip_bad_rows
      metrics.jsonl        one JSON object per logging step
      tensorboard/         the same values for TensorBoard
      checkpoints/         Trainer's checkpoint-N folders (what --resume continues from)
      model/               weights and tokenizer, or the LoRA adapter
      eval/                held-out results, report.md / report.json and plots (a finished run)

Everything here is written under a temporary name and renamed into place, so a crash never
leaves a half-written file or folder that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from moe_tune.errors import MoeTuneError
from moe_tune.model.loading import load_adapter_model, load_model
from moe_tune.plan.modes import unwrapped
from moe_tune.recipe import load_recipe, with_absolute_paths
from moe_tune.training import distributed

RECIPE_FILE = "recipe.yaml"
PLAN_FILE = "plan.json"
SELECTION_FILE = "expert_selection.json"
DATA_REPORT_FILE = "data_report.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
EVAL_DIR = "eval"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RETENTION_FILE = "retention.json"
PHASES_FILE = "phases.json"
COMPARE_FILE = "compare_run.json"  # written by compare last, when a run has finished and been measured


# --- writing without half-files -------------------------------------------------------------------

def tmp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


def put_in_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp``; its files readable as the umask allows
    (transformers writes safetensors through a private temporary file, mode 0600)."""
    mode = 0o666 & ~_umask()
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _umask() -> int:
    current = os.umask(0)  # the only way to read it is to set it
    os.umask(current)
    return current


def write_text(path: Path, text: str) -> None:
    """Write next to the final name first, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def folder_in_place(final: Path, rename: bool = True):
    """Yield an empty ``final.tmp`` to fill; once the block succeeds it replaces ``final``
    (the old folder stays until the new one is complete). ``rename=False``: fill only (the
    ranks of a multi-process run that do not write)."""
    tmp = tmp_path(final)
    if rename:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if rename:  # what failed leaves nothing behind; ``final`` is as it was
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rename:
        put_in_place(tmp, final)


def check_replaceable(out: Path, overwrite: bool, ours, what: str) -> None:
    """``out`` may be written: it is missing or empty, or ``overwrite`` is given and ``ours(out)``
    says it holds ``what`` (something moe-tune wrote); nothing else is ever replaced."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise MoeTuneError(f"{out}: already exists and is not empty; pass --overwrite or choose another folder")
        if not out.is_dir() or not ours(out):
            raise MoeTuneError(f"{out}: not {what}, refusing to replace it; choose another folder")


def is_evaluation(folder: Path) -> bool:
    """A folder of held-out results written by moe-tune (a report, or results JSON files)."""
    def results(path: Path) -> bool:
        try:
            return {"file", "results"} <= set(json.loads(path.read_text()))
        except (ValueError, TypeError, OSError):
            return False
    return (folder / REPORT_JSON).is_file() or any(results(p) for p in folder.glob("*.json"))


def serve_with_cache(model) -> None:
    """A saved model generates with its KV cache (training turned it off): set in the text config,
    and in the outer one where that has the key (a multimodal config keeps it in the first only)."""
    model.config.get_text_config().use_cache = True
    if "use_cache" in vars(model.config):
        model.config.use_cache = True


def write_pretrained(model, tokenizer, folder: Path) -> Path:
    """Weights (or a PEFT adapter) and tokenizer into ``folder``."""
    serve_with_cache(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_pretrained(model, tokenizer, final: Path) -> Path:
    """Weights (or a PEFT adapter) and tokenizer into ``final``, renamed into place."""
    with folder_in_place(final) as tmp:
        write_pretrained(model, tokenizer, tmp)
    return final


# --- claiming a folder --------------------------------------------------------------------------

def check_run_dir(output_dir: str, overwrite: bool) -> Path:
    """The run folder may be used: a finished or partial run is replaced only with
    ``overwrite``; a non-empty folder that is not a moe_tune run is never touched."""
    run = Path(output_dir)
    if run.exists() and not run.is_dir():
        raise MoeTuneError(f"output_dir: '{run}' is a file; choose a folder name")
    if run.is_dir() and any(run.iterdir()):
        if not (run / RECIPE_FILE).is_file():
            raise MoeTuneError(f"output_dir: '{run}' is not empty and is not a moe-tune run; "
                               "choose another output_dir")
        if not overwrite:
            raise MoeTuneError(f"output_dir: '{run}' already holds a run; pass --overwrite to "
                               "replace it, or set output_dir=... to another folder")
    return run


def prepare_run_dir(output_dir: str, overwrite: bool) -> Path:
    """An empty run folder (see ``check_run_dir`` for what may be replaced)."""
    run = check_run_dir(output_dir, overwrite)
    if run.is_dir() and any(run.iterdir()):
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


def discard_unstarted(run: Path, existed: bool) -> bool:
    """Remove what a run that failed before its first logged step wrote (nothing to resume or
    read: no checkpoint, no metrics, no phase done), so that the next try needs no --overwrite;
    a folder that was there before the run (empty) stays. Whether it was removed."""
    if complete_checkpoints(run) or phases_done(run) or (run / METRICS_FILE).is_file():
        return False
    for entry in run.iterdir() if existed else ():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if not existed:
        shutil.rmtree(run)
    return True


# --- phases and resuming ---------------------------------------------------------------------------

PHASES = ("train", "save", "evaluate", "report")  # in run order, each recorded once complete
# Recipe keys a resumed run may change: they change what is logged or kept, never what is learned.
RESUMABLE = ("output_dir", "sft.logging_steps", "sft.logging_first_step", "sft.report_to", "sft.save_steps",
             "sft.save_total_limit", "sft.disable_tqdm", "sft.dataloader_num_workers")


def phases_done(run: Path) -> list[str]:
    """Phases the run completed, as recorded and as its folder still shows: model/ and eval/ are
    only ever renamed into place whole, so they mark save and report done (runs from before
    phases were recorded, too), and a phase whose output was removed since is not done."""
    path = run / PHASES_FILE
    recorded = set(json.loads(path.read_text())["done"]) if path.is_file() else set()
    saved, reported = (run / MODEL_DIR).is_dir(), (run / EVAL_DIR).is_dir()
    evaluated = reported or ("evaluate" in recorded and tmp_path(run / EVAL_DIR).is_dir())
    done = {"train": "train" in recorded or saved, "save": saved, "evaluate": saved and evaluated,
            "report": saved and reported}
    return [phase for phase in PHASES if done[phase]]


def mark_done(run: Path, phase: str) -> None:
    if distributed.is_main():
        write_json(run / PHASES_FILE, {"done": sorted({*phases_done(run), phase}, key=PHASES.index)})


def complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoints Trainer finished writing (trainer_state.json is its last file), oldest first."""
    found = [c for c in (run / CHECKPOINTS).glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return sorted(found, key=lambda c: int(c.name.rsplit("-", 1)[1]))


def checkpoint_step(checkpoint: Path) -> tuple[int, int]:
    """(the step a checkpoint was saved at, the run's last step)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"], state["max_steps"]


def flat_keys(data: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict, for naming the first key two recipes differ in."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def first_difference(recipe, other, ignore: tuple[str, ...] = RESUMABLE) -> tuple[str, object, object] | None:
    """(dotted key, value in ``recipe``, value in ``other``) of the first key that differs,
    apart from ``ignore``; None when they are the same run."""
    mine, theirs = flat_keys(recipe.model_dump(mode="json")), flat_keys(other.model_dump(mode="json"))
    for key in dict.fromkeys([*mine, *theirs]):
        if key not in ignore and mine.get(key) != theirs.get(key):
            return key, mine.get(key), theirs.get(key)
    return None


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where an unfinished run goes on from."""

    done: list[str]              # phases complete
    checkpoint: Path | None      # the last complete checkpoint, while the model is not saved yet


# why a sharded run's training does not resume, and what to do instead
SHARDED_CHECKPOINTS = ("transformers' engine does not checkpoint a sharded optimizer, so training cannot resume "
                       "(docs/distributed.md); each checkpoint-N loads with from_pretrained: start again with "
                       "--overwrite, or train on from one (model.path=RUN/checkpoints/checkpoint-N)")


def resume_point(recipe, args) -> Resume:
    """What is left of the run in ``recipe.output_dir``, after checking that the run exists, is
    unfinished, and was started with this recipe (``RESUMABLE`` keys aside); clears what an
    interrupted phase left half-written. ``args`` is the run's SFTConfig."""

    run = Path(recipe.output_dir)
    if not (run / RECIPE_FILE).is_file():
        raise MoeTuneError(f"output_dir: no moe-tune run to resume in '{run}'; drop --resume to start one")
    done = phases_done(run)
    if "report" in done or (run / EVAL_DIR).is_dir():
        raise MoeTuneError(f"output_dir: the run in '{run}' finished; nothing to resume (--overwrite starts it again)")
    changed = first_difference(with_absolute_paths(recipe), with_absolute_paths(load_recipe(run / RECIPE_FILE)))
    if changed:
        key, value, saved = changed
        raise MoeTuneError(f"{key}: {value!r} differs from the run's {saved!r} ({run / RECIPE_FILE}); a resumed "
                           f"run keeps every setting that changes its result (only {', '.join(RESUMABLE)} may "
                           "change): resume with the run's recipe (moe-tune train RUN_FOLDER --resume)")
    checkpoints = complete_checkpoints(run)
    if "save" not in done and not checkpoints:
        why = ("sft.save_strategy is 'no', so it kept no checkpoint" if args.save_strategy == "no" else
               f"it stopped before its first checkpoint (sft.save_steps is {args.save_steps})")
        raise MoeTuneError(f"output_dir: '{run}' has no complete checkpoint to resume from: {why}; start it again "
                           "with --overwrite")
    if "save" not in done and recipe.parallel is not None:
        raise MoeTuneError(f"output_dir: '{run}' trained sharded (the parallel section), whose checkpoints hold "
                           f"the weights only: {SHARDED_CHECKPOINTS}")
    if distributed.is_main():  # what an interrupted phase left half-written
        for leftover in [tmp_path(run / MODEL_DIR)] * ("save" not in done) + [tmp_path(run / EVAL_DIR)] * (
                "evaluate" not in done):
            shutil.rmtree(leftover, ignore_errors=True)
        for partial in (run / CHECKPOINTS).glob("checkpoint-*"):
            if partial not in checkpoints:
                shutil.rmtree(partial, ignore_errors=True)
    return Resume(done, None if "save" in done else checkpoints[-1])


def continue_run(run: Path, resume: Resume, selection) -> Path | None:
    """What a resumed run reuses: its metrics and TensorBoard events up to the checkpoint it
    trains on from (later ones would be logged twice), and the expert selection it scored
    (returned: not scored again), where the recipe asks for a ``selection``."""
    if resume.checkpoint is not None and distributed.is_main():
        step, last = checkpoint_step(resume.checkpoint)
        if step < last:  # training goes on: its summary line comes again at the end
            _drop_logs_after(run, step)
    return run / SELECTION_FILE if selection is not None and (run / SELECTION_FILE).is_file() else None


def _drop_logs_after(run: Path, step: int) -> None:
    metrics = run / METRICS_FILE
    if metrics.is_file():
        rows = [(line, json.loads(line)) for line in metrics.read_text().splitlines()]
        kept = [line for line, row in rows if row.get("step", 0) <= step and "train_runtime" not in row]
        write_text(metrics, "".join(line + "\n" for line in kept))
    if (run / TENSORBOARD_DIR).is_dir():
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        # an event at purge_step tells TensorBoard to hide earlier files' events from that step on;
        # it is read in file-name order, so it and the resumed run's own file open in later seconds
        after_newest_events(run / TENSORBOARD_DIR)
        SummaryWriter(str(run / TENSORBOARD_DIR), purge_step=step + 1).close()
        after_newest_events(run / TENSORBOARD_DIR)


def after_newest_events(folder: Path) -> None:
    """Wait (a second at most) until the clock is past the second in which the newest event
    file in ``folder`` was opened. TensorBoard reads a folder's files in the order of their names,
    ``events.out.tfevents.SECOND.HOST.PID.N``: two opened in the same second sort by process id
    and counter, so a run resumed within a second of its last file would read as steps 3, 4, 1, 2.
    A file stamped by a clock further ahead (a folder moved from another machine) is not waited out."""
    opened = [int(name.split(".")[3]) for name in (p.name for p in folder.glob("events.out.tfevents.*"))
              if name.split(".")[3].isdigit()]
    if opened:
        time.sleep(min(1.0, max(0.0, max(opened) + 1 - time.time())))


# --- the run's model ------------------------------------------------------------------------------

def save_model(model, tokenizer, run: Path) -> Path:
    """Weights and tokenizer into ``run/model``."""
    return save_pretrained(model, tokenizer, run / MODEL_DIR)


def save_distributed(trainer, tokenizer, run: Path) -> Path:
    """Every rank takes part (FSDP gathers a full state dict, ZeRO-3 its partitions); rank 0
    writes the tokenizer and renames the folder into place."""
    serve_with_cache(trainer.model)
    with folder_in_place(run / MODEL_DIR, rename=distributed.is_main()) as tmp:
        # rank 0 has cleared and made the folder before any rank's save creates it (a model
        # sharded at load time saves from every rank; seen as FileExistsError in the tests)
        distributed.barrier()
        trainer.save_model(str(tmp))
        if distributed.is_main():
            (tmp / "training_args.bin").unlink(missing_ok=True)
            tokenizer.save_pretrained(tmp)
            if getattr(trainer.model, "is_distributed_loading_by_transformers", False):
                as_unsharded_save(trainer.model, tmp)
    distributed.barrier()
    return run / MODEL_DIR


def as_unsharded_save(model, folder: Path) -> None:
    """What a model sharded at load time (the recipe's parallel section) saves, made the files an
    unsharded save writes: a tied weight (lm_head of tied embeddings), which the gather writes
    apart, is dropped, and an adapter names the model's own class rather than FSDP's wrapper."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    tied = set(getattr(unwrapped(model), "all_tied_weights_keys", None) or {})
    index = folder / "model.safetensors.index.json"
    for path in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(path)
        if tied & tensors.keys():
            save_file({k: v for k, v in tensors.items() if k not in tied}, path, metadata={"format": "pt"})
    if index.is_file() and tied:
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in tied}
        index.write_text(json.dumps(data, indent=2))
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        config = json.loads(adapter.read_text())
        mapping = config.get("auto_mapping") or {}
        if str(mapping.get("base_model_class", "")).startswith("FSDP"):
            own = next(c for c in type(unwrapped(model)).__mro__ if not c.__name__.startswith("FSDP"))
            mapping.update(base_model_class=own.__name__, parent_library=own.__module__)
            adapter.write_text(json.dumps(config, indent=2))


def load_run_recipe(run: Path, overrides: list[str] | None = None):
    """A run folder's recipe, with the folder as it is now for output_dir (it may have moved)."""

    return load_recipe(run / RECIPE_FILE, [*(overrides or []), f"output_dir={run.resolve()}"])


def load_run_model(target: Path, dtype: str, adapter: str | None = None):
    """(model, tokenizer, base path or None) of a run folder (full weights, or base + adapter),
    a model folder with ``adapter``, or a plain model folder."""

    if adapter:
        return (*load_adapter_model(str(target), Path(adapter), dtype), str(target))
    if not (target / RECIPE_FILE).is_file():
        return (*load_model(str(target), dtype), None)
    saved = target / MODEL_DIR
    if not saved.is_dir():
        raise MoeTuneError(f"{target}: this run has no saved model yet (did training finish?)")
    base = load_run_recipe(target).model
    base_path = base.path
    if (saved / "adapter_config.json").is_file():
        return (*load_adapter_model(base_path, saved, dtype, base), base_path)
    return (*load_model(str(saved), dtype), base_path)
