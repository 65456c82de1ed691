"""A faster routed-experts forward for training, plugged into transformers' experts interface.

transformers 5 runs fused experts (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) through
``F.grouped_mm``. For fine-tuning with LoRA on the experts that is slow: PEFT's LoRA on a fused
expert parameter rebuilds ``W + s * B @ A`` for every expert on every forward, and the backward
then computes the full (E, out, in) weight gradient only to project it onto the LoRA factors.

``experts_forward`` sorts the (token, expert) pairs by expert and applies LoRA to the grouped
inputs, ``y += s * B_e (A_e x)``: no weight delta is built, and a frozen base weight gets no
gradient. On a CPU each projection runs as plain matmuls on each expert's slice of tokens, in
the compute dtype (bf16 under autocast, which ``grouped_mm`` ignores), inside one autograd node
per projection (``_ExpertsMatmul``); on CUDA it uses transformers' grouped kernel.
PEFT keeps owning the LoRA factors (saving, loading and merging for export are PEFT's); see
``route_lora_through``. Numerics equal transformers' and PEFT's (tests/test_fast_experts.py).
"""

from __future__ import annotations

import contextlib
import mmap
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from moe_tune.loading import TRAIN_MMAP_THRESHOLD

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
    from safetensors import safe_open  # noqa: PLC0415

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    experts = False
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if f.get_slice(key).get_dtype() in ("F32", "F16", "F64", "F8_E4M3", "F8_E5M2"):
                    return False
                experts = experts or ".experts." in key
    return experts


def holds_frozen_experts_in_bf16(recipe, sft_args, routed_experts_mode: str) -> bool:
    """Whether a run loads its frozen routed experts in bf16 and keeps them so, with every other
    weight in fp32 (loading.load_model's ``bf16_experts``).

    Under bf16 autocast on a CPU, ``_ExpertsMatmul`` would cast each fp32 expert weight to bf16
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
    otherwise hold through each layer's backward."""
    for name in expert_modules:
        setattr(model.get_submodule(name), CAST_ON_USE_ATTR, on)


def _grouped(x: torch.Tensor) -> bool:
    """One grouped kernel launch per projection on CUDA; on CPU a loop over experts of plain
    matmuls, which autocast runs in bf16 and whose weight gradients are plain matmuls too."""
    return x.device.type == "cuda"


ROW_BLOCK = 64  # see _padded_rows


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


def _padded(x: torch.Tensor, low_precision: bool) -> torch.Tensor:
    """x (n, k) zero-padded to ``_padded_rows`` rows: the rows an expert's matmuls run on (and
    their outputs are cut back to n). Zero rows add nothing to a weight gradient's sum."""
    pad = _padded_rows(x.shape[0], low_precision) - x.shape[0]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _whole_weight_empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (E, out, in) tensor for a whole experts weight's bf16 copy or fp32
    gradient, which each training step makes anew. On a Linux CPU it gets its own private
    mapping with transparent huge pages (madvise): the kernel then faults it in 2 MiB pages
    rather than 4 KiB ones (and unmaps it as fast), where glibc's own mapping of so large a block
    takes a fault per 4 KiB. Freed with the tensor, as glibc's is: the memory is the same.
    Measured at the Qwen3-30B-A3B shape (1 layer, full fine-tuning: 1.2 GB of copies and 2.4 GB
    of gradients a step; Intel Xeon, THP in madvise mode), a step took 5.5 s against 7.0 s.
    Activations are left to torch: lora_experts ran no faster with them here."""
    n = torch.Size(shape).numel()
    # below training's mmap threshold glibc serves the block from its heap, reusing freed memory
    if device.type != "cpu" or n * dtype.itemsize < TRAIN_MMAP_THRESHOLD or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, n * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(mmap.MADV_HUGEPAGE)  # where THP is off ("never"), a plain private mapping
    return torch.frombuffer(pages, dtype=dtype, count=n).view(shape)  # the tensor keeps the mapping


def _cast_whole(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)`` into a ``_whole_weight_empty`` tensor."""
    if weight.dtype == dtype:
        return weight
    return _whole_weight_empty(weight.shape, dtype, weight.device).copy_(weight)


