"""Loading a model and tokenizer: config and tokenizer are checked before any weights load."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_tune.errors import MoeTuneError, shown
from moe_tune.model.arch import describe, require_moe
from moe_tune.model.quantized_experts import (
    ExpertsBnb4BitQuantizer,
    ExpertsBnb8BitQuantizer,
    dequantize_experts,
    dequantize_linears,
)
from moe_tune.model.sources import LOCAL_CONFIGS, hub_unreachable, read_tokenizer
from moe_tune.model.templates import TEMPLATE_KEY, give_template
from moe_tune.recipe import DTYPE_NAMES, TEMPLATE_NAMES

# the recipe's dtype names as torch dtypes; "auto": the checkpoint's own
DTYPES = {name: "auto" if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}




def load_config(path: str):
    """The model config, or a clear error when ``path`` is neither a checkpoint nor reachable."""
    if not Path(path).exists() and (why := hub_unreachable()):
        hint = f" (for plan and inspect, a config folder such as {LOCAL_CONFIGS}/<name>)" if LOCAL_CONFIGS.is_dir() else ""
        raise MoeTuneError(f"{shown(path)}: no such model folder, and not reachable as a Hugging Face Hub id offline "
                           f"({why}); point model.path at a local checkpoint{hint}")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise MoeTuneError(f"{path}: not a transformers checkpoint ({str(e).splitlines()[0]})") from None
        raise MoeTuneError(f"{shown(path)}: no such model folder, and not reachable as a Hugging Face Hub "
                           "id (offline?); point model.path at a local checkpoint") from None


def checkpoint_dtypes(path: str) -> dict[str, str]:
    """{tensor name: safetensors dtype ("BF16", "F32", ...)} of the checkpoint folder ``path``,
    read from the files' headers (no weights); empty where ``path`` is not a local folder."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    dtypes = {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    dtypes[key] = f.get_slice(key).get_dtype()
        except (SafetensorError, OSError) as e:
            raise MoeTuneError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]}); download or "
                               "save the checkpoint again") from None
    return dtypes


def experts_stored_apart(path: str) -> bool:
    """Whether the checkpoint at ``path`` stores each routed expert's weights as tensors of their
    own (``...experts.3.down_proj.weight``: Mixtral, Qwen3, OLMoE, DeepSeek), which transformers
    stacks into its fused (E, out, in) parameters while it loads, rather than fused already
    (gpt-oss). Where no safetensors file is here to read (a hub id, a config folder), True, as
    for most published MoE checkpoints: the loading estimate is then an upper bound."""
    dtypes = checkpoint_dtypes(path)
    return not dtypes or any(re.search(r"\.experts\.\d+\.", key) for key in dtypes)


def load_tokenizer(path: str, template=None):
    """The checkpoint's tokenizer; with ``template`` (chat_template.GivenTemplate, from
    model.chat_template), given that template and the special tokens it needs."""
    tokenizer = read_tokenizer(path)
    if tokenizer.pad_token is None:  # before a template changes eos: padding stays apart from turn ends
        tokenizer.pad_token = tokenizer.eos_token
    if template is not None:
        give_template(tokenizer, template)
    if not tokenizer.chat_template:
        raise MoeTuneError(f"{path}: the tokenizer has no chat template (a base checkpoint?); give it one with "
                           f"{TEMPLATE_KEY}: {TEMPLATE_NAMES[0]} in the recipe (or a .jinja file, or a tokenizer folder "
                           "whose template to copy)")
    return tokenizer


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings (and an untied LM head) to a tokenizer given new tokens by a chat
    template, the new rows drawn around the others' mean (transformers' mean_resizing), and
    stop generation where the tokenizer's turns end."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    stops = model.generation_config.eos_token_id
    if tokenizer.eos_token_id not in (stops if isinstance(stops, list) else [stops]):
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


@contextlib.contextmanager
def padding_side(tokenizer, side: str):
    """Pad on ``side`` inside the block: left for batched generation, right for teacher-forced
    passes; the tokenizer's own setting is restored afterwards."""
    saved, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = saved


def quantization_config(model):
    """transformers' BitsAndBytesConfig for the recipe's ``model`` section, or None."""
    if model.bits is None:
        return None
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    if model.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(model))


