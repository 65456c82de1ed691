"""Routed experts held in 4 or 8 bits (bitsandbytes), read one expert at a time.

bitsandbytes quantizes nn.Linear layers; transformers 5 holds the routed experts as fused
(E, out, in) parameters, 95% of an MoE's weights, which its bitsandbytes loading leaves in 16
bits. Here each fused expert tensor is quantized expert by expert as the checkpoint loads
(``ExpertsBnb4BitQuantizer``: transformers' own bitsandbytes quantizer, taking the experts too),
so that only the tensors being loaded are ever held unquantized. The packed values become
the parameter's ``original`` under a parametrization (``QuantizedExperts``) that holds each
expert's scales. moe_tune's experts kernel reads one expert at a time (``QuantizedWeight``);
whatever reads the parameter itself (transformers' other kernels, PEFT setting LoRA up, a merged
export) gets the whole tensor dequantized.

Per expert, not per fused tensor: an expert's blocks then never share a scale with another's,
its scales are a row of (E, blocks) tensors, and bitsandbytes' blockwise double quantization
(256 scales per second-level block) needs no expert count that divides it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import MoeArch, describe

NESTED_BLOCKSIZE = 256  # bitsandbytes' second-level blocks, of first-level scales


class ExpertsQuantization(NamedTuple):
    """How the routed experts are stored: as the recipe's bitsandbytes settings say."""

    bits: int  # 4 (NF4/FP4 in blocks of ``blocksize``) or 8 (int8, an fp32 scale per row)
    quant_type: str = "nf4"
    double_quant: bool = True  # the 4-bit scales themselves quantized to 8 bits
    dtype: torch.dtype = torch.float32  # what they dequantize to when read whole
    blocksize: int = 64


