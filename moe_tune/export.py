"""``moe-tune export RUN --merged OUT``: a standard checkpoint from a run.

LoRA is merged into the weights it adapts (fused experts included) by PEFT. Before anything
is written, the merged model must give the same logits and the same routing as the adapter
model on sample prompts; otherwise the export is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_tune.arch import describe
from moe_tune.errors import MoeTuneError
from moe_tune.routing import chat_batches
from moe_tune.run_dir import check_replaceable, save_pretrained
from moe_tune.trainable import unwrapped

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
    from moe_tune.evaluate import inference_mode  # noqa: PLC0415

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
    from moe_tune.loading import build_meta_model  # noqa: PLC0415

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


def write_checkpoint(model, tokenizer, out: Path, overwrite: bool) -> Path:
    check_destination(out, overwrite)
    return save_pretrained(model, tokenizer, out)