def compute_dtype(model) -> torch.dtype:
    """What 4-bit weights dequantize to: the recipe's bnb_4bit_compute_dtype, or for auto float32
    with float32 weights and bfloat16 otherwise."""
    if model.bnb_4bit_compute_dtype != "auto":
        return getattr(torch, model.bnb_4bit_compute_dtype)
    return torch.float32 if model.dtype == "float32" else torch.bfloat16


@contextlib.contextmanager
def quantizing_experts(bits: int | None):
    """While a model loads, transformers' bitsandbytes quantizer of ``bits`` is the one that also
    quantizes the routed experts (model/quantized_experts.py). transformers picks a quantizer
    class by name from one mapping and takes no instance: the name is pointed at ours inside this
    block alone, and back after."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING  # noqa: PLC0415

    key, ours = {4: ("bitsandbytes_4bit", ExpertsBnb4BitQuantizer), 8: ("bitsandbytes_8bit", ExpertsBnb8BitQuantizer)}[bits]
    saved, AUTO_QUANTIZER_MAPPING[key] = AUTO_QUANTIZER_MAPPING[key], ours
    try:
        yield
    finally:
        AUTO_QUANTIZER_MAPPING[key] = saved


def load_model(path: str, dtype: str = "float32", quantization=None, template=None, tokenizer=None,
               frozen_experts_in_bf16: bool = False, sharding=None):
    """(model, tokenizer), after checking that ``path`` holds an MoE with a usable tokenizer.
    ``quantization``, the recipe's model section when it quantizes (load_in_4bit/8bit): bitsandbytes
    for the nn.Linear layers, and the routed experts where it says quantize_experts. ``template`` is given to
    the checkpoint's tokenizer (model.chat_template). A ``tokenizer`` given is used as it is: the
    checkpoint's own as the run loaded it already (with ``template`` given), or another (a tuned
    run's, for its base model). The embeddings fit a template's or another tokenizer's tokens.
    ``frozen_experts_in_bf16``: the routed experts stay in the bf16 the checkpoint stores them in, every
    other weight is ``dtype`` (experts_policy.holds_frozen_experts_in_bf16). ``sharding``: a
    transformers DistributedConfig, applied as the weights load (training.distributed)."""
    config = load_config(path)
    require_moe(config, path)
    # the checkpoint's own tokenizer, loaded here, fits it already; one given may carry tokens of a
    # template (or of a tuned run) that the embeddings must grow to
    refit = template is not None or tokenizer is not None
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path, template)
    # a local folder by its absolute path: PEFT records it in adapter_config.json as the base
    # model, which must then load from any working directory
    source = str(Path(path).resolve()) if Path(path).is_dir() else path
    bits = quantization.bits if quantization is not None else None
    experts = quantizing_experts(bits) if bits and quantization.quantize_experts else contextlib.nullcontext()
    with returning_freed_memory(), experts:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if frozen_experts_in_bf16 else DTYPES[dtype],
                                                     quantization_config=quantization_config(quantization) if bits else None,
                                                     **({"distributed_config": sharding} if sharding else {}))
    if frozen_experts_in_bf16:
        _widen_all_but_routed_experts(model, DTYPES[dtype])
    if sharding is None and bits is None:
        own_file_views(model, source)
    _point_base_model_at_backbone(model)
    if refit:
        fit_embeddings(model, tokenizer)
    if bits == 4:
        keep_4bit_trainable_on_cpu(model)
    return model, tokenizer


def own_file_views(model, folder: str) -> int:
    """Give the weights that are views of the checkpoint's files (those it stores in the dtype they
    load in) memory of their own, so that the files' mappings close. Left open, a mapping keeps
    resident every page loading read: for a float32 checkpoint, the per-expert tensors stacked
    into the fused experts too, a second copy of the experts outside the plan (1.5x its peak, at
    the Qwen1.5-MoE shape). Linux only (/proc/self/maps); returns the number of weights copied."""
    maps = Path("/proc/self/maps")
    root = str(Path(folder).resolve())
    spans = []
    for line in maps.read_text().splitlines() if maps.is_file() else []:
        fields = line.split()
        if len(fields) > 5 and fields[5].startswith(root) and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    copied = 0
    for tensor in [*model.parameters(), *model.buffers()] if spans else []:
        if tensor.device.type == "cpu" and any(a <= tensor.data_ptr() < b for a, b in spans):
            tensor.data = tensor.data.clone()
            copied += 1
    return copied


def _widen_all_but_routed_experts(model, dtype: torch.dtype) -> None:
    """Every floating-point weight except the routed experts' to ``dtype``, one at a time (the
    checkpoint's bf16 values, exactly); the configs say ``dtype``, which a save records."""
    keep = set(describe(model).expert_params)
    for name, p in model.named_parameters():
        if name not in keep and p.is_floating_point():
            p.data = p.data.to(dtype)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.dtype = dtype


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LOAD_MMAP_THRESHOLD = 128 * 1024  # glibc's starting value: every larger block goes back when freed
TRAIN_MMAP_THRESHOLD = 16 * 1024 * 1024  # see returning_freed_memory