class QuantizedExperts(nn.Module):
    """The parametrization of one fused expert tensor (E, out, in), or (E, in, out) transposed:
    ``original`` is its packed values, (E, out * in / 2) uint8 at 4 bits, (E, out, in) int8 at
    8; the scales per expert are buffers here. ``forward`` dequantizes the whole tensor."""

    def __init__(self, shape: torch.Size, settings: ExpertsQuantization, scales: dict[str, torch.Tensor]):
        super().__init__()
        self.shape, self.settings = torch.Size(shape), settings
        for name, tensor in scales.items():
            self.register_buffer(name, tensor)

    @classmethod
    def quantize(cls, weight: torch.Tensor, settings: ExpertsQuantization) -> tuple[torch.Tensor, QuantizedExperts]:
        """weight (E, out, in) -> (packed values, the parametrization holding their scales),
        one expert at a time: the only full-precision copy is ``weight`` itself."""
        import bitsandbytes.functional as bnb  # noqa: PLC0415 -- only runs that quantize load bitsandbytes

        experts, numel = weight.shape[0], weight[0].numel()
        if settings.bits == 8:
            packed = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
            rows = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
            for e in range(experts):
                packed[e], rows[e], _ = bnb.int8_vectorwise_quant(weight[e].to(torch.float16 if weight.is_cuda
                                                                                else weight.dtype))
            return packed, cls(weight.shape, settings, {"row_scales": rows})
        packed = torch.empty(experts, numel // 2, dtype=torch.uint8, device=weight.device)
        states = []
        for e in range(experts):
            values, state = bnb.quantize_4bit(weight[e], blocksize=settings.blocksize,
                                              compress_statistics=settings.double_quant, quant_type=settings.quant_type)
            packed[e] = values.view(-1)
            states.append(state)
        scales = {"absmax": torch.stack([s.absmax for s in states]), "code": states[0].code}
        if settings.double_quant:
            scales |= {"nested_absmax": torch.stack([s.state2.absmax for s in states]),
                       "nested_code": states[0].state2.code, "offset": torch.stack([s.offset for s in states])}
        return packed, cls(weight.shape, settings, scales)

    def expert(self, packed: torch.Tensor, e: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e's weight (out, in), or (in, out) transposed, in ``dtype`` (into ``out`` if given)."""
        import bitsandbytes.functional as bnb  # noqa: PLC0415

        kernel = self._native_cpu_kernel(packed, dtype) if out is not None else None
        if kernel is not None:
            return self._dequantized_into(bnb, kernel, packed, e, out)
        values = self._dequantized(bnb, packed, e, dtype)
        return values if out is None else out.copy_(values)

    def _native_cpu_kernel(self, packed: torch.Tensor, dtype: torch.dtype):
        """bitsandbytes' own C++ CPU dequantization of 4-bit blocks, which its ``dequantize_4bit``
        runs into a fresh tensor only: into a buffer the experts kernel reuses, no new pages are
        faulted in on every read (measured in docs/quantization.md). None where bitsandbytes
        itself would not run it."""
        if self.settings.bits != 4 or packed.device.type != "cpu" or self.settings.blocksize >= 2048 \
                or self.shape[-1] % 2:  # bitsandbytes' own fallbacks (AVX-512 accuracy, odd row length)
            return None
        from bitsandbytes.cextension import lib  # noqa: PLC0415

        suffix = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype)
        # the C library itself: its wrapper answers a missing name with a function that raises
        return getattr(getattr(lib, "_lib", None), f"cdequantize_blockwise_cpu_{self.settings.quant_type}_{suffix}",
                       None) if suffix else None

    def _dequantized_into(self, bnb, kernel, packed: torch.Tensor, e: int, out: torch.Tensor) -> torch.Tensor:
        """Expert e's 4-bit values through bitsandbytes' CPU ``kernel`` into ``out``: the same
        values as ``dequantize_4bit`` (its fp32 scales times the code, rounded once to out's dtype)."""
        import ctypes  # noqa: PLC0415

        state = self._state(bnb, e, out.dtype)
        absmax = state.absmax
        if state.nested:  # the 8-bit scales first, as dequantize_4bit does
            absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert out.is_contiguous() and out.numel() == self.shape[1:].numel()
        kernel(bnb.get_ptr(packed[e]), bnb.get_ptr(absmax.float().contiguous()), bnb.get_ptr(out),
               ctypes.c_longlong(self.settings.blocksize), ctypes.c_longlong(out.numel() // self.shape[-1]),
               ctypes.c_longlong(self.shape[-1]))
        return out

    def _dequantized(self, bnb, packed: torch.Tensor, e: int, dtype: torch.dtype) -> torch.Tensor:
        if self.settings.bits == 8:
            return bnb.int8_vectorwise_dequant(packed[e], self.row_scales[e]).to(dtype)
        return bnb.dequantize_4bit(packed[e], self._state(bnb, e, dtype))

    def _state(self, bnb, e: int, dtype: torch.dtype):
        """Expert e's 4-bit bitsandbytes QuantState, dequantizing to ``dtype``."""
        nested = None
        if self.settings.double_quant:
            nested = bnb.QuantState(absmax=self.nested_absmax[e], code=self.nested_code,
                                    blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return bnb.QuantState(absmax=self.absmax[e], shape=self.shape[1:], code=self.code,
                              blocksize=self.settings.blocksize, quant_type=self.settings.quant_type, dtype=dtype,
                              offset=self.offset[e] if nested is not None else None, state2=nested)

    def whole(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor (E, out, in) in ``dtype``, each expert written into its slice as it is
        dequantized: one expert's temporary at a time, not E of them (1-13 MB each, which glibc
        serves from its heap and may keep there)."""
        values = torch.empty(self.shape, dtype=dtype, device=packed.device)
        for e in range(self.shape[0]):
            self.expert(packed, e, dtype, out=values[e])
        return values

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        """The whole tensor (E, out, in) in the settings' dtype."""
        return self.whole(packed, self.settings.dtype)


class QuantizedWeight(NamedTuple):
    """A quantized fused expert tensor as the experts kernel reads it: expert by expert."""

    packed: torch.Tensor
    quantization: QuantizedExperts

    @property
    def shape(self) -> torch.Size:
        return self.quantization.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.quantization.settings.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def expert(self, e: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.quantization.expert(self.packed, e, dtype, out)

    def whole(self, dtype: torch.dtype) -> torch.Tensor:
        return self.quantization.whole(self.packed, dtype)


def quantized_weight(module: nn.Module, name: str) -> QuantizedWeight | None:
    """``module.name`` as its packed values and scales when it is a quantized expert tensor and
    nothing else (such as PEFT's own LoRA path) parametrizes it; else None."""
    if not parametrize.is_parametrized(module, name):
        return None
    chain = module.parametrizations[name]
    if len(chain) != 1 or not isinstance(chain[0], QuantizedExperts):
        return None
    return QuantizedWeight(chain.original, chain[0])


def quantized_expert_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(experts module, parameter name) of every quantized expert tensor in ``model``."""
    return [(module, name) for module in model.modules() if parametrize.is_parametrized(module)
            for name in module.parametrizations if quantized_weight(module, name) is not None]


def dequantize_experts(model: nn.Module, dtype: torch.dtype) -> int:
    """Every quantized expert tensor back to a plain parameter in ``dtype``, one at a time (for a
    merged export: full precision, LoRA merged into the values training saw). Returns how many."""
    found = quantized_expert_tensors(model)
    for module, name in found:
        with torch.no_grad():
            values = quantized_weight(module, name).whole(dtype)
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        setattr(module, name, nn.Parameter(values, requires_grad=False))
    return len(found)


def check_quantization(model_section, config, meta: nn.Module, arch: MoeArch) -> None:
    """Before anything loads: a checkpoint quantized already, a compute dtype the device lacks,
    and experts that cannot be read one quantized expert at a time are refused, one line each."""
    if model_section.bits is None:
        return
    key = f"model.load_in_{model_section.bits}bit"
    method = (getattr(config, "quantization_config", None) or getattr(config.get_text_config(), "quantization_config", None))
    if method is not None:
        name = method.get("quant_method", "?") if isinstance(method, dict) else getattr(method, "quant_method", "?")
        raise MoeTuneError(f"{key}: {model_section.path} is quantized already ({name}); point model.path at its "
                           "bf16 or fp32 release to quantize it with bitsandbytes")
    compute = model_section.bnb_4bit_compute_dtype
    if model_section.bits == 4 and compute == "float16" and not torch.cuda.is_available():
        raise MoeTuneError("model.bnb_4bit_compute_dtype: float16 is not a CPU compute dtype here (bitsandbytes' "
                           "CPU kernels and torch's CPU autocast compute in float32 or bfloat16); use auto")
    if model_section.bits == 4 and compute == "bfloat16" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise MoeTuneError("model.bnb_4bit_compute_dtype: this GPU has no bfloat16; use float16")
    if not model_section.quantize_experts:
        return
    why = None
    if any(layer.flat for layer in arch.layers):
        why = "are 2-D stacks that the model reads outside their module"
    elif not getattr(meta, "_can_set_experts_implementation", lambda: False)():
        why = "do not go through transformers' experts interface, where moe_tune reads one expert at a time"
    if why is not None:
        raise MoeTuneError(f"model.quantize_experts: {arch.family}'s experts {why}, so they cannot be held "
                           "quantized; set model.quantize_experts: false (its linear layers still quantize)")
    if model_section.experts_implementation != "moe_tune":
        raise MoeTuneError(f"model.experts_implementation: {model_section.experts_implementation} reads each "
                           "quantized expert tensor whole; quantized experts need moe_tune (or set "
                           "model.quantize_experts: false)")


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """bitsandbytes' quantized nn.Linear layers back to nn.Linear in ``dtype`` (transformers' own
    dequantization), the model no longer marked quantized; quantized experts stay as they are."""
    from transformers.integrations import dequantize_and_replace  # noqa: PLC0415

    quantizer = model.hf_quantizer
    dequantize_and_replace(model, quantization_config=quantizer.quantization_config, dtype=dtype)
    quantizer.remove_quantization_config(model)


def _settings(config, bits: int) -> ExpertsQuantization:
    if bits == 8:
        return ExpertsQuantization(8)
    return ExpertsQuantization(4, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant,
                               config.bnb_4bit_compute_dtype or torch.float32)


class _QuantizeExperts(ConversionOps):
    """transformers' per-tensor quantize step: the routed experts here, other weights bitsandbytes'."""

    def __init__(self, quantizer, linear_op: ConversionOps):
        self.quantizer, self.linear_op = quantizer, linear_op

    def convert(self, input_dict: dict, model=None, **kwargs) -> dict:
        experts = {k: v for k, v in input_dict.items() if k in self.quantizer.expert_tensors}
        if not experts:
            return self.linear_op.convert(input_dict, model=model, **kwargs)
        out = {}
        for name, value in experts.items():
            value = value[0] if isinstance(value, list) else value
            packed, quantization = QuantizedExperts.quantize(value, self.quantizer.experts_settings)
            self.quantizer.quantized[name] = quantization
            out[name] = packed
        return out


class _ExpertsToo:
    """A transformers bitsandbytes quantizer that also quantizes the routed experts' fused tensors
    (the architecture layer's expert tensors), parametrized once the weights have loaded."""

    bits: int

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        self.expert_tensors = set(describe(model).expert_params)  # on the meta device: names only
        self.experts_settings = _settings(self.quantization_config, self.bits)
        self.quantized: dict[str, QuantizedExperts] = {}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return param_name in self.expert_tensors or super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        return _QuantizeExperts(self, super().get_quantize_ops())

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, quantization in self.quantized.items():
            module_name, _, attr = name.rpartition(".")
            parametrize.register_parametrization(model.get_submodule(module_name), attr, quantization, unsafe=True)
        self.quantized = {}
        return super()._process_model_after_weight_loading(model, **kwargs)


class ExpertsBnb4BitQuantizer(_ExpertsToo, Bnb4BitHfQuantizer):
    bits = 4


class ExpertsBnb8BitQuantizer(_ExpertsToo, Bnb8BitHfQuantizer):
    bits = 8
