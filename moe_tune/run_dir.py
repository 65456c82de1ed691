"""The run folder: its layout, how it is claimed, resumed, and written without half-files.

    RUN/
      recipe.yaml          the fully resolved recipe (its presence marks a moe-tune run)
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
import json
import shutil
from pathlib import Path

from moe_tune import distributed
from moe_tune.errors import MoeTuneError

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
COMPARE_FILE = "compare_run.json"  # written by compare last, when a run has finished and been measured


# --- writing without half-files -------------------------------------------------------------------

def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_text(path: Path, text: str) -> None:
    """Write next to the final name first, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def folder_in_place(final: Path, rename: bool = True):
    """Yield an empty ``final.tmp`` to fill; once the block succeeds it replaces ``final``
    (the old folder stays until the new one is complete). ``rename=False``: fill only (the
    ranks of a multi-process run that do not write)."""
    tmp = _tmp(final)
    if rename:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    yield tmp
    if rename:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def save_pretrained(model, tokenizer, final: Path) -> Path:
    """Weights (or a PEFT adapter) and tokenizer into ``final``, renamed into place."""
    model.config.use_cache = True
    with folder_in_place(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
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


# --- resuming -------------------------------------------------------------------------------------

def complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoints Trainer finished writing (trainer_state.json is its last file), oldest first."""
    found = [c for c in (run / CHECKPOINTS).glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return sorted(found, key=lambda c: int(c.name.rsplit("-", 1)[1]))


def flat_keys(data: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict, for naming the first key two recipes differ in."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_point(recipe, save_steps: int) -> Path:
    """The last complete checkpoint of the run in ``recipe.output_dir``, after checking that the
    run exists, is unfinished, and was started with this same recipe."""
    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    run = Path(recipe.output_dir)
    if not (run / RECIPE_FILE).is_file():
        raise MoeTuneError(f"output_dir: no moe-tune run to resume in '{run}'; drop --resume to start one")
    if (run / EVAL_DIR).is_dir():
        raise MoeTuneError(f"output_dir: the run in '{run}' finished; nothing to resume (--overwrite starts it again)")
    saved = flat_keys(load_recipe(run / RECIPE_FILE).model_dump(mode="json"))
    for key, value in flat_keys(recipe.model_dump(mode="json")).items():
        if saved.get(key) != value:
            raise MoeTuneError(f"{key}: {value!r} differs from the run's {saved.get(key)!r} ({run / RECIPE_FILE}); "
                               "resume with the run's recipe (moe-tune train RUN_FOLDER --resume)")
    done = complete_checkpoints(run)
    if not done:
        raise MoeTuneError(f"output_dir: '{run}' has no complete checkpoint to resume from (sft.save_steps is "
                           f"{save_steps}); start again with --overwrite")
    return done[-1]


def continue_run(recipe, checkpoint: Path):
    """What a resumed run reuses: its expert selection (not scored again), and its metrics up to
    the checkpoint (later lines would be logged twice). Returns the recipe to continue with."""
    run = Path(recipe.output_dir)
    step = int(checkpoint.name.rsplit("-", 1)[1])
    metrics = run / METRICS_FILE
    if metrics.is_file() and distributed.is_main():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        write_text(metrics, "".join(line + "\n" for line in kept))
    selection = recipe.trainable.selection()
    if selection is not None and (run / SELECTION_FILE).is_file():
        recipe = recipe.model_copy(deep=True)
        recipe.trainable.expert_selection = selection.model_copy(update={"file": str(run / SELECTION_FILE)})
    return recipe


# --- the run's model ------------------------------------------------------------------------------

def save_model(model, tokenizer, run: Path) -> Path:
    """Weights and tokenizer into ``run/model``."""
    return save_pretrained(model, tokenizer, run / MODEL_DIR)


def save_distributed(trainer, tokenizer, run: Path) -> Path:
    """Every rank takes part (FSDP gathers a full state dict, ZeRO-3 its partitions); rank 0
    writes the tokenizer and renames the folder into place."""
    trainer.model.config.use_cache = True
    with folder_in_place(run / MODEL_DIR, rename=distributed.is_main()) as tmp:
        trainer.save_model(str(tmp))
        if distributed.is_main():
            (tmp / "training_args.bin").unlink(missing_ok=True)
            tokenizer.save_pretrained(tmp)
    distributed.barrier()
    return run / MODEL_DIR


def load_run_model(target: Path, dtype: str, adapter: str | None = None):
    """(model, tokenizer, base path or None) of a run folder (full weights, or base + adapter),
    a model folder with ``adapter``, or a plain model folder."""
    from moe_tune.loading import load_adapter_model, load_model  # noqa: PLC0415
    from moe_tune.recipe import load_recipe  # noqa: PLC0415

    if adapter:
        return (*load_adapter_model(str(target), Path(adapter), dtype), str(target))
    if not (target / RECIPE_FILE).is_file():
        return (*load_model(str(target), dtype), None)
    saved = target / MODEL_DIR
    if not saved.is_dir():
        raise MoeTuneError(f"{target}: this run has no saved model yet (did training finish?)")
    base_path = load_recipe(target / RECIPE_FILE).model.path
    if (saved / "adapter_config.json").is_file():
        return (*load_adapter_model(base_path, saved, dtype), base_path)
    return (*load_model(str(saved), dtype), base_path)
