"""moe_tune's routed-experts kernel for training, registered in transformers' experts interface.

transformers 5 runs fused experts (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) through
``F.grouped_mm``. For fine-tuning with LoRA on the experts that is slow: PEFT's LoRA on a fused
expert parameter rebuilds ``W + s * B @ A`` for every expert on every forward, and the backward
then computes the full (E, out, in) weight gradient only to project it onto the LoRA factors.

``experts_forward`` sorts the (token, expert) pairs by expert and applies LoRA to the grouped
inputs, ``y += s * B_e (A_e x)``: no weight delta is built, and a frozen base weight gets no
gradient. On a CPU the whole routed MLP runs expert by expert as plain matmuls on each expert's
tokens, in the compute dtype (bf16 under autocast, which ``grouped_mm`` ignores), inside one
autograd node per layer (``_ExpertsMLP``); on CUDA it uses transformers' grouped kernel.
When it runs: experts_policy; rows grouped and cut into pieces: experts_route; per-step buffers:
step_memory; PEFT's factors: experts_lora.
Numerics equal transformers' and PEFT's (tests/test_experts_kernel.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from moe_tune.model.quantized_experts import QuantizedWeight, quantized_weight
from moe_tune.moe.experts_lora import LORA_ATTR, LoraFactors, lora_factors
from moe_tune.moe.experts_route import Piece, Route
from moe_tune.moe.step_memory import EVERY_LAYER, Kept, casts_on_use, held_weight, kept_activation, step_empty

try:  # transformers' gate for experts classes that define none: gate, up = chunk(2); act(gate) * up
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate
except ImportError:  # another transformers: every activation goes through autograd (_Activation)
    _default_apply_gate = SiLUActivation = None


def _grouped(x: torch.Tensor) -> bool:
    """One grouped kernel launch per projection on CUDA; on CPU a loop over experts of plain
    matmuls, which autocast runs in bf16 and whose weight gradients are plain matmuls too."""
    return x.device.type == "cuda"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _SideTensors(NamedTuple):
    """One projection's tensors: weight (E, out, in), or (E, in, out) when transposed, bias
    (E, out), LoRA A (E, r, in) and B (E, out, r); None where absent. Also their gradients."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    a: torch.Tensor | None
    b: torch.Tensor | None


class _SideSpec(NamedTuple):
    """One projection's settings in _ExpertsMLP, besides its tensors."""

    name: str  # "up" or "down", which names its kept buffers ("up copy", "down gradient", ...)
    scaling: float  # LoRA's; 1.0 without
    transposed: bool  # weight stored (E, in, out) (gpt-oss)


class _GivenDtypes(NamedTuple):
    """The dtypes of a projection's own tensors, which their gradients are returned in."""

    weight: torch.dtype
    bias: torch.dtype | None
    lora: torch.dtype | None


class _Call(NamedTuple):
    """One layer's call of _ExpertsMLP: everything but the tensors autograd differentiates."""

    experts: nn.Module
    route: Route
    dtype: torch.dtype  # the compute dtype: autocast's, else the hidden states'
    on_use: bool  # each expert's weight cast when used, activations not kept (step_memory.casts_on_use)
    up: _SideSpec
    down: _SideSpec


