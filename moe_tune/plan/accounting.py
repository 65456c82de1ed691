"""Parameter accounting and training-memory estimates, from the architecture layer.

Active parameters per token: everything except the routed experts a token does not visit,
i.e. each MoE layer counts ``top_k / num_experts`` of its routed expert tensors. Two
conventions exist: Mistral and Qwen count the input embedding (``active_params``); DeepSeek
and gpt-oss leave it out (``active_params_no_embed``).

Memory (GB = 1e9 bytes) counts weights, gradients and AdamW's two moment buffers; not
activations, which depend on batch and sequence length. Full-weight training keeps gradients
and moments in the weights' dtype, as torch's AdamW does. LoRA adapters are kept in fp32
(PEFT's default ``autocast_adapter_dtype``), so each adapter parameter costs 16 bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_tune.model.arch import MoeArch, decoder_layer_of, describe, text_config
from moe_tune.model.loading import DTYPES
from moe_tune.recipe import PARTS

LORA_RANK = 16  # the rank assumed by the LoRA strategies' estimates
ADAPTER_BYTES = 4 * 4  # fp32 weight + gradient + 2 AdamW moments
# bitsandbytes NF4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + an fp32
# scale per 256 of those blocks; without it, an fp32 absmax per 64 weights.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_SINGLE_BYTES = 0.5 + 4 / 64

# transformers' layer_types of softmax attention over the sequence (not linear attention or mamba)
_SOFTMAX_ATTENTION = ("full_attention", "sliding_attention", "chunked_attention")
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items() if isinstance(dtype, torch.dtype)}
INT8_BYTES = 1 + 4 / 4096  # LLM.int8: a byte per weight plus an fp32 scale per row (~4k wide)


def plan_memory_bytes(total: int, trained_full: int, lora: int, dtype_bytes: int, quantized: int = 0,
                      bits: int | None = None, bf16_expert_params: int = 0, double_quant: bool = True) -> float:
    """Weights of the whole model (``quantized`` of them at 4 or 8 bits, ``bf16_expert_params`` frozen
    experts held in bf16: experts_policy.holds_frozen_experts_in_bf16), plus gradient and two AdamW moments
    per trained weight (in the weights' dtype) and 16 bytes per fp32 LoRA parameter."""
    per_quantized = {4: NF4_BYTES if double_quant else NF4_SINGLE_BYTES, 8: INT8_BYTES}.get(bits, dtype_bytes)
    weights = (total - quantized - bf16_expert_params) * dtype_bytes + quantized * per_quantized + bf16_expert_params * 2
    return weights + trained_full * 3 * dtype_bytes + lora * ADAPTER_BYTES


def loading_bytes(model: nn.Module, arch: MoeArch, weights: float, expert_bytes: int, stacked: bool,
                  bf16_expert_bytes: float = 0) -> float:
    """Loading's peak: the ``weights`` it leaves, plus, where the checkpoint stores each routed
    expert apart (loading.experts_stored_apart, ``stacked``), the largest fused expert tensor of a
    layer at ``expert_bytes`` per element. transformers casts each expert's tensors to the load
    dtype, stacks them per projection and concatenates gate and up; the stacked halves live while
    the (E, 2I, H) result is written. At 1 layer of Qwen3-30B-A3B's shape this is 1.6 GB above
    the 2.5 GB of weights, more than training adds; at 48 layers it is 1%.

    Where the frozen routed experts are held in bf16 (``bf16_expert_bytes``), the model loads
    in bf16 and only then are its other weights widened (loading.load_model): while the experts
    are stacked, the other weights are still views of the checkpoint's file, not memory of the
    process. The peak is then the experts and the stacked halves, or the widened weights,
    whichever is more; above the real peak where down-projections load after gate and up are
    stacked (Mixtral). How close both come to measured peaks: docs/speed.md, "Measurements
    behind the code's choices"."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    largest = max((sizes[n] for n in arch.expert_params), default=0)
    if not stacked:
        return weights
    if bf16_expert_bytes:
        return max(weights, bf16_expert_bytes + largest * expert_bytes)
    return weights + largest * expert_bytes


def saved_activation_bytes(model: nn.Module, arch: MoeArch, tokens: int, act_bytes: int, autocast: bool,
                           checkpointing: bool, expert_copies: bool = True, on_gpu: bool | None = None,
                           seq_len: int | None = None, trained: list[str] | None = None) -> float:
    """Bytes autograd keeps for the backward of one micro-batch of ``tokens`` tokens.

    Fitted to torch's saved-tensor hooks on Mixtral-style models (sdpa attention, moe_tune's
    experts kernel; fp32 and bf16 autocast; hidden 256-512, intermediate 768-1536, top-1 to 4,
    vocabulary 1.5k-8k; within 3%): per decoder layer and token, ``H (26 + 2a)`` for attention,
    norms and residuals, plus ``3a H + 4a I`` per shared expert or dense MLP the token visits,
    where ``a`` is the activations' byte size and ``I`` an expert's intermediate size (its
    parameters / 3H). moe_tune's CPU experts node keeps ``a H`` per MoE layer (the hidden states
    it gathers from) and ``a H + 2a I`` per routed expert visited (the down- and up-projections'
    outputs); on a GPU (``on_gpu``; by default, where this machine has one), transformers'
    grouped kernel's ops keep ``3a H + 4a I`` per visit. Then ``10 H`` for the final norm and
    TRL's fused LM head, which keeps no logits (loss_head_bytes). Where attention runs
    transformers' eager path (families without sdpa, e.g. gpt-oss, whose attention sinks need
    it), each layer also keeps the softmax's fp32 probabilities, ``4 heads S`` per token for
    rows of ``seq_len`` = S tokens (gpt-oss's sink column adds 1/S), and under 16-bit
    activations their cast copy that multiplies the values, ``a heads S``. Autocast adds a bf16 copy of
    every matmul weight (of the routed experts' only with ``expert_copies``: not when they are
    held in bf16 or cast on use). With activation checkpointing each layer keeps only its fp32
    input and one layer is recomputed at a time. Without it, given the ``trained`` parameter
    names, the layers ahead of the first trained tensor keep nothing (_kept_from). With only the
    experts training, the estimate is 9-19% above what autograd keeps at the tested shapes
    (tests/test_accounting.py): frozen norms, attention and routers keep less than trained ones.
    """
    kept, per_layer_copies, kept_layers, head, every = _activation_terms(
        model, arch, tokens, act_bytes, autocast, expert_copies, on_gpu, seq_len,
        None if checkpointing else trained)
    if checkpointing:
        layers = text_config(model.config).num_hidden_layers
        return tokens * (layers * 4 * text_config(model.config).hidden_size + every / layers) \
            + per_layer_copies + head
    return tokens * kept + per_layer_copies * kept_layers + head


def activation_bytes(model: nn.Module, arch: MoeArch, tokens: int, act_bytes: int, autocast: bool,
                     checkpointing: bool, expert_copies: bool = True, on_gpu: bool | None = None,
                     seq_len: int | None = None, trained: list[str] | None = None) -> float:
    """The activation part of the peak: what is saved for backward, plus whichever working set of
    the backward is larger: the gradients of one layer's activations, which backward holds while
    it works through that layer, or the LM head's (loss_head_bytes), which comes first.
    ``seq_len``: the length of the rows the ``tokens`` come in (by default one row of them);
    ``trained``: see saved_activation_bytes."""
    *_, every = _activation_terms(model, arch, tokens, act_bytes, autocast, on_gpu=on_gpu, seq_len=seq_len)
    layers = text_config(model.config).num_hidden_layers
    head = loss_head_bytes(model, tokens, 2 if autocast else act_bytes, on_gpu)
    return saved_activation_bytes(model, arch, tokens, act_bytes, autocast, checkpointing, expert_copies, on_gpu,
                                  seq_len, trained) + max(tokens * every / layers, head)


def loss_head_bytes(model: nn.Module, tokens: int, compute_bytes: int, on_gpu: bool | None = None) -> float:
    """The working set of the backward of TRL's fused LM head (``trl.kernels.chunked_logprob``), which
    scores ``n = min(tokens, TOKEN_CHUNK_SIZE)`` tokens against ``c = min(V, chunk)`` vocabulary
    entries at a time: an (n, chunk) tile buffer in the compute dtype (the whole chunk's width,
    even where the vocabulary is narrower), the fp32 gradient of the (tokens, H) hidden states,
    and where the kernel has no Triton (CPUs) its torch fallback's fp32 temporaries: about 7.25
    (n, c) tensors alive at once (the scaled tile, logits, log-probabilities, probabilities, the
    gradient, two operands of its update and a bool target mask). Where the vocabulary is large
    this exceeds a layer's: at V = 151k and 2048 tokens, 2.1 GB on a CPU."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE  # noqa: PLC0415
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk  # noqa: PLC0415

    config = text_config(model.config)
    n, c = min(tokens, TOKEN_CHUNK_SIZE), min(config.vocab_size, chunk)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    return n * chunk * compute_bytes + tokens * config.hidden_size * 4 + (0 if on_gpu else 7.25 * n * c * 4)


def micro_batch_activations(model: nn.Module, arch: MoeArch, dtype: str, sft_args, batch: int | None = None,
                            checkpointing: bool | None = None, frozen_experts_in_bf16: bool = False,
                            on_gpu: bool | None = None, trained: list[str] | None = None,
                            quantized_experts: bool = False) -> tuple[float, str]:
    """(bytes, what they assume) of ``activation_bytes`` for one micro-batch as the run's SFTConfig
    sets it, or with another ``batch`` size or ``checkpointing`` (what `plan` suggests).
    moe_tune's experts kernel keeps no bf16 copy of the routed experts where they are held in bf16
    (``frozen_experts_in_bf16``), where checkpointing makes it cast each on use
    (experts_policy.cast_on_use), or where they are quantized (``quantized_experts``: dequantized
    one expert at a time, into a buffer per projection, which is counted). ``on_gpu``,
    ``trained``: see saved_activation_bytes."""
    batch = sft_args.per_device_train_batch_size if batch is None else batch
    checkpointing = bool(sft_args.gradient_checkpointing) if checkpointing is None else checkpointing
    autocast = bool(sft_args.bf16 or sft_args.fp16) and DTYPE_BYTES[dtype] == 4  # fp32 weights, 16-bit matmuls
    seq_len = sft_args.max_length or 1024
    tokens = batch * seq_len  # rows of sft.max_length tokens: the largest micro-batch
    compute_bytes = 2 if autocast or DTYPE_BYTES[dtype] == 2 else 4
    acts = activation_bytes(model, arch, tokens, compute_bytes, autocast,
                            checkpointing, expert_copies=not (frozen_experts_in_bf16 or quantized_experts or checkpointing),
                            on_gpu=on_gpu,
                            seq_len=seq_len, trained=trained)
    if quantized_experts:  # one expert of each projection dequantized, in a buffer every layer reuses
        acts += compute_bytes * max((sum(model.get_parameter(n).numel() for n in layer.expert_params) / layer.num_experts
                                     for layer in arch.layers), default=0)
    return acts, (f"{tokens} tokens per micro-batch, {'bf16 autocast' if autocast else dtype}, "
                  f"checkpointing {'on' if checkpointing else 'off'}")


def _activation_terms(model, arch, tokens, act_bytes, autocast, expert_copies=True, on_gpu=None, seq_len=None,
                      trained=None):
    """(bytes per token kept over all layers, autocast weight copies per layer, layers counted for those
    copies, head bytes, bytes per token over all layers as if every one kept its own). With
    ``trained`` (the trained parameter names), the layers ahead of the first trained tensor keep
    nothing (see _kept_from)."""
    config = text_config(model.config)
    sizes = _numel(model)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = _layer_bytes(model, arch, sizes, act_bytes, on_gpu, seq_len or tokens)
    first, attention_too = _kept_from(model, arch, layers, trained)
    kept = sum(sum(terms) for terms in per_layer[first:]) - (per_layer[first][0] if attention_too else 0)
    cast = ("attention", "shared_experts", "dense_mlp") + (("routed_experts",) if expert_copies else ())
    matmul = sum(sizes[n] for n, part in arch.parts.items()
                 if part in cast
                 and len(model.get_parameter(n).shape) > 1)
    copies = 2 * matmul / layers if autocast else 0
    return kept, copies, layers - first, tokens * 10 * hidden, sum(sum(terms) for terms in per_layer)


def _layer_bytes(model, arch, sizes, a, on_gpu, seq_len) -> list[tuple[float, float]]:
    """Per decoder layer, what autograd keeps per token: (attention side, MLP side); see
    saved_activation_bytes."""
    config = text_config(model.config)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    layer_of = decoder_layer_of(model)
    # each layer's plain-MLP width (shared experts, dense MLP): its 2-D parameters / 3H; a tensor
    # outside the decoder layers is spread over all of them
    width = {part: [0.0] * layers for part in ("shared_experts", "dense_mlp")}
    for part, per_layer in width.items():
        for n in arch.params_in(part):
            if len(model.get_parameter(n).shape) > 1:
                i = layer_of(n)
                for j in range(layers) if i is None else (i,):
                    per_layer[j] += sizes[n] / (3 * hidden) / (layers if i is None else 1)
    moe = {layer_of(layer.block): layer for layer in arch.layers}
    if None in moe:  # no decoder ModuleList found: the MoE layers taken to be the last ones
        moe = dict(zip(range(layers - len(arch.layers), layers), arch.layers))
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    eager = getattr(config, "_attn_implementation", None) == "eager"
    gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    out = []
    for i in range(layers):
        attention = hidden * (26 + 2 * a)
        if eager and types[i] in _SOFTMAX_ATTENTION:  # (B, heads, S, S) probabilities
            attention += config.num_attention_heads * seq_len * (4 + (a if a < 4 else 0))
        shared, dense = width["shared_experts"][i], width["dense_mlp"][i]
        visits = (1 if shared else 0) if i in moe else 1  # a shared expert beside the routed ones; a dense MLP
        mlp = visits * 3 * a * hidden + 4 * a * (shared + dense)
        if i in moe:
            layer = moe[i]
            routed = _expert_width(sizes, layer, hidden) * layer.top_k  # intermediate width a token visits
            if gpu:  # transformers' grouped ops (experts_kernel._grouped)
                mlp += layer.top_k * 3 * a * hidden + 4 * a * routed
            else:  # experts_kernel._ExpertsMLP
                mlp += a * hidden * (1 + layer.top_k) + 2 * a * routed
        out.append((attention, mlp))
    return out


# Parts on a layer's MLP side: where these alone train in a layer, its attention keeps nothing.
_MLP_SIDE = ("routed_experts", "shared_experts", "router", "dense_mlp")


def _kept_from(model, arch, layers: int, trained) -> tuple[int, bool]:
    """(the first decoder layer whose activations autograd keeps, whether that layer's attention
    side keeps nothing either). Autograd keeps nothing for an op none of whose inputs needs a
    gradient, so the layers ahead of the first trained tensor keep nothing (lora_experts at a
    shape whose first layer is dense, e.g. DeepSeek's: that whole layer). ``trained`` None: every
    layer keeps (the input embedding trains, or checkpointing made the embeddings' output need a
    gradient)."""
    if trained is None:
        return 0, False
    layer_of = decoder_layer_of(model)
    at = {}  # layer -> the parts trained there
    for name in trained:
        i = layer_of(name)
        if i is None:
            i = -1 if arch.parts.get(name) == "embeddings" else layers  # the LM head and final norm come last
        at.setdefault(i, set()).add(arch.parts.get(name))
    first = min(at, default=layers)
    if first < 0:
        return 0, False
    if first >= layers:  # only the head trains
        return layers, False
    return first, at[first] <= set(_MLP_SIDE)


def _expert_width(sizes: dict[str, int], layer, hidden: int) -> float:
    """One routed expert's intermediate size: its parameters / 3H (gate, up and down projections)."""
    return sum(sizes[n] for n in layer.expert_params) / layer.num_experts / (3 * hidden)


def expert_intermediate(model: nn.Module, arch: MoeArch) -> int:
    """The intermediate size of the first MoE layer's routed experts, read off their parameters
    (families name it differently in their configs)."""
    return round(_expert_width(_numel(model), arch.layers[0], text_config(model.config).hidden_size))


def _numel(model: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters()}


def part_counts(model: nn.Module, arch: MoeArch) -> dict[str, int]:
    sizes = _numel(model)
    counts = dict.fromkeys(PARTS, 0)
    for name, part in arch.parts.items():
        counts[part] += sizes[name]
    return {part: n for part, n in counts.items() if n}


def _inactive_expert_params(model: nn.Module, arch: MoeArch) -> float:
    sizes = _numel(model)
    return sum(sum(sizes[n] for n in layer.expert_params) * (1 - layer.top_k / layer.num_experts)
               for layer in arch.layers)


def active_params(model: nn.Module, arch: MoeArch, with_input_embedding: bool = True) -> int:
    total = sum(_numel(model).values())
    active = total - _inactive_expert_params(model, arch)
    if not with_input_embedding:
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        if head is None or head.weight is not embed:  # tied: the matrix still serves as LM head
            active -= embed.numel()
    return round(active)


def backward_params(model: nn.Module, arch: MoeArch, trained: list[str]) -> int:
    """Active parameters per token (as active_params counts them, the input embedding aside: a
    lookup) whose activation gradients the backward computes: those at or after the first trained
    tensor (_kept_from). Ahead of it nothing needs a gradient, so the backward never runs there
    (lora_experts at a shape whose first layer is dense: none of that layer). Where the first
    trained layer trains its attention, the projections reading that layer's input are counted
    though they pass no gradient back (a few percent of the count at one or two layers); dbrx's
    flat experts, whose down projection is stored (E*I, H), are not counted in their first layer."""
    config = text_config(model.config)
    first, attention_too = _kept_from(model, arch, config.num_hidden_layers, trained)
    layer_of = decoder_layer_of(model)
    share = {n: layer.top_k / layer.num_experts for layer in arch.layers for n in layer.expert_params}
    transposed = {n for layer in arch.layers if layer.transposed for n in layer.expert_params}
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    count = 0.0
    for name, p in model.named_parameters():
        if p is embed and (head is None or head.weight is not embed):
            continue
        i = layer_of(name)
        i = config.num_hidden_layers if i is None else i  # the LM head and final norm come last
        if i < first:
            continue
        if i == first and attention_too:
            # only the MLP side trains here and its input needs no gradient: of its matmuls only
            # those reading the intermediate activations (down projections) pass one back
            reads = p.shape[-2] if name in transposed else p.shape[-1]  # (out, in), (E, out, in), (E, in, out)
            if arch.parts[name] not in _MLP_SIDE or p.dim() < 2 or reads == config.hidden_size:
                continue
        count += p.numel() * share.get(name, 1)
    return round(count)


def lora_params(shape: tuple[int, ...], rank: int = LORA_RANK) -> int:
    """PEFT LoRA size for a weight: (out, in) -> r*(in+out); fused (E, a, b) -> r*E*(a+b)."""
    experts = shape[0] if len(shape) == 3 else 1
    return rank * experts * (shape[-1] + shape[-2])


def quantized_weights(model: nn.Module, experts: bool = False) -> list[str]:
    """Weights bitsandbytes quantizes: nn.Linear layers except the LM head, and with ``experts``
    the routed experts' fused tensors (model.quantize_experts: model/quantized_experts.py).
    Bare router weights are not nn.Linear, so they stay in the model's dtype."""
    head = model.get_output_embeddings()
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    return linears + (describe(model).expert_params if experts else [])


def memory_bytes(model: nn.Module, arch: MoeArch, dtype_bytes: int = 2) -> dict[str, float]:
    sizes = _numel(model)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    total = sum(sizes.values())
    experts = sum(sizes[n] for n in arch.params_in("routed_experts"))
    expert_tensors = arch.expert_params
    expert_lora = sum(lora_params(shapes[n]) for n in expert_tensors)
    attention_linears = [n for n in quantized_weights(model) if arch.parts.get(n) == "attention"]
    attention_lora = sum(lora_params(shapes[n]) for n in attention_linears)
    quantized = sum(sizes[n] for n in quantized_weights(model, experts=True) if n in sizes)
    return {
        "full": plan_memory_bytes(total, total, 0, dtype_bytes),
        "freeze_experts": plan_memory_bytes(total, total - experts, 0, dtype_bytes),
        "lora_experts": plan_memory_bytes(total, 0, expert_lora, dtype_bytes),
        # 4-bit nn.Linear layers and routed experts; embeddings, routers and norms stay in dtype
        "qlora": plan_memory_bytes(total, 0, expert_lora + attention_lora, dtype_bytes, quantized, bits=4),
    }


def summary(model: nn.Module, arch: MoeArch, dtype: str = "bfloat16") -> dict:
    """What ``moe-tune inspect --json`` prints."""
    layers = arch.layers
    n_layers = getattr(text_config(model.config), "num_hidden_layers", None)
    return {
        "architecture": type(model).__name__,
        "family": arch.family,
        "num_layers": n_layers,
        "num_moe_layers": len(layers),
        "num_experts": arch.num_experts,
        "top_k": arch.top_k,
        "scoring": layers[0].scoring,
        "shared_experts": bool(layers[0].shared),
        "total_params": sum(_numel(model).values()),
        "active_params": active_params(model, arch),
        "active_params_no_embed": active_params(model, arch, with_input_embedding=False),
        "parts": part_counts(model, arch),
        "memory_dtype": dtype,
        "memory_gb": {k: round(v / 1e9, 3) for k, v in memory_bytes(model, arch, DTYPE_BYTES[dtype]).items()},
    }


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_summary(s: dict) -> str:
    shared = "with shared experts" if s["shared_experts"] else "no shared experts"
    lines = [
        f"{s['architecture']} ({s['family']})",
        f"layers: {s['num_layers']}, of which MoE: {s['num_moe_layers']}",
        f"experts: {s['num_experts']} routed per MoE layer, top-{s['top_k']}, {s['scoring']} router, {shared}",
        "parameters by part:",
    ]
    for part, n in s["parts"].items():
        lines.append(f"  {part:<15} {_human(n):>9}  {n / s['total_params']:6.1%}")
    lines += [
        f"total: {_human(s['total_params'])}",
        f"active per token: {_human(s['active_params'])} "
        f"({_human(s['active_params_no_embed'])} without the input embedding)",
        f"training memory, {s['memory_dtype']} weights + gradients + AdamW states (activations not included):",
    ]
    names = {"full": "full fine-tune", "freeze_experts": "frozen experts",
             "lora_experts": f"LoRA r={LORA_RANK} on experts", "qlora": "QLoRA (4-bit linears, LoRA on experts+attention)"}
    for strategy, gb in s["memory_gb"].items():
        lines.append(f"  {names[strategy]:<48} {gb:10.2f} GB")
    return "\n".join(lines)
