"""A faster routed-experts forward for training, plugged into transformers' experts interface.

transformers 5 runs fused experts (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) through
``F.grouped_mm``. For fine-tuning with LoRA on the experts that is slow: PEFT's LoRA on a fused
expert parameter rebuilds ``W + s * B @ A`` for every expert on every forward, and the backward
then computes the full (E, out, in) weight gradient only to project it onto the LoRA factors.

``experts_forward`` sorts the (token, expert) pairs by expert and applies LoRA to the grouped
inputs, ``y += s * B_e (A_e x)``: no weight delta is built, and a frozen base weight gets no
gradient. On a CPU the whole routed MLP runs expert by expert as plain matmuls on each expert's
tokens, in the compute dtype (bf16 under autocast, which ``grouped_mm`` ignores), inside one
autograd node per layer (``_ExpertsMLP``); on CUDA it uses transformers' grouped kernel.
PEFT keeps owning the LoRA factors (saving, loading and merging for export are PEFT's); see
``route_lora_through``. Numerics equal transformers' and PEFT's (tests/test_fast_experts.py).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from moe_tune.model.loading import TRAIN_MMAP_THRESHOLD, checkpoint_dtypes

try:  # transformers' gate for experts classes that define none: gate, up = chunk(2); act(gate) * up
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate
except ImportError:  # another transformers: every activation goes through autograd (_Activation)
    _default_apply_gate = SiLUActivation = None

NAME = "moe_tune"  # the name registered in transformers' ExpertsInterface
LORA_ATTR = "_moe_tune_lora"  # on an experts module: {parameter name: PEFT ParamWrapper}
CAST_ON_USE_ATTR = "_moe_tune_cast_on_use"  # on an experts module: see cast_on_use


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: PLC0415

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)


def use_fast_experts(model: nn.Module) -> bool:
    """Switch every fused-experts module of ``model`` to ``experts_forward``; False when the
    model's experts do not go through transformers' experts interface (nothing changes)."""
    if not getattr(model, "_can_set_experts_implementation", lambda: False)():
        return False
    register()
    model.set_experts_implementation(NAME)
    return True


def stored_in_bf16(path: str) -> bool:
    """Whether the checkpoint folder ``path`` stores every floating-point tensor in bf16, as
    published MoE checkpoints do, routed experts (names with ``.experts.``) among them. Loading
    it in bf16 then rounds nothing: a tensor kept in fp32 (a norm, a router bias) would be."""
    dtypes = checkpoint_dtypes(path)
    if any(d in ("F32", "F16", "F64", "F8_E4M3", "F8_E5M2") for d in dtypes.values()):
        return False
    return any(".experts." in key for key in dtypes)


def holds_frozen_experts_in_bf16(recipe, sft_args, routed_experts_mode: str) -> bool:
    """Whether a run loads its frozen routed experts in bf16 and keeps them so, with every other
    weight in fp32 (loading.load_model's ``bf16_experts``).

    Under bf16 autocast on a CPU, ``_ExpertsMLP`` would cast each fp32 expert weight to bf16
    on every forward and keep that copy for the backward. Where the checkpoint stores the experts
    in bf16, fp32 would only widen them: kept in bf16 they hold the same values, the kernel
    computes exactly the same, a frozen expert weight takes 2 bytes instead of 4 (plus 2 for the
    copy), no step casts it, and loading never materialises them in fp32. A saved model stores
    them in bf16, as the checkpoint did. Only on a CPU, with fp32 weights, bf16 autocast, this
    kernel, and no FSDP or DeepSpeed (which shard parameters by dtype)."""
    return (not torch.cuda.is_available() and bool(sft_args.bf16) and recipe.model.dtype == "float32"
            and recipe.model.bits is None and recipe.model.experts_implementation == NAME
            and routed_experts_mode != "train" and not sft_args.fsdp and not sft_args.deepspeed
            and stored_in_bf16(recipe.model.path))


def cast_on_use(model: nn.Module, expert_modules: list[str], on: bool) -> None:
    """With ``on``, the CPU loop casts each expert's weight to the compute dtype when it uses it,
    in forward and again in backward, instead of casting the whole (E, out, in) tensor once and
    keeping that copy from forward to backward: for activation checkpointing, whose point is
    memory. At the Qwen3-30B-A3B shape the copy is 1.2 GB per layer, which checkpointing would
    otherwise hold through each layer's backward. Nor do the layers keep their activation
    buffers from step to step then (_step_empty's ``kept``)."""
    for name in expert_modules:
        setattr(model.get_submodule(name), CAST_ON_USE_ATTR, on)


def _grouped(x: torch.Tensor) -> bool:
    """One grouped kernel launch per projection on CUDA; on CPU a loop over experts of plain
    matmuls, which autocast runs in bf16 and whose weight gradients are plain matmuls too."""
    return x.device.type == "cuda"


ROW_BLOCK = 64  # see _padded_rows
# Under bf16 an expert's rows go through its matmuls in pieces of at most this many (a multiple
# of ROW_BLOCK), so that the row counts oneDNN compiles kernels for are at most ROW_PIECE /
# ROW_BLOCK whatever the routing: with 8 experts of 512 tokens on average, padded counts ran from
# 64 to 1856 (29 values, 12 kernels each), every new one a compile of 0.3-1.7 ms, and oneDNN
# kept each compiled kernel, 0.26 GB more in 12 steps and growing (benchmark shape, lora_experts).
ROW_PIECE = 512


def _padded_rows(n: int, low_precision: bool) -> int:
    """The row count an expert's n tokens are zero-padded to. oneDNN's bf16 (AMX) matmuls compile
    a kernel per shape, and with a new token count per expert on every step that compile costs
    more than the matmul (0.07-0.24 against 0.3-0.6 TFLOP/s measured). Rounded up to a multiple
    of ROW_BLOCK, or below that to a power of two (generation's few tokens per expert would
    otherwise grow up to 64-fold), the shapes are few and stay cached. fp32 goes to MKL, which
    needs no padding."""
    if not low_precision:
        return n
    block = min(ROW_BLOCK, 1 << (n - 1).bit_length())
    return n + -n % block


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# per experts module: {what: (its mapping, a weak reference to the view the last step's tensor uses)}
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_empty(shape: torch.Size, dtype: torch.dtype, device: torch.device,
                kept: tuple[nn.Module, str] | None = None) -> torch.Tensor:
    """An uninitialised tensor that each training step needs anew: a whole experts weight's bf16
    copy or fp32 gradient (E, out, in), or the kernel's kept activations (P, 2I) and (P, H). On a Linux
    CPU it gets its own private mapping with transparent huge pages (madvise): the kernel then
    faults it in 2 MiB pages rather than 4 KiB ones, where glibc's own mapping of so large a
    block takes a fault per 4 KiB. Measured at the Qwen3-30B-A3B shape (1 layer; Intel Xeon, THP in
    madvise mode): full fine-tuning (1.2 GB of copies and 2.4 GB of gradients a step) took 5.5 s
    a step against 7.0 s; lora_experts (a 52 MB activation) 2.1 s against 2.4 s.

    With ``kept`` (the experts module, and which of its buffers this is), the mapping outlives the
    tensor and the next step's tensor reuses it, once no tensor of the last step uses it any more
    (a gradient still held, as gradient accumulation holds it, gets a new one). Memory that a
    process frees and faults in again can cost far more than the matmuls that fill it: in a VM
    whose host takes freed pages back (free page reporting; this project's machines), pages
    touched anew faulted in at 0.2 GB/s against 3-17 GB/s for pages the host still backed
    (AMD EPYC, 2026-12-03), and the 2.4 GB of expert gradients a step of full fine-tuning writes
    at the Qwen3 shape took about 10 s of a 16-20 s step. Kept, they are in memory between steps
    as well, which the plan already counts (gradients) or which the forward holds at its peak
    anyway; under activation checkpointing the activations are not kept (see _ExpertsMLP)."""
    n = torch.Size(shape).numel()
    # below training's mmap threshold glibc serves the block from its heap, reusing freed memory
    if device.type != "cpu" or n * dtype.itemsize < TRAIN_MMAP_THRESHOLD or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _KEPT.setdefault(kept[0], {}) if kept is not None else {}
    pages, last_view = buffers.get(kept[1] if kept else None, (None, lambda: None))
    if pages is None or len(pages) < n * dtype.itemsize or last_view() is not None:
        pages = mmap.mmap(-1, n * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        pages.madvise(mmap.MADV_HUGEPAGE)  # where THP is off ("never"), a plain private mapping
    # the tensor's storage holds this view, and nothing else does: once every tensor on it is
    # gone (a gradient set to None), so is the view
    view = memoryview(pages)
    if kept is not None:
        buffers[kept[1]] = (pages, weakref.ref(view))
    return torch.frombuffer(view, dtype=dtype, count=n).view(shape)


def release_kept(model: nn.Module) -> None:
    """Give back the buffers that ``model``'s experts modules keep from step to step (_step_empty),
    once training ends."""
    for module in model.modules():
        _KEPT.pop(module, None)


def _cast_whole(weight: torch.Tensor, dtype: torch.dtype, kept: tuple[nn.Module, str] | None = None) -> torch.Tensor:
    """``weight.to(dtype)`` into a ``_step_empty`` tensor."""
    if weight.dtype == dtype:
        return weight
    return _step_empty(weight.shape, dtype, weight.device, kept).copy_(weight)


def _slice(w: torch.Tensor, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's weight in ``dtype`` (a copy only where w is held narrower)."""
    return w[e].to(dtype)


def _held(weight: torch.Tensor, dtype: torch.dtype, on_use: bool, kept: tuple[nn.Module, str]) -> torch.Tensor:
    """The (E, out, in) weight the loop reads, in ``dtype``: cast once when wider (fp32 weights
    under autocast), and kept for the backward; a narrower one (bf16 experts, fp32 compute:
    evaluation), or any with ``on_use`` (cast_on_use), is cast per expert used, on use (_slice)."""
    return _cast_whole(weight, dtype, kept) if weight.dtype.itemsize >= dtype.itemsize and not on_use else weight


class _Route:
    """A layer's (token, slot) pairs grouped by expert, computed once for both projections and
    the backward. S = T * k grouped rows; expert e's rows are ``counts[e]`` consecutive ones,
    which the loop runs zero-padded to ``_padded_rows`` rows: P rows in all."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, low_precision: bool):
        tokens, k = top_k_index.shape
        ids = top_k_index.reshape(-1)  # (S,)
        self.order = torch.argsort(ids, stable=True)  # (S,): (token, slot) pairs grouped by expert
        self.counts = torch.bincount(ids, minlength=num_experts).tolist()
        self.tokens = self.order // k  # (S,): the token of each grouped row
        rows = [_padded_rows(n, low_precision) if n else 0 for n in self.counts]
        self.starts = [0, *itertools.accumulate(self.counts)][:-1]
        self.padded_starts = [0, *itertools.accumulate(rows)][:-1]
        # (P,): each expert's tokens, then its pad rows pointing at row T (the zero row that
        # _ExpertsMLP appends to the hidden states and their gradient), so one gather pads
        shift = torch.tensor([p - s for p, s in zip(self.padded_starts, self.starts)], device=ids.device)
        at = torch.arange(ids.numel(), device=ids.device) + shift.repeat_interleave(
            torch.tensor(self.counts, device=ids.device), output_size=ids.numel())
        self.padded_tokens = torch.full((sum(rows),), tokens, dtype=torch.long, device=ids.device)
        self.padded_tokens[at] = self.tokens
        self.rows = rows
        self.piece = ROW_PIECE if low_precision else max(rows, default=0)
        self.largest = min(max(rows, default=0), self.piece)  # the most rows one matmul runs on

    def pieces(self):
        """(expert, its row count n in this piece, the piece's padded count p, its first grouped
        row, its first padded row, whether it is the expert's first piece) for every expert that
        received tokens, in pieces of at most ROW_PIECE padded rows under bf16 (see ROW_PIECE).
        Only the last piece of an expert has pad rows, and every piece has a real row."""
        for e, n in enumerate(self.counts):
            if not n:
                continue
            rows, s, ps = self.rows[e], self.starts[e], self.padded_starts[e]
            step = min(self.piece, rows)
            for j in range(0, rows, step):
                yield e, min(step, n - j), min(step, rows - j), s + j, ps + j, j == 0


class _Side:
    """One projection inside ``_ExpertsMLP``: weight (E, out, in), or (E, in, out) when
    transposed, bias (E, out), LoRA A (E, r, in) and B (E, out, r), held in the compute dtype.
    ``kept``: (the experts module, "up" or "down"), whose large buffers _step_empty keeps."""

    def __init__(self, w, bias, a, b, scaling, transposed, dtype, w_dtype, lora_dtype, kept):
        self.w, self.bias, self.a, self.b, self.kept = w, bias, a, b, kept
        self.scaling, self.transposed, self.dtype = scaling, transposed, dtype
        self.w_dtype, self.lora_dtype, self.lora = w_dtype, lora_dtype, a is not None
        self.out_features = w.shape[2] if transposed else w.shape[1]
        self.rank = a.shape[1] if self.lora else 0

    @classmethod
    def held(cls, weight, bias, lora_a, lora_b, scaling, transposed, dtype, on_use, kept) -> _Side:
        """From the module's tensors: each cast to the compute dtype once (the weight as ``_held``)."""
        lora = lora_a is not None
        return cls(_held(weight, dtype, on_use, (kept[0], f"{kept[1]} copy")),
                   bias.to(dtype) if bias is not None else None,
                   lora_a.to(dtype) if lora else None, lora_b.to(dtype) if lora else None, scaling, transposed,
                   dtype, weight.dtype, lora_a.dtype if lora else None, kept)

    def tensors(self) -> list:
        return [self.w, self.bias, self.a, self.b]

    def forward(self, x: torch.Tensor, e: int, y: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """y (p, out) = x (p, in) W_e^T + s (x A_e^T) B_e^T + bias_e, written into y; x A_e^T into h
        (p, r), kept for B's gradient. LoRA's term is added while y is in cache."""
        we = _slice(self.w, e, self.dtype)
        torch.mm(x, we if self.transposed else we.t(), out=y)
        if self.lora:
            torch.mm(x, self.a[e].t(), out=h)
            y.addmm_(h, self.b[e].t(), alpha=self.scaling)
        if self.bias is not None:
            y += self.bias[e]
        return y

    def backward(self, g, e, x, h, grads, need_in, first):
        """g (p, out), the gradient of y; x (p, in) and h (p, r) as in forward -> the gradient of x
        (p, in) when ``need_in``; each trained tensor's gradient goes into its expert's slice of
        ``grads`` (weight, bias, A, B: None where not trained), written by the expert's ``first``
        piece of rows and added to by the others (_Route.pieces). Zero pad rows of g add nothing."""
        grad_w, grad_bias, grad_a, grad_b = grads
        gh = g @ self.b[e] if self.lora and (need_in or grad_a is not None) else None  # (p, r): g B_e
        grad_in = None
        if need_in:
            we = _slice(self.w, e, self.dtype)
            grad_in = g @ (we.t() if self.transposed else we)  # (p, in)
            if gh is not None:
                grad_in.addmm_(gh, self.a[e], alpha=self.scaling)
        if grad_w is not None:  # (out, in), or (in, out) transposed
            left, right = (x.t(), g) if self.transposed else (g.t(), x)
            if grad_w.dtype == g.dtype:  # straight into the slice: a copy of each expert's gradient less
                torch.mm(left, right, out=grad_w[e]) if first else grad_w[e].addmm_(left, right)
            elif first:  # bf16 compute, fp32 gradient: the copy is the cast
                grad_w[e] = left @ right
            else:
                grad_w[e] += left @ right
        # the bias's and LoRA's gradient buffers start at zero (gradients)
        if grad_bias is not None:
            grad_bias[e] += g.sum(0, dtype=torch.float32)
        if grad_a is not None:
            grad_a[e] += gh.t() @ x  # (r, in)
        if grad_b is not None:
            grad_b[e] += g.t() @ h  # (out, r)
        return grad_in

    def gradients(self, needs: tuple[bool, bool, bool, bool]) -> list:
        """Buffers for the gradients of (weight, bias, A, B), None where not needed: the weight's
        in its own dtype (an expert without tokens gets zeros), LoRA's summed in fp32."""
        need_w, need_bias, need_a, need_b = needs
        w = self.w
        return [_step_empty(w.shape, self.w_dtype, w.device, (self.kept[0], f"{self.kept[1]} gradient"))
                if need_w else None,
                torch.zeros(w.shape[0], self.out_features, dtype=torch.float32, device=w.device) if need_bias else None,
                torch.zeros(self.a.shape, dtype=torch.float32, device=w.device) if need_a else None,
                torch.zeros(self.b.shape, dtype=torch.float32, device=w.device) if need_b else None]

    def returned(self, grads, route: _Route, bias_dtype) -> list:
        """``gradients``' buffers as autograd wants them: an unused expert's weight gradient zeroed,
        the bias's in its own dtype, LoRA's scaled and in the factors' dtype."""
        grad_w, grad_bias, grad_a, grad_b = grads
        if grad_w is not None:
            for e, n in enumerate(route.counts):
                if not n:
                    grad_w[e] = 0
        return [grad_w, grad_bias.to(bias_dtype) if grad_bias is not None else None,
                *(g.mul_(self.scaling).to(self.lora_dtype) if g is not None else None for g in (grad_a, grad_b))]


def _silu_gated(experts: nn.Module) -> bool:
    """Whether ``experts`` gate with transformers' default gate and SiLU (Mixtral, Qwen, OLMoE,
    DeepSeek): _Activation differentiates that one itself."""
    return (experts.has_gate and _default_apply_gate is not None
            and getattr(type(experts), "_apply_gate", None) is _default_apply_gate
            and type(experts.act_fn) in (nn.SiLU, SiLUActivation))


class _Activation:
    """An expert's activation, recomputed in the backward from its kept up-projection output ue
    (p, 2I), or (p, I) without a gate, and its gradient there. The default SiLU gate
    (``_silu_gated``: silu(gate) * up of ue's halves) is differentiated here into the rows of
    ``buffer`` (max p, 2I), which every expert of the layer reuses; through autograd, the gate's
    chunk backward concatenated the halves' gradients into a fresh (p, 2I) tensor per expert,
    and faulting in its pages took 0.3 s a step at the benchmark shape (fp32, AMD EPYC). Other
    activations (gpt-oss's clamped gate, ...) go through autograd."""

    def __init__(self, experts: nn.Module, ue: torch.Tensor, buffer: torch.Tensor | None):
        self.buffer = buffer
        if buffer is not None:
            half = ue.shape[1] // 2
            self.gate, self.up = ue[:, :half], ue[:, half:]  # (p, I) each
            self.silu = F.silu(self.gate)
            self.out = self.silu * self.up  # (p, I)
            return
        with torch.enable_grad():
            self.ue = ue.detach().requires_grad_()
            self.ae = experts._apply_gate(self.ue) if experts.has_gate else experts.act_fn(self.ue)  # (p, I)
        self.out = self.ae.detach()

    def grad(self, ga: torch.Tensor) -> torch.Tensor:
        """ga (p, I), the output's gradient -> ue's (p, 2I) or (p, I)."""
        if self.buffer is None:
            return torch.autograd.grad(self.ae, self.ue, ga)[0]
        half = self.gate.shape[1]
        gu = self.buffer[:ga.shape[0]]
        torch.mul(ga, self.silu, out=gu[:, half:])  # d/d up = ga silu(gate)
        torch.mul(ga, self.up, out=gu[:, :half])  # d/d gate = ga up silu'(gate)
        torch.ops.aten.silu_backward.grad_input(gu[:, :half], self.gate, grad_input=gu[:, :half])
        return gu


class _ExpertsMLP(torch.autograd.Function):
    """A layer's whole routed-experts MLP on a CPU as one autograd node, expert by expert:
    gather its tokens' hidden states (T, H), up-project (+ LoRA), activate, down-project (+ LoRA),
    weight by the routing weights and add into the (T, H) output in fp32. Each expert's rows pass
    through every step while they are in cache; the separate passes over all S = T * k routed
    rows that grouping, casting, weighting, un-sorting and summing over k would otherwise each
    take (and their backward passes) are gone, and so are their (S, H) tensors. The backward
    recomputes the gather and the activation per expert; it keeps the up-projection's output
    (P, 2I), and the down-projection's (P, H) only where the routing weights need a gradient.
    Autograd through per-expert slices of a weight would stack their E gradients into one
    tensor after the backward; here each expert's gradient goes straight into its slice.

    With ``weights`` None (a post-expert norm comes between the experts and the routing
    weights), it returns the down-projection's (S, H) grouped rows instead."""

    @staticmethod
    def forward(ctx, x, weights, up_w, up_b, up_a, up_lb, down_w, down_b, down_a, down_lb, route, spec):
        experts, dtype, combine = spec["experts"], spec["dtype"], weights is not None
        with torch.autocast(x.device.type, enabled=False):  # everything below is already in dtype
            up = _Side.held(up_w, up_b, up_a, up_lb, spec["up_scaling"], spec["transposed"], dtype, spec["on_use"],
                            (experts, "up"))
            down = _Side.held(down_w, down_b, down_a, down_lb, spec["down_scaling"], spec["transposed"], dtype,
                              spec["on_use"], (experts, "down"))
            tokens, hidden = x.shape
            xz = torch.cat([x.to(dtype), x.new_zeros(1, hidden, dtype=dtype)])  # (T + 1, H): row T is zero
            padded = len(route.padded_tokens)
            # their mappings are kept from step to step, but not under activation checkpointing
            # (cast_on_use), which would then hold every layer's at once
            kept = (lambda what: None) if spec["on_use"] else (lambda what: (experts, what))
            # (P, 2I) or (P, I), kept for the activation's backward
            u = _step_empty((padded, up.out_features), dtype, x.device, kept("up output"))
            hu = xz.new_empty(padded, up.rank) if up.lora else None  # (P, r): x A^T, for B's gradient
            hd = xz.new_empty(padded, down.rank) if down.lora else None
            keep_d = not combine or ctx.needs_input_grad[1]  # the routing weights' gradient needs it
            d = _step_empty((padded, hidden), dtype, x.device, kept("down output")) if keep_d else None  # (P, H)
            w = weights.to(dtype) if combine else None  # (S,) routing weights, grouped
            out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device) if combine else \
                xz.new_empty(len(route.tokens), hidden)
            for e, n, p, s, ps, _ in route.pieces():
                xe = xz.index_select(0, route.padded_tokens[ps:ps + p])  # (p, H), zero pad rows
                ue = up.forward(xe, e, u[ps:ps + p], hu[ps:ps + p] if up.lora else None)  # (p, 2I)
                ae = experts._apply_gate(ue) if experts.has_gate else experts.act_fn(ue)  # (p, I)
                de = d[ps:ps + p] if keep_d else xz.new_empty(p, hidden)
                down.forward(ae, e, de, hd[ps:ps + p] if down.lora else None)  # (p, H)
                if combine:  # weighted in dtype, summed over the k slots in fp32, as transformers does
                    out.index_add_(0, route.tokens[s:s + n], (de[:n] * w[s:s + n, None]).float())
                else:
                    out[s:s + n] = de[:n]
        ctx.save_for_backward(xz, u, d, hu, hd, w, *up.tensors(), *down.tensors())
        ctx.route, ctx.spec, ctx.combine, ctx.x_dtype = route, spec, combine, x.dtype
        ctx.weights_dtype = weights.dtype if combine else None
        ctx.sides = [(s.w_dtype, s.lora_dtype) for s in (up, down)]
        ctx.bias_dtypes = [b.dtype if b is not None else None for b in (up_b, down_b)]
        return out.to(x.dtype) if combine else out

    @staticmethod
    def backward(ctx, grad_out):
        xz, u, d, hu, hd, w, *held = ctx.saved_tensors
        route, spec, combine = ctx.route, ctx.spec, ctx.combine
        experts, dtype = spec["experts"], spec["dtype"]
        needs = ctx.needs_input_grad
        need_x, need_weights = needs[0], needs[1]
        up, down = (_Side(*tensors, scaling, spec["transposed"], dtype, w_dtype, lora_dtype, (experts, name))
                    for tensors, scaling, (w_dtype, lora_dtype), name in zip(  # as forward held them
                        (held[:4], held[4:]), (spec["up_scaling"], spec["down_scaling"]), ctx.sides, ("up", "down")))
        up_grads, down_grads = up.gradients(needs[2:6]), down.gradients(needs[6:10])
        need_up = need_x or any(g is not None for g in up_grads)
        with torch.autocast(xz.device.type, enabled=False):
            hidden = xz.shape[1]
            if combine:  # (T + 1, H) in dtype, row T zero: one gather pads
                gz = torch.cat([grad_out.to(dtype), grad_out.new_zeros(1, hidden, dtype=dtype)])
            else:
                g_rows = grad_out.to(dtype)  # (S, H) grouped
            grad_x = torch.zeros(xz.shape[0] - 1, hidden, dtype=torch.float32, device=xz.device) if need_x else None
            grad_weights = torch.zeros(len(route.tokens), dtype=torch.float32, device=xz.device) \
                if need_weights else None
            # (max p, 2I): each expert's activation gradient in turn (_Activation)
            buffer = u.new_empty(route.largest if need_up else 0, u.shape[1]) if _silu_gated(experts) else None
            for e, n, p, s, ps, first in route.pieces():
                if combine:
                    ge = gz.index_select(0, route.padded_tokens[ps:ps + p])  # (p, H), zero pad rows
                    if need_weights:
                        grad_weights[s:s + n] = (ge[:n].float() * d[ps:ps + n].float()).sum(1)
                    ge[:n] *= w[s:s + n, None]
                else:
                    ge = F.pad(g_rows[s:s + n], (0, 0, 0, p - n))  # (p, H), zero pad rows
                act = _Activation(experts, u[ps:ps + p], buffer)  # the activation again, for its gradient
                ga = down.backward(ge, e, act.out, hd[ps:ps + p] if down.lora else None, down_grads, need_up, first)
                if not need_up:
                    continue
                gu = act.grad(ga)  # (p, 2I) or (p, I)
                xe = xz.index_select(0, route.padded_tokens[ps:ps + p]) \
                    if up_grads[0] is not None or up_grads[2] is not None else None
                gx = up.backward(gu, e, xe, hu[ps:ps + p] if up.lora else None, up_grads, need_x, first)
                if need_x:
                    grad_x.index_add_(0, route.tokens[s:s + n], gx[:n].float())
        return (grad_x.to(ctx.x_dtype) if need_x else None,
                grad_weights.to(ctx.weights_dtype) if need_weights else None,
                *up.returned(up_grads, route, ctx.bias_dtypes[0]),
                *down.returned(down_grads, route, ctx.bias_dtypes[1]), None, None)


class _Projection:
    """One fused expert parameter (E, out, in), or (E, in, out) when transposed, with its bias
    (E, out) and LoRA factors (A (E, r, in), B (E, out, r), scaling), or None for each."""

    def __init__(self, experts: nn.Module, name: str):
        self.weight = getattr(experts, name)
        self.bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
        self.transposed = experts.is_transposed
        wrappers = getattr(experts, LORA_ATTR, {})
        # PEFT's own path is running (it parametrizes the weight with its delta): add nothing here
        parametrized = parametrize.is_parametrized(experts)
        self.lora = None if parametrized or name not in wrappers else _lora_factors(wrappers[name])

    def tensors(self) -> list:
        a, b = self.lora[:2] if self.lora is not None else (None, None)
        return [self.weight, self.bias, a, b]

    @property
    def scaling(self) -> float:
        return self.lora[2] if self.lora is not None else 1.0

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return _project_grouped(x, self.weight, self.bias, self.lora, offsets, self.transposed)


def _project_grouped(x, weight, bias, lora, offsets, transposed):
    """The same with transformers' grouped kernel (CUDA): one launch per projection."""
    from transformers.integrations.moe import _grouped_linear  # noqa: PLC0415

    y = _grouped_linear(x, weight, offsets, is_transposed=transposed)
    if lora is not None:
        a, b, scaling = lora
        y = y + _grouped_linear(_grouped_linear(x, a, offsets), b, offsets) * scaling
    if bias is not None:
        y = y + bias.repeat_interleave(torch.diff(offsets, prepend=offsets.new_zeros(1)).long(), dim=0)
    return y


def _combined(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, tokens: int, k: int,
              dtype: torch.dtype) -> torch.Tensor:
    """y (S, H) grouped by expert, weights (S,) grouped likewise -> (T, H): weighted, back in
    (token, slot) order, summed over the k slots in fp32, as transformers' kernels do."""
    y = y * weights.unsqueeze(-1).to(y.dtype)  # (S, H)
    unsorted = torch.empty_like(y).index_copy_(0, order, y)
    return unsorted.view(tokens, k, -1).float().sum(1).to(dtype)


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states (T, H), top_k_index and top_k_weights (T, k) -> (T, H)."""
    if self._is_expert_parallel:  # expert parallelism pads with sentinel ids: transformers' kernel
        from transformers.integrations.moe import grouped_mm_experts_forward  # noqa: PLC0415

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    tokens, k = top_k_index.shape
    up = _Projection(self, "gate_up_proj" if self.has_gate else "up_proj")
    down = _Projection(self, "down_proj")
    if _grouped(hidden_states):
        expert_ids = top_k_index.reshape(-1)  # (S,) S = T * k
        order = torch.argsort(expert_ids, stable=True)  # (S,), grouped by expert
        offsets = torch.cumsum(torch.bincount(expert_ids, minlength=self.num_experts), 0, dtype=torch.int32)
        # index_select, not indexing: its backward is an index_add, 6x faster on CPU than
        # indexing's accumulating index_put, and bit-identical
        x = hidden_states.index_select(0, order // k)  # (S, H)
        h = self._apply_gate(up.grouped(x, offsets)) if self.has_gate else self.act_fn(up.grouped(x, offsets))
        y = down.grouped(h, offsets)  # (S, H)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        weights = top_k_weights.reshape(-1).index_select(0, order)  # (S,)
        return _combined(y, weights, order, tokens, k, hidden_states.dtype)
    dtype = _compute_dtype(hidden_states)
    route = _Route(top_k_index, self.num_experts, dtype in (torch.bfloat16, torch.float16))
    weights = top_k_weights.reshape(-1).index_select(0, route.order)  # (S,) routing weights, grouped
    spec = {"experts": self, "dtype": dtype, "transposed": self.is_transposed, "up_scaling": up.scaling,
            "down_scaling": down.scaling, "on_use": getattr(self, CAST_ON_USE_ATTR, False)}
    if not self.has_post_expert_norm:
        return _ExpertsMLP.apply(hidden_states, weights, *up.tensors(), *down.tensors(), route, spec)
    y = _ExpertsMLP.apply(hidden_states, None, *up.tensors(), *down.tensors(), route, spec)  # (S, H)
    return _combined(self.post_expert_norm(y), weights, route.order, tokens, k, hidden_states.dtype)


# --- PEFT internals -------------------------------------------------------------------------------
# moe_tune's one reach into PEFT: the LoRA factors of a ParamWrapper (their layout, scaling and
# active adapter) and the rebinding of its forward. Kept here alone, and guarded by
# tests/test_fast_experts.py (test_lora_really_goes_through_the_grouped_inputs and the numeric
# comparisons with PEFT's own path), which fail if PEFT changes underneath.

def _lora_factors(wrapper) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A (E, r, in), B (E, out, r), scaling) of a PEFT ParamWrapper's one active adapter, or
    None when it contributes nothing here (adapters disabled, merged into the weight, or not
    exactly one active adapter: then PEFT's own forward handles it)."""
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if wrapper.disable_adapters or wrapper.merged or len(active) != 1:
        return None
    name, experts = active[0], wrapper.num_experts
    a = wrapper.lora_A[name].weight  # (r*E, in): rows grouped by expert, r per expert
    b = wrapper.lora_B[name].weight  # (out, r*E): columns interleaved, expert index fastest
    a = a.view(experts, -1, a.shape[-1])  # (E, r, in)
    b = b.view(b.shape[0], -1, experts).permute(2, 0, 1).contiguous()  # (E, out, r), small
    return a, b, wrapper.scaling[name]


def route_lora_through(model: nn.Module) -> int:
    """Point PEFT's LoRA on fused expert parameters at ``experts_forward``.

    Each expert parameter LoRA targets gets a PEFT ``ParamWrapper`` (nested when several
    parameters of one module are targeted). The experts module learns its wrappers; the
    outermost wrapper's forward calls the experts module directly when every wrapper has one
    plain active adapter, and falls back to PEFT's own forward otherwise (several adapters,
    merged, disabled). Returns the number of experts modules rerouted."""
    from peft.tuners.lora.layer import ParamWrapper  # noqa: PLC0415

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    rerouted = 0
    for outer in (w for w in wrappers if id(w) not in inner):
        experts = outer.get_base_layer()
        # PEFT also wraps plain Linear weights targeted as parameters: only fused experts reroute
        if getattr(getattr(experts, "config", None), "_experts_implementation", None) != NAME:
            continue
        chain, layer = {}, outer
        while isinstance(layer, ParamWrapper):
            chain[layer.parameter_name] = layer
            layer = layer.base_layer
        setattr(experts, LORA_ATTR, chain)
        outer.forward = types.MethodType(_rerouted_forward(outer.forward, experts, list(chain.values())), outer)
        rerouted += 1
    return rerouted


def _rerouted_forward(peft_forward, experts, chain):
    def forward(self, x, *args, **kwargs):
        if "adapter_names" not in kwargs and all(_lora_factors(w) is not None for w in chain):
            return experts(x, *args, **kwargs)
        return peft_forward(x, *args, **kwargs)
    return forward
