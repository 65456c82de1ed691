"""The experts kernel's step buffers: the large tensors each training step makes anew.

They are a whole experts weight's bf16 copy or fp32 gradient (E, out, in), and the kernel's kept
activations (P, 2I) and (P, H). On a Linux CPU each gets its own private mapping with transparent
huge pages, which the next step's tensor of the same kind reuses once no tensor of the last step
uses it; ``release_kept`` gives them back when training ends. Why, with the measurements: the
section "Experts kernel: measurements behind its choices" of docs/speed.md.
"""

from __future__ import annotations

import mmap
import weakref
from typing import NamedTuple

import torch
from torch import nn

from moe_tune.model.loading import TRAIN_MMAP_THRESHOLD

CAST_ON_USE_ATTR = "_moe_tune_cast_on_use"  # on an experts module: see experts_policy.cast_on_use


class Kept(NamedTuple):
    """Names a step buffer whose mapping outlives its tensor, for the next step's to reuse."""

    experts: nn.Module  # the experts module the buffer belongs to
    what: str  # which of its buffers: "up copy", "down gradient", "up output", ...


class _Mapping(NamedTuple):
    """A kept buffer's pages, and a weak reference to the view the last step's tensor was made on
    (dead once every tensor on it is gone)."""

    pages: mmap.mmap
    last_view: weakref.ReferenceType


# {experts module: {Kept.what: _Mapping}}
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the owner of buffers that every layer uses in turn (one layer runs at a time): Kept(EVERY_LAYER, ...)
EVERY_LAYER = nn.Module()


def casts_on_use(experts: nn.Module) -> bool:
    """Whether ``experts`` casts each expert's weight when it uses it and keeps no activation
    buffers from step to step (experts_policy.cast_on_use: under activation checkpointing)."""
    return getattr(experts, CAST_ON_USE_ATTR, False)


def kept_activation(experts: nn.Module, what: str, on_use: bool) -> Kept | None:
    """The name under which ``experts`` keeps an activation buffer from step to step; None under
    activation checkpointing (``on_use``), which would then hold every layer's at once."""
    return None if on_use else Kept(experts, what)


def step_empty(shape: torch.Size, dtype: torch.dtype, device: torch.device,
               kept: Kept | None = None) -> torch.Tensor:
    """An uninitialised tensor that each training step needs anew. On a Linux CPU, at or above
    training's mmap threshold, it lives on a private mapping with transparent huge pages
    (madvise), faulted in 2 MiB pages rather than glibc's 4 KiB ones.

    With ``kept``, the mapping outlives the tensor and the next step's tensor reuses it, once no
    tensor of the last step uses it any more (a gradient still held, as gradient accumulation
    holds it, gets a new one): in a VM whose host takes freed pages back, pages touched anew fault
    in far slower than the matmuls fill them. Kept buffers are in memory between steps, which the
    plan already counts (gradients) or the forward holds at its peak anyway."""
    n = torch.Size(shape).numel()
    size = n * dtype.itemsize
    # below training's mmap threshold glibc serves the block from its heap, reusing freed memory
    if device.type != "cpu" or size < TRAIN_MMAP_THRESHOLD or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _KEPT.setdefault(kept.experts, {}) if kept is not None else {}
    last = buffers.get(kept.what) if kept is not None else None
    if last is None or len(last.pages) < size or last.last_view() is not None:
        pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        pages.madvise(mmap.MADV_HUGEPAGE)  # where THP is off ("never"), a plain private mapping
    else:
        pages = last.pages
    # the tensor's storage holds this view, and nothing else does: once every tensor on it is
    # gone (a gradient set to None), so is the view
    view = memoryview(pages)
    if kept is not None:
        buffers[kept.what] = _Mapping(pages, weakref.ref(view))
    return torch.frombuffer(view, dtype=dtype, count=n).view(shape)


def release_kept(model: nn.Module) -> None:
    """Give back the buffers that ``model``'s experts modules keep from step to step, once
    training ends."""
    for module in (*model.modules(), EVERY_LAYER):
        _KEPT.pop(module, None)


def _cast_whole(weight: torch.Tensor, dtype: torch.dtype, kept: Kept | None = None) -> torch.Tensor:
    """``weight.to(dtype)`` into a ``step_empty`` tensor."""
    if weight.dtype == dtype:
        return weight
    return step_empty(weight.shape, dtype, weight.device, kept).copy_(weight)


def held_weight(weight: torch.Tensor, dtype: torch.dtype, on_use: bool, kept: Kept) -> torch.Tensor:
    """The (E, out, in) weight the kernel's loop reads, in ``dtype``: cast once when wider (fp32
    weights under autocast), and kept for the backward; a narrower one (bf16 experts, fp32
    compute: evaluation), or any with ``on_use`` (cast_on_use), is cast per expert used, on use
    (experts_kernel._Side.weight)."""
    return _cast_whole(weight, dtype, kept) if weight.dtype.itemsize >= dtype.itemsize and not on_use else weight