class _Side:
    """One projection inside ``_ExpertsMLP``, its tensors (``held``) in the compute dtype."""

    def __init__(self, held: _SideTensors, given: _GivenDtypes, spec: _SideSpec, call: _Call):
        self.held, self.given, self.spec = held, given, spec
        self.w, self.bias, self.a, self.b = held
        self.experts, self.dtype, self.lora = call.experts, call.dtype, held.a is not None
        self.out_features = self.w.shape[2] if spec.transposed else self.w.shape[1]
        self.rank = self.a.shape[1] if self.lora else 0
        self.dequantized, self.current = None, None  # a quantized weight's expert in use, and which

    def weight(self, e: int) -> torch.Tensor:
        """Expert e's weight in the compute dtype (a copy only where held narrower). A quantized
        one is dequantized into one buffer, which every layer reuses in turn, once for all of e's
        pieces (they come in a row): a fresh tensor per use would be new pages, faulted in anew."""
        if not isinstance(self.w, QuantizedWeight):
            return self.w[e].to(self.dtype)
        if self.current != e:
            if self.dequantized is None:
                self.dequantized = step_empty(self.w.shape[1:], self.dtype, self.w.device,
                                              Kept(EVERY_LAYER, f"{self.spec.name} dequantized"))
            self.w.expert(e, self.dtype, out=self.dequantized)
            self.current = e
        return self.dequantized

    @classmethod
    def of(cls, given: _SideTensors, spec: _SideSpec, call: _Call) -> _Side:
        """From the module's tensors: each cast to the compute dtype once (the weight as held_weight)."""
        dtype, lora, bias, weight = call.dtype, given.a is not None, given.bias, given.weight
        quantized = isinstance(weight, QuantizedWeight)  # dequantized per expert on use, never whole
        held = _SideTensors(weight if quantized else held_weight(weight, dtype, call.on_use,
                                                                 Kept(call.experts, f"{spec.name} copy")),
                            bias.to(dtype) if bias is not None else None,
                            given.a.to(dtype) if lora else None, given.b.to(dtype) if lora else None)
        dtypes = _GivenDtypes(given.weight.dtype, bias.dtype if bias is not None else None,
                              given.a.dtype if lora else None)
        return cls(held, dtypes, spec, call)

    def forward(self, x: torch.Tensor, e: int, y: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """y (p, out) = x (p, in) W_e^T + s (x A_e^T) B_e^T + bias_e, written into y; x A_e^T into h
        (p, r), kept for B's gradient. LoRA's term is added while y is in cache."""
        we = self.weight(e)
        torch.mm(x, we if self.spec.transposed else we.t(), out=y)
        if self.lora:
            torch.mm(x, self.a[e].t(), out=h)
            y.addmm_(h, self.b[e].t(), alpha=self.spec.scaling)
        if self.bias is not None:
            y += self.bias[e]
        return y

    def backward(self, g: torch.Tensor, piece: Piece, x: torch.Tensor | None, h: torch.Tensor | None,
                 grads: _SideTensors, need_in: bool) -> torch.Tensor | None:
        """g (p, out), the gradient of y; x (p, in) and h (p, r) as in forward -> the gradient of x
        (p, in) when ``need_in``; each trained tensor's gradient goes into its expert's slice of
        ``grads`` (None where not trained), written by the expert's first piece of rows and added
        to by the others. Zero pad rows of g add nothing."""
        e, first, scaling = piece.expert, piece.first, self.spec.scaling
        grad_w, grad_bias, grad_a, grad_b = grads
        gh = g @ self.b[e] if self.lora and (need_in or grad_a is not None) else None  # (p, r): g B_e
        grad_in = None
        if need_in:
            we = self.weight(e)
            grad_in = g @ (we.t() if self.spec.transposed else we)  # (p, in)
            if gh is not None:
                grad_in.addmm_(gh, self.a[e], alpha=scaling)
        if grad_w is not None:  # (out, in), or (in, out) transposed
            left, right = (x.t(), g) if self.spec.transposed else (g.t(), x)
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

    def gradients(self, needs: tuple[bool, bool, bool, bool]) -> _SideTensors:
        """Buffers for the gradients of (weight, bias, A, B), None where not needed: the weight's
        in its own dtype (an expert without tokens gets zeros), LoRA's summed in fp32."""
        need_w, need_bias, need_a, need_b = needs
        w = self.w
        return _SideTensors(
            step_empty(w.shape, self.given.weight, w.device, Kept(self.experts, f"{self.spec.name} gradient"))
            if need_w else None,
            torch.zeros(w.shape[0], self.out_features, dtype=torch.float32, device=w.device) if need_bias else None,
            torch.zeros(self.a.shape, dtype=torch.float32, device=w.device) if need_a else None,
            torch.zeros(self.b.shape, dtype=torch.float32, device=w.device) if need_b else None)

    def returned(self, grads: _SideTensors, route: Route) -> _SideTensors:
        """``gradients``' buffers as autograd wants them: an unused expert's weight gradient zeroed,
        the bias's in its own dtype, LoRA's scaled and in the factors' dtype."""
        grad_w, grad_bias, grad_a, grad_b = grads
        if grad_w is not None:
            for e, n in enumerate(route.counts):
                if not n:
                    grad_w[e] = 0
        return _SideTensors(
            grad_w, grad_bias.to(self.given.bias) if grad_bias is not None else None,
            *(g.mul_(self.spec.scaling).to(self.given.lora) if g is not None else None for g in (grad_a, grad_b)))


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
    ``buffer`` (max p, 2I), which every expert of the layer reuses, rather than into a fresh
    (p, 2I) tensor per expert whose pages autograd's chunk backward would fault in anew. Other
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
    through every step while they are in cache, with no separate pass (or (S, H) tensor) over all
    S = T * k routed rows for grouping, casting, weighting, un-sorting or summing over k. The
    backward recomputes the gather and the activation per expert; it keeps the up-projection's
    output (P, 2I), and the down-projection's (P, H) only where the routing weights need a
    gradient. Each expert's weight gradient goes straight into its slice of the layer's.

    ``apply(call, x, weights, *tensors)``: x (T, H); weights (S,), the routing weights grouped
    by expert, or None where a post-expert norm comes between the experts and the routing
    weights (then it returns the down-projection's (S, H) grouped rows); tensors, the up and
    then the down projection's _SideTensors, flat, so that autograd sees each."""

    @staticmethod
    def forward(ctx, call: _Call, x, weights, *tensors):
        experts, route, dtype, combine = call.experts, call.route, call.dtype, weights is not None
        with torch.autocast(x.device.type, enabled=False):  # everything below is already in dtype
            up = _Side.of(_SideTensors(*tensors[:4]), call.up, call)
            down = _Side.of(_SideTensors(*tensors[4:]), call.down, call)
            tokens, hidden = x.shape
            xz = torch.cat([x.to(dtype), x.new_zeros(1, hidden, dtype=dtype)])  # (T + 1, H): row T is zero
            padded = len(route.padded_tokens)
            # (P, 2I) or (P, I), kept for the activation's backward
            u = step_empty((padded, up.out_features), dtype, x.device,
                           kept_activation(experts, "up output", call.on_use))
            hu = xz.new_empty(padded, up.rank) if up.lora else None  # (P, r): x A^T, for B's gradient
            hd = xz.new_empty(padded, down.rank) if down.lora else None
            keep_d = not combine or ctx.needs_input_grad[2]  # the routing weights' gradient needs it
            d = step_empty((padded, hidden), dtype, x.device,
                           kept_activation(experts, "down output", call.on_use)) if keep_d else None  # (P, H)
            w = weights.to(dtype) if combine else None  # (S,) routing weights, grouped
            out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device) if combine else \
                xz.new_empty(len(route.tokens), hidden)
            for piece in route.pieces():
                rows, pad = piece.grouped, piece.padded
                xe = xz.index_select(0, route.padded_tokens[pad])  # (p, H), zero pad rows
                ue = up.forward(xe, piece.expert, u[pad], hu[pad] if up.lora else None)  # (p, 2I)
                ae = experts._apply_gate(ue) if experts.has_gate else experts.act_fn(ue)  # (p, I)
                de = d[pad] if keep_d else xz.new_empty(piece.p, hidden)
                down.forward(ae, piece.expert, de, hd[pad] if down.lora else None)  # (p, H)
                if combine:  # weighted in dtype, summed over the k slots in fp32, as transformers does
                    out.index_add_(0, route.tokens[rows], (de[:piece.n] * w[rows, None]).float())
                else:
                    out[rows] = de[:piece.n]
        held = (*up.held, *down.held)  # a quantized weight is no tensor: kept on ctx as it is
        ctx.save_for_backward(xz, u, d, hu, hd, w, *(None if isinstance(t, QuantizedWeight) else t for t in held))
        ctx.quantized = [t if isinstance(t, QuantizedWeight) else None for t in held]
        ctx.call, ctx.given, ctx.combine, ctx.x_dtype = call, (up.given, down.given), combine, x.dtype
        ctx.weights_dtype = weights.dtype if combine else None
        return out.to(x.dtype) if combine else out

    @staticmethod
    def backward(ctx, grad_out):
        xz, u, d, hu, hd, w, *held = ctx.saved_tensors
        held = [q if q is not None else t for t, q in zip(held, ctx.quantized)]
        call, combine = ctx.call, ctx.combine
        experts, route, dtype = call.experts, call.route, call.dtype
        needs = ctx.needs_input_grad  # (call, x, weights, up's 4 tensors, down's 4)
        need_x, need_weights = needs[1], needs[2]
        up = _Side(_SideTensors(*held[:4]), ctx.given[0], call.up, call)  # as forward held them
        down = _Side(_SideTensors(*held[4:]), ctx.given[1], call.down, call)
        up_grads, down_grads = up.gradients(needs[3:7]), down.gradients(needs[7:11])
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
            for piece in route.pieces():
                rows, pad, n = piece.grouped, piece.padded, piece.n
                if combine:
                    ge = gz.index_select(0, route.padded_tokens[pad])  # (p, H), zero pad rows
                    if need_weights:
                        grad_weights[rows] = (ge[:n].float() * d[pad][:n].float()).sum(1)
                    ge[:n] *= w[rows, None]
                else:
                    ge = F.pad(g_rows[rows], (0, 0, 0, piece.p - n))  # (p, H), zero pad rows
                act = _Activation(experts, u[pad], buffer)  # the activation again, for its gradient
                ga = down.backward(ge, piece, act.out, hd[pad] if down.lora else None, down_grads, need_up)
                if not need_up:
                    continue
                gu = act.grad(ga)  # (p, 2I) or (p, I)
                xe = xz.index_select(0, route.padded_tokens[pad]) \
                    if up_grads.weight is not None or up_grads.a is not None else None
                gx = up.backward(gu, piece, xe, hu[pad] if up.lora else None, up_grads, need_x)
                if need_x:
                    grad_x.index_add_(0, route.tokens[rows], gx[:n].float())
        return (None, grad_x.to(ctx.x_dtype) if need_x else None,
                grad_weights.to(ctx.weights_dtype) if need_weights else None,
                *up.returned(up_grads, route), *down.returned(down_grads, route))


class _Projection:
    """One fused expert parameter (E, out, in), or (E, in, out) when transposed, with its bias
    (E, out) and LoRA factors, or None for each."""

    def __init__(self, experts: nn.Module, name: str):
        quantized = quantized_weight(experts, name)  # read per expert: not getattr, which dequantizes it whole
        self.weight = quantized if quantized is not None else getattr(experts, name)
        self.bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
        self.transposed = experts.is_transposed
        wrappers = getattr(experts, LORA_ATTR, {})
        # PEFT's own path is running (it parametrizes the weight with its delta): add nothing here
        parametrized = parametrize.is_parametrized(experts) and any(
            quantized_weight(experts, n) is None for n in experts.parametrizations)  # besides quantization
        self.lora: LoraFactors | None = None if parametrized or name not in wrappers else lora_factors(wrappers[name])

    def tensors(self) -> _SideTensors:
        lora = self.lora
        return _SideTensors(self.weight, self.bias, lora.a if lora is not None else None,
                            lora.b if lora is not None else None)

    def spec(self, side: str) -> _SideSpec:
        return _SideSpec(side, self.lora.scaling if self.lora is not None else 1.0, self.transposed)

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The projection with transformers' grouped kernel (CUDA): one launch per projection."""
        from transformers.integrations.moe import _grouped_linear  # noqa: PLC0415

        y = _grouped_linear(x, self.weight, offsets, is_transposed=self.transposed)
        if self.lora is not None:
            a, b, scaling = self.lora
            y = y + _grouped_linear(_grouped_linear(x, a, offsets), b, offsets) * scaling
        if self.bias is not None:
            y = y + self.bias.repeat_interleave(torch.diff(offsets, prepend=offsets.new_zeros(1)).long(), dim=0)
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
    quantized = isinstance(up.weight, QuantizedWeight) or isinstance(down.weight, QuantizedWeight)
    if _grouped(hidden_states) and not quantized:  # quantized: the loop, one expert dequantized at a time
        expert_ids = top_k_index.reshape(-1)  # (S,) S = T * k
        order = torch.argsort(expert_ids, stable=True)  # (S,), grouped by expert
        offsets = torch.cumsum(torch.bincount(expert_ids, minlength=self.num_experts), 0, dtype=torch.int32)
        # index_select, not indexing: its backward is an index_add, faster on CPU than indexing's
        # accumulating index_put, and bit-identical
        x = hidden_states.index_select(0, order // k)  # (S, H)
        h = self._apply_gate(up.grouped(x, offsets)) if self.has_gate else self.act_fn(up.grouped(x, offsets))
        y = down.grouped(h, offsets)  # (S, H)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        weights = top_k_weights.reshape(-1).index_select(0, order)  # (S,)
        return _combined(y, weights, order, tokens, k, hidden_states.dtype)
    dtype = _compute_dtype(hidden_states)
    route = Route(top_k_index, self.num_experts, dtype in (torch.bfloat16, torch.float16))
    weights = top_k_weights.reshape(-1).index_select(0, route.order)  # (S,) routing weights, grouped
    call = _Call(self, route, dtype, casts_on_use(self), up.spec("up"), down.spec("down"))
    tensors = (*up.tensors(), *down.tensors())
    if not self.has_post_expert_norm:
        return _ExpertsMLP.apply(call, hidden_states, weights, *tensors)
    y = _ExpertsMLP.apply(call, hidden_states, None, *tensors)  # (S, H)
    return _combined(self.post_expert_norm(y), weights, route.order, tokens, k, hidden_states.dtype)
