"""``moe-tune export RUN --merged OUT`` / ``--gguf OUT.gguf``: a standard checkpoint from a run.

LoRA is merged into the weights it adapts (fused experts included) by PEFT; a fully fine-tuned
run's weights are written as they are. Before anything is kept, the merged model must give the
same logits and the same routing as the adapter model on sample prompts, and, where a serving
engine is asked for (``--verify vllm``, or llama.cpp for every GGUF file), the engine's greedy
answers on held-out prompts must equal transformers' (``serving``); otherwise the export is
refused and nothing is left at OUT.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import torch

from moe_tune.data.rows import read_chat_rows, spread
from moe_tune.errors import MoeTuneError
from moe_tune.evaluation.heldout import inference_mode
from moe_tune.export import serving
from moe_tune.export.gguf import CONVERTER_TYPES
from moe_tune.export.vllm_adapter import write_vllm_adapter
from moe_tune.model.arch import describe
from moe_tune.model.loading import build_meta_model, load_config
from moe_tune.moe.routing import chat_batches
from moe_tune.plan.modes import unwrapped
from moe_tune.training.run_dir import (
    MODEL_DIR,
    RECIPE_FILE,
    check_replaceable,
    folder_in_place,
    load_run_model,
    load_run_recipe,
    write_pretrained,
)

# The merged weight W + BA rounds differently from x@W + x@A@B: tolerances per weight dtype.
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def _sample_batch(tokenizer, rows: list[dict]):
    """Every row in one right-padded batch."""
    (_, batch), = chat_batches(tokenizer, rows, len(rows))
    return batch


def _router(model, name: str):
    """A router module by its plain name, in a plain or a PEFT-wrapped model (where the
    outermost LoRA wrapper sits at the router's path and returns the router's output)."""
    try:
        return unwrapped(model).get_submodule(name)
    except AttributeError:
        raise MoeTuneError(f"export: router '{name}' not found in the model") from None


def _tensors(output) -> list[torch.Tensor]:
    items = output if isinstance(output, tuple) else (output,)
    return [t.detach() for t in items if isinstance(t, torch.Tensor)]


@torch.no_grad()
def _fingerprint(model, arch, batch) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """(logits on real tokens, each router's own outputs: logits/scores and selected experts)."""

    routes: dict[str, list[torch.Tensor]] = {}
    hooks = [_router(model, layer.router).register_forward_hook(
        lambda m, a, out, b=layer.block: routes.__setitem__(b, _tensors(out))) for layer in arch.layers]
    try:
        with inference_mode(model):
            logits = model(**batch).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return logits[batch["attention_mask"].bool()], routes


def check_merge(before, after, tolerance: float = 1e-3) -> str | None:
    """None when merged and unmerged agree; otherwise what differs."""
    (logits_a, routes_a), (logits_b, routes_b) = before, after
    scale = max(1.0, logits_a.abs().max().item() / 10)
    diff = (logits_a - logits_b).abs().max().item()
    if diff > tolerance * scale:
        return f"logits differ by up to {diff:.2e}"
    for block, outs_a in routes_a.items():
        for a, b in zip(outs_a, routes_b[block]):
            if a.is_floating_point():
                if (a.float() - b.float()).abs().max().item() > tolerance * scale:
                    return f"router outputs differ in {block}"
            elif not torch.equal(a.sort(-1).values, b.sort(-1).values):
                return f"routing (selected experts) differs in {block}"
    return None


def merge_and_check(model, tokenizer, rows: list[dict]):
    """The merged model, after checking it against the adapter model on ``rows``."""

    arch = describe(build_meta_model(model.config))
    batch = _sample_batch(tokenizer, rows)
    before = _fingerprint(model, arch, batch)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    tolerance = LOGIT_TOLERANCE.get(next(model.parameters()).dtype, 5e-2)
    problem = check_merge(before, _fingerprint(merged, arch, batch), tolerance)
    if problem:
        raise MoeTuneError(f"export refused: after merging LoRA, {problem}; the adapter in the run still "
                           "works with PeftModel.from_pretrained")
    return merged


def check_destination(out: Path, overwrite: bool) -> None:
    """Before anything loads: ``out`` is free, or a checkpoint ``--overwrite`` may replace."""
    check_replaceable(out, overwrite, lambda folder: (folder / "config.json").is_file(), "a checkpoint folder")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def check_gguf_destination(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise MoeTuneError(f"--gguf {out}: give a file name ending in .gguf")
    if out.is_dir() or (out.exists() and not overwrite):
        raise MoeTuneError(f"{out}: already exists; pass --overwrite or choose another file name")
    if out.exists() and not _is_gguf(out):
        raise MoeTuneError(f"{out}: not a GGUF file, refusing to replace it; choose another file name")


def _run_recipe(run: Path):
    """The recipe a run folder was trained with; one line when ``run`` is not a run."""

    if not (run / RECIPE_FILE).is_file():
        raise MoeTuneError(f"{run}: not a moe-tune run folder (no {RECIPE_FILE})")
    return load_run_recipe(run)


def _held_out_files(recipe) -> list[str]:
    """Where a run's held-out rows are: its eval files, else its validation (or training) data."""
    return recipe.eval.files or [recipe.data.valid or recipe.data.train]


def _serving_rows(recipe, data: str | None, count: int) -> tuple[list[dict], str]:
    """(held-out rows spread through the file(s), where they came from) for a serving check."""

    files = [data] if data else _held_out_files(recipe)
    rows = [row for path in files for row in read_chat_rows(path)]
    return spread(rows, count), ", ".join(str(f) for f in files)


def export_run(run: Path, merged: Path | None, gguf: Path | None, quant: str = "f16", verify: str | None = None,
               data: str | None = None, verify_rows: int = 100, min_identical: float | None = None,
               check_rows: int = 8, overwrite: bool = False) -> None:
    """Merge (or copy) a run's model, check it, and write it as a checkpoint folder or a GGUF file."""

    recipe = _run_recipe(run)
    if verify and not merged:
        raise MoeTuneError("--verify vllm checks a --merged checkpoint; a --gguf file is always checked in llama.cpp")
    if verify_rows < 1:
        raise MoeTuneError(f"--verify-rows: give a positive number of prompts (got {verify_rows})")
    if min_identical is not None and not 0 <= min_identical <= 1:
        raise MoeTuneError(f"--min-identical: give a share between 0 and 1 (got {min_identical})")
    # everything that can be refused is refused before minutes of loading and merging
    if merged:
        check_destination(merged, overwrite)
    else:
        check_gguf_destination(gguf, overwrite)
        serving.llama_cpp_home()
    if verify:
        serving.vllm_python()
    sample = _held_out_files(recipe)[0]
    rows = read_chat_rows(sample, check_rows)
    held_out, source = _serving_rows(recipe, data, verify_rows) if (verify or gguf) else ([], "")
    dtype, max_new_tokens = recipe.model.dtype, recipe.eval.max_new_tokens
    if min_identical is None:
        min_identical = serving.MIN_IDENTICAL if (merged or quant in serving.UNQUANTIZED) else 0.0

    model, tokenizer, _ = load_run_model(run, dtype)
    model = merge_and_check(model, tokenizer, rows)
    checked = f"merged and checked on {len(rows)} rows of {sample}: same logits and routing"
    if merged:
        with folder_in_place(merged) as tmp:
            write_pretrained(model, tokenizer, tmp)
            del model
            gc.collect()
            if verify:
                agreement = serving.verify_vllm(tmp, held_out, max_new_tokens, dtype)
                agreement.check(min_identical)
                checked += f"; {agreement.summary()} on {len(held_out)} prompts of {source}"
        print(f"{checked}; written to {merged}")
        return
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent, prefix=f".{gguf.name}.") as tmp:
        checkpoint, converted = write_pretrained(model, tokenizer, Path(tmp)), Path(tmp) / gguf.name
        del model
        gc.collect()
        serving.convert_gguf(checkpoint, converted, quant)
        agreement = serving.verify_llama_cpp(checkpoint, converted, held_out, max_new_tokens, dtype)
        agreement.check(min_identical)
        os.replace(converted, gguf)
    made = "llama.cpp's converter" + ("" if quant in CONVERTER_TYPES else " and llama-quantize")
    print(f"{checked}; {quant} GGUF by {made}; {agreement.summary()} on {len(held_out)} prompts "
          f"of {source}; written to {gguf}")


def export_adapter(run: Path, out: Path, engine: str | None, overwrite: bool) -> None:
    """A LoRA run's adapter, unmerged, converted for ``engine`` (vllm_adapter)."""

    recipe = _run_recipe(run)
    if engine is None:
        raise MoeTuneError("--adapter needs --for vllm (the engine whose layout to write)")
    adapter = run / MODEL_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise MoeTuneError(f"{run}: not a LoRA run (no {MODEL_DIR}/adapter_config.json); its weights serve as they "
                           "are: use --merged")
    check_replaceable(out, overwrite, lambda folder: (folder / "adapter_config.json").is_file(), "an adapter folder")
    base = recipe.model.path
    with folder_in_place(out) as tmp:
        modules = write_vllm_adapter(adapter, build_meta_model(load_config(base)), tmp)
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    print(f"{modules} LoRA modules in vLLM's per-expert layout written to {out}; on a GPU server: "
          f"vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules tuned={out}")
