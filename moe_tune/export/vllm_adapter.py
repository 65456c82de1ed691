"""``moe-tune export RUN --adapter OUT --for vllm``: a LoRA run's adapter in the layout vLLM
loads, for the MoE families whose checkpoints keep one tensor per expert.

PEFT adapts transformers' fused expert tensors through ``target_parameters`` and saves one
(A, B) pair per fused tensor (E experts, rank r): A (r*E, in) and B (out, r*E), where expert e's
factors are ``A.reshape(E, r, in)[e]`` and ``B.reshape(out, r, E)[:, :, e]``, and its delta
``scale * B_e @ A_e`` has the fused tensor's (E, out, in) layout. vLLM 0.32 reads that layout
only in the model classes it flags ``is_3d_moe_weight`` (FUSED_LORA_FAMILIES); for the others
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2, ...) it wants one LoRA module per expert projection,
under the checkpoint's own names (``block_sparse_moe.experts.3.w1`` in Mixtral), and without a
word it leaves experts it cannot match unadapted.

transformers' reverse weight conversion (the one ``save_pretrained`` writes checkpoints with)
gives those names and splits each stacked B into its experts and projections; an expert's A is
shared by the projections one fused tensor holds (gate and up), since they share its rank-r input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import describe

PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# model types whose vLLM class loads PEFT's fused-expert layout as it is (vLLM 0.32: is_3d_moe_weight)
FUSED_LORA_FAMILIES = ("gpt_oss", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe")
# the parts (arch.PARTS) whose nn.Linear projections vLLM's LoRA adapts under the checkpoint's names
SERVED_PARTS = ("attention", "shared_experts", "dense_mlp")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
LORA_KEY = re.compile(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight")


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path (without PEFT's prefix) -> (lora_A, lora_B); anything else PEFT saved (LoRA on
    embeddings, biases, weights trained in full) is refused."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = LORA_KEY.fullmatch(key)
        if found is None:
            raise MoeTuneError(f"--for vllm: the adapter holds {key}, which vLLM's LoRA does not load; serve "
                               "`export --merged`")
        factors.setdefault(found.group(1), {})[found.group(2)] = tensor
    return {m: (f["A"], f["B"]) for m, f in sorted(factors.items())}


def _fused_pairs(pairs, target: str, shape: torch.Size):
    """The (A, B) pair of fused parameter ``target`` (E, out, in): PEFT keys it by its wrapper,
    ``experts.base_layer`` for the first parameter it wrapped and ``experts`` for the next, so the
    shapes say which is which."""
    experts, out, inp = shape
    owner = target.rsplit(".", 1)[0]
    found = [(m, a, b) for m, (a, b) in pairs.items() if m.removesuffix(".base_layer") == owner
             and a.shape[1] == inp and b.shape[0] == out and a.shape[0] == b.shape[1] and a.shape[0] % experts == 0]
    if len(found) != 1:
        raise MoeTuneError(f"--for vllm: cannot tell which LoRA factors adapt {target} (shape {tuple(shape)})")
    return found[0]


def _adapted_parameters(entries: list[str], params: dict) -> list[str]:
    """The parameter names ``target_parameters`` entries match, as PEFT matches them: the whole
    name or its ending after a dot (PEFT also moves a target_modules entry such as ``down_proj``
    there when only a parameter has that name)."""
    names = []
    for entry in entries:
        matched = [n for n in params if n == entry or n.endswith("." + entry)]
        if not matched:
            raise MoeTuneError(f"--for vllm: {entry} (adapter_config.json target_parameters) is not in the model")
        names += [n for n in matched if n not in names]
    return names


def vllm_layout(adapter_dir: Path, model) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of the adapter in ``adapter_dir`` in vLLM's per-expert layout.
    ``model``: the base model (on the meta device is enough), for names and shapes."""
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers.core_model_loading import revert_weight_conversion  # noqa: PLC0415

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    family = model.config.model_type
    if family in FUSED_LORA_FAMILIES:
        raise MoeTuneError(f"--for vllm: vLLM loads {family} adapters in PEFT's layout as they are; serve "
                           f"{adapter_dir} with --enable-lora")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise MoeTuneError("--for vllm: the adapter has per-module ranks, rsLoRA or DoRA; serve `export --merged`")
    extra = config.get("modules_to_save") or config.get("trainable_token_indices")
    if extra:
        raise MoeTuneError(f"--for vllm: the adapter also trains {extra} in full, which vLLM's LoRA does not load; "
                           "serve `export --merged`")
    pairs = _pairs(load_file(adapter_dir / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    out_tensors: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for target in _adapted_parameters(config.get("target_parameters") or [], params):
        module, a, b = _fused_pairs(pairs, target, params[target].shape)
        used.add(module)
        experts, rank = params[target].shape[0], a.shape[0] // params[target].shape[0]
        a3 = a.reshape(experts, rank, -1)  # (E, r, in)
        b3 = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1).contiguous()  # (E, out, r)
        for name, piece in revert_weight_conversion(model, {target: b3}).items():
            index = EXPERT_INDEX.search(name)
            if index is None or piece.dim() != 2 or piece.shape[1] != rank:
                raise MoeTuneError(f"--for vllm: {family} stores {target} in a layout this conversion does not know "
                                   f"({name}, {tuple(piece.shape)}); serve `export --merged`")
            path = name.removesuffix(".weight")
            out_tensors[f"{PREFIX}{path}.lora_A.weight"] = a3[int(index.group(1))].clone()
            out_tensors[f"{PREFIX}{path}.lora_B.weight"] = piece.contiguous()
    arch = describe(model)
    served = {name.rsplit(".", 1)[0] for part in SERVED_PARTS for name in arch.params_in(part)}
    for module, (a, b) in pairs.items():
        if module in used:
            continue
        if module not in served:
            raise MoeTuneError(f"--for vllm: the adapter adapts {module} ({arch.parts.get(module + '.weight')}); "
                               f"vLLM's LoRA serves the {', '.join(SERVED_PARTS)} and routed experts' projections "
                               "only; serve `export --merged`")
        (name,) = revert_weight_conversion(model, {module + ".weight": torch.empty(0)})
        out_tensors[f"{PREFIX}{name.removesuffix('.weight')}.lora_A.weight"] = a
        out_tensors[f"{PREFIX}{name.removesuffix('.weight')}.lora_B.weight"] = b
    names = sorted({key.removeprefix(PREFIX).rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for key in out_tensors})
    vllm_config = {**config, "target_modules": names, "target_parameters": None}
    return out_tensors, vllm_config


def write_vllm_adapter(adapter_dir: Path, model, out: Path) -> int:
    """Write the converted adapter into the (empty) folder ``out``; the number of LoRA modules."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors, config = vllm_layout(adapter_dir, model)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return len(tensors) // 2