def _slice(w: torch.Tensor, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's weight in ``dtype`` (a copy only where w is held narrower)."""
    return w[e].to(dtype)


class _ExpertsMatmul(torch.autograd.Function):
    """Each expert's rows of x times its weight, plus its LoRA, as one autograd node: x (S, in)
    grouped by expert (``counts`` rows each), weight (E, out, in), or (E, in, out) when
    transposed, bias (E, out), LoRA factors A (E, r, in) and B (E, out, r) -> (S, out), in
    ``dtype``: y_e = x_e W_e^T + s (x_e A_e^T) B_e^T. Autograd through per-expert slices of the
    weight would stack their E gradients into one tensor after the backward, a copy of every
    expert weight per step; here each expert's gradient goes straight into its slice, and each
    tensor is cast once. LoRA's term is added into each expert's output while it is in cache
    (and its gradient likewise), rather than as three more passes over the whole (S, out)
    output and three more in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, counts, transposed, dtype, on_use, scaling):
        # (E, out, in) in dtype: cast once when wider (fp32 weights under autocast), and kept for
        # the backward; a narrower one (bf16 experts, fp32 compute: evaluation), or any with
        # ``on_use`` (cast_on_use), is cast per expert used, on use (_slice)
        w = _cast_whole(weight, dtype) if weight.dtype.itemsize >= dtype.itemsize and not on_use else weight
        xc = x.to(dtype)  # (S, in)
        low = dtype in (torch.bfloat16, torch.float16)
        lora = lora_a is not None
        a, b = (lora_a.to(dtype), lora_b.to(dtype)) if lora else (None, None)  # (E, r, in), (E, out, r)
        y = xc.new_empty(x.shape[0], w.shape[2] if transposed else w.shape[1])  # (S, out)
        h = xc.new_empty(x.shape[0], a.shape[1]) if lora else None  # (S, r): x_e A_e^T, for B's gradient
        start = 0
        for e, n in enumerate(counts):
            if n:
                we = _slice(w, e, dtype)
                xp = _padded(xc[start:start + n], low)  # (p, in), p >= n
                yp = xp @ (we if transposed else we.t())  # (p, out)
                if lora:
                    hp = xp @ a[e].t()  # (p, r)
                    yp = torch.addmm(yp, hp, b[e].t(), alpha=scaling)
                    h[start:start + n] = hp[:n]
                y[start:start + n] = yp[:n]
            start += n
        if bias is not None:
            y += bias.to(dtype).repeat_interleave(torch.tensor(counts, device=x.device), dim=0)
        ctx.save_for_backward(xc, w, h, a, b)
        ctx.counts, ctx.transposed, ctx.low, ctx.x_dtype, ctx.w_dtype = counts, transposed, low, x.dtype, weight.dtype
        ctx.dtype, ctx.scaling = dtype, scaling
        ctx.lora_dtype = lora_a.dtype if lora else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, w, h, a, b = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        g = grad_y.to(ctx.dtype)  # (S, out)
        lora, low, scaling = a is not None, ctx.low, ctx.scaling
        grad_x = torch.empty_like(xc) if need_x else None  # (S, in)
        grad_w = _whole_weight_empty(w.shape, ctx.w_dtype, w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], g.shape[1], dtype=ctx.w_dtype, device=w.device) if need_b else None
        grad_a = torch.zeros(a.shape, dtype=torch.float32, device=a.device) if need_a else None  # (E, r, in)
        grad_lb = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_lb else None  # (E, out, r)
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:  # an expert without tokens: zero gradients
                if need_w:
                    grad_w[e] = 0
                continue
            gp = _padded(g[start:start + n], low)  # (p, out)
            xp = _padded(xc[start:start + n], low) if need_w or need_a else None  # (p, in)
            gh = gp @ b[e] if lora and (need_x or need_a) else None  # (p, r): g_e B_e
            if need_x:
                we = _slice(w, e, ctx.dtype)
                gxp = gp @ (we.t() if ctx.transposed else we)  # (p, in)
                if gh is not None:
                    gxp = torch.addmm(gxp, gh, a[e], alpha=scaling)
                grad_x[start:start + n] = gxp[:n]
            if need_w:  # (out, in), or (in, out) transposed; padded rows add nothing
                grad_w[e] = xp.t() @ gp if ctx.transposed else gp.t() @ xp
            if need_b:
                grad_b[e] = g[start:start + n].sum(0, dtype=torch.float32)
            if need_a:
                grad_a[e] = gh.t() @ xp  # (r, in)
            if need_lb:
                grad_lb[e] = gp.t() @ _padded(h[start:start + n], low)  # (out, r)
            start += n
        # summed in fp32, returned in the factors' own dtype
        grad_a, grad_lb = (grad.mul_(scaling).to(ctx.lora_dtype) if grad is not None else None
                           for grad in (grad_a, grad_lb))
        return ((grad_x.to(ctx.x_dtype) if need_x else None), grad_w, grad_b,
                grad_a, grad_lb, None, None, None, None, None)


class _Projection:
    """One fused expert parameter (E, out, in), or (E, in, out) when transposed, with its bias
    (E, out) and LoRA factors, split per expert for the CPU loop."""

    def __init__(self, experts: nn.Module, name: str):
        self.weight = getattr(experts, name)
        self.bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
        self.transposed = experts.is_transposed
        self.on_use = getattr(experts, CAST_ON_USE_ATTR, False)
        wrappers = getattr(experts, LORA_ATTR, {})
        # PEFT's own path is running (it parametrizes the weight with its delta): add nothing here
        parametrized = parametrize.is_parametrized(experts)
        self.lora = None if parametrized or name not in wrappers else _lora_factors(wrappers[name])

    def rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (S, in) grouped by expert -> (S, out), in the compute dtype (bf16 under autocast).
        LoRA on the input, no weight delta: y += s * B_e (A_e x)."""
        a, b, scaling = self.lora if self.lora is not None else (None, None, 1.0)  # (E, r, in), (E, out, r)
        return _ExpertsMatmul.apply(x, self.weight, self.bias, a, b, counts, self.transposed, _compute_dtype(x),
                                    self.on_use, scaling)

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


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states (T, H), top_k_index and top_k_weights (T, k) -> (T, H)."""
    if self._is_expert_parallel:  # expert parallelism pads with sentinel ids: transformers' kernel
        from transformers.integrations.moe import grouped_mm_experts_forward  # noqa: PLC0415

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    tokens, k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)  # (S,) S = T * k
    order = torch.argsort(expert_ids, stable=True)  # (S,), grouped by expert
    counts_t = torch.bincount(expert_ids, minlength=self.num_experts)  # (E,)
    offsets = torch.cumsum(counts_t, 0, dtype=torch.int32)  # (E,), for the grouped kernel
    # index_select, not indexing: its backward is an index_add, 6x faster on CPU than indexing's
    # accumulating index_put (17 against 3 ms per layer at T=2048, H=512), and bit-identical
    x = hidden_states.index_select(0, order // k)  # (S, H)
    up = _Projection(self, "gate_up_proj" if self.has_gate else "up_proj")
    down = _Projection(self, "down_proj")
    if _grouped(x):
        h = self._apply_gate(up.grouped(x, offsets)) if self.has_gate else self.act_fn(up.grouped(x, offsets))
        y = down.grouped(h, offsets)  # (S, H)
    else:
        counts = counts_t.tolist()
        h = up.rows(x, counts)  # (S, 2I) or (S, I)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (S, I), every expert at once
        y = down.rows(h, counts)  # (S, H)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    weights = top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)  # (S, 1), routing weights
    y = y * weights.to(y.dtype)  # (S, H)
    unsorted = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
    # summed over the k slots in fp32, as transformers' kernels do
    return unsorted.view(tokens, k, -1).float().sum(1).to(hidden_states.dtype)


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