def _glibc():
    """The C library when it is glibc (whose mallopt and malloc_trim these are), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


@contextlib.contextmanager
def returning_freed_memory():
    """Load weights so that their temporaries go back to the system.

    glibc serves blocks below its mmap threshold from its heaps and keeps them there once freed,
    and it raises that threshold (up to 32 MiB) whenever a larger block is freed. Loading a bf16
    checkpoint into fp32 frees a temporary per expert (1-13 MB at real shapes), from several
    loader threads' heaps; after the plan's bf16 matmul check has raised the threshold, those
    would stay resident, well above the weights loaded.

    While loading, every block above glibc's starting threshold is mapped and unmapped on its
    own, and what the heaps still hold is trimmed after. Then the thresholds are fixed for
    training (mmap 16 MiB, trim 32 MiB), which also ends the adjustment a later load would
    inherit: at 32 MiB, where glibc's own adjustment ends, the heaps grow step after step; much
    lower, each step's activations are mapped afresh and training slows. Elsewhere than glibc,
    nothing changes. The measurements: docs/speed.md, "Measurements behind the code's choices"."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(M_MMAP_THRESHOLD, TRAIN_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * TRAIN_MMAP_THRESHOLD)


def keep_4bit_trainable_on_cpu(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel on the
    first eval-mode forward, and that kernel passes no gradient back: every LoRA adapter
    upstream silently stops learning after the first evaluation. Keep the trainable path."""
    import bitsandbytes as bnb  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _point_base_model_at_backbone(model) -> None:
    """Llama-4's causal LM names its backbone ``model`` but declares the prefix ``language_model``,
    so ``model.base_model`` is the whole model and TRL's fused LM head calls the LM forward
    instead of the backbone's. Point the prefix at the real backbone, for this instance only."""
    if model.base_model is model and isinstance(getattr(model, "model", None), torch.nn.Module):
        model.base_model_prefix = "model"


def build_meta_model(config):
    """The model's modules and parameter shapes, with no memory: a 671B config builds in seconds."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as e:
            raise MoeTuneError(f"transformers cannot build a causal LM from this config "
                               f"({str(e).splitlines()[0]})") from None


def load_adapter_model(base_path: str, adapter_dir: Path, dtype: str = "float32", quantization=None):
    """A base model with the PEFT adapter saved by a LoRA run (weights not merged), and the
    tokenizer saved with the adapter where there is one (a run given a chat template has
    grown its base's vocabulary). ``quantization``: the run's model section; a QLoRA run's base
    loads quantized as it trained, then dequantized to ``dtype``: the values its adapter learnt
    beside, in full precision (a merged export is that model's logits)."""
    from peft import PeftModel  # noqa: PLC0415

    if not (adapter_dir / "adapter_config.json").is_file():  # before the base loads
        raise MoeTuneError(f"{shown(adapter_dir)}: not a PEFT adapter folder (no adapter_config.json)")
    saved = load_tokenizer(str(adapter_dir)) if (adapter_dir / "tokenizer_config.json").is_file() else None
    model, tokenizer = load_model(base_path, dtype, quantization, tokenizer=saved)
    if quantization is None or not quantization.bits:
        return PeftModel.from_pretrained(model, adapter_dir), tokenizer
    full = model.config.dtype if DTYPES[dtype] == "auto" else DTYPES[dtype]
    dequantize_linears(model, full)
    # the experts only once the adapter is on: PEFT nests the wrappers of a module's parameters in
    # name order where they are parametrized (quantized), in definition order where plain, and the
    # adapter's keys name the nesting it was trained with
    model = PeftModel.from_pretrained(model, adapter_dir)
    dequantize_experts(model, full)
    return model, tokenizer
