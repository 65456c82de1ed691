"""Recipes: YAML files mapped onto typed config classes, plus dotted command-line overrides.

A recipe reads in the order the run happens:
``model -> data -> trainable -> router -> experts -> lora -> sft -> eval``. Every section
is a pydantic model that forbids unknown keys; ``sft`` passes through to TRL's ``SFTConfig``
and is checked against its fields and their types before anything loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from moe_tune.errors import MoeTuneError, shown

# The words a recipe is written in, each defined here once. This module imports no torch, so that
# a recipe is checked before anything heavy loads; the modules that act on these words (arch,
# modes, loading, rows, templates) import them from here.
PARTS = ("embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp",
         "norms", "lm_head", "other")
_EVERYTHING = dict.fromkeys(PARTS, "train")
# Unlisted parts are frozen.
PRESETS: dict[str, dict[str, str]] = {
    "full": _EVERYTHING,
    "freeze_router": {**_EVERYTHING, "router": "freeze"},
    "freeze_experts": {**_EVERYTHING, "routed_experts": "freeze"},  # ST-MoE: non-expert params only
    "experts_only": {"routed_experts": "train", "shared_experts": "train"},
    "attention_only": {"attention": "train"},
    "lora_attention": {"attention": "lora"},
    "lora_experts": {"routed_experts": "lora", "shared_experts": "lora"},
    "lora_all": {"attention": "lora", "routed_experts": "lora", "shared_experts": "lora", "dense_mlp": "lora"},
    "esft": {"routed_experts": "train"},  # restricted to the selected experts (moe/expert_selection.py)
}
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
FORMATS = ("auto", "chat", "alpaca", "sharegpt", "prompt_completion")
TEMPLATES = Path(__file__).parent / "model" / "chat_templates"  # named templates, one .jinja file each
TEMPLATE_NAMES = tuple(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModelSection(Section):
    path: str
    """Local folder of a transformers MoE checkpoint (with its tokenizer), or a hub id when online."""
    chat_template: str | None = None
    """A chat template for a checkpoint that has none (a base model), or to replace its own: a name
    of moe_tune/model/chat_templates (chatml), a .jinja file, or a tokenizer folder whose template to
    copy. Special tokens it names that the tokenizer lacks are added; their embedding rows train."""
    dtype: Literal[DTYPE_NAMES] = "float32"
    """Dtype the weights are loaded in. float32 is the fast and exact choice on CPU."""
    load_in_4bit: bool = False
    """QLoRA: bitsandbytes 4-bit weights for nn.Linear layers (attention, shared experts, dense MLPs)
    and, with quantize_experts, the routed experts; routers, norms and embeddings stay in ``dtype``."""
    load_in_8bit: bool = False
    """bitsandbytes 8-bit weights (LLM.int8 for nn.Linear layers), the same reach as 4-bit."""
    quantize_experts: bool = True
    """With load_in_4bit/8bit, the fused routed experts too (95% of an MoE's weights), expert by
    expert as they load; false leaves them in ``dtype``, as transformers' own 4-bit loading does."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """The 4-bit number format (bitsandbytes' BitsAndBytesConfig names)."""
    bnb_4bit_use_double_quant: bool = True
    """The 4-bit weights' scales quantized again, to 8 bits per block of 64 weights."""
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """What 4-bit weights dequantize to for their matmuls; auto: float32 for float32 weights, else bfloat16."""
    experts_implementation: Literal["moe_tune", "grouped_mm", "batched_mm", "eager"] = "moe_tune"
    """How fused routed experts compute in training. moe_tune: per-expert matmuls that bf16 autocast
    reaches on a CPU (transformers' grouped kernel on CUDA), LoRA applied to the grouped inputs
    (moe_tune/moe/experts_kernel.py); the others are transformers' own kernels."""

    @model_validator(mode="after")
    def _one_quantization(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("set only one of load_in_4bit and load_in_8bit")
        return self

    @property
    def bits(self) -> int | None:
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None


class ParallelSection(Section):
    """Sharded training on transformers' own engine, under ``torchrun --nproc_per_node N``: its
    ``DistributedConfig`` keys, applied as the model loads (training/distributed.py)."""

    fsdp_size: int = Field(default=1, gt=0)
    """Ranks that shard weights, gradients and optimizer states (FSDP2), each on its own batches."""
    ep_size: int = Field(default=1, gt=0)
    """Ranks holding distinct routed experts (expert parallelism, all-to-all); divides the expert
    count and fsdp_size x tp_size. Alone (its ranks sharing each batch) it is not yet checked: refused."""
    tp_size: int = Field(default=1, gt=0)
    """Ranks that split attention and dense weights and share a batch (TP); not yet checked: refused."""
    dp_replicate_size: int = Field(default=1, gt=0)
    """Replicas of the FSDP shards (HSDP), e.g. one per machine."""
    fsdp_cpu_offload: bool = False
    """FSDP2 keeps the sharded weights and optimizer states in CPU memory between uses."""
    fsdp_mixed_precision: bool = False
    """FSDP2 gathers weights in bf16 and reduces gradients in fp32."""


class DataSection(Section):
    train: str
    """Training data: chat ``messages`` JSONL/JSON, Alpaca, ShareGPT, prompt/completion JSONL, a
    ``datasets`` save_to_disk folder, or a hub dataset name (online only)."""
    valid: str | None = None
    """Validation data, evaluated for loss during training (``sft.eval_strategy``)."""
    format: Literal[FORMATS] = "auto"
    """Row format of the files; auto detects it from the first row."""
    skip_bad_rows: bool = False
    """Skip rows that cannot be read (counted in the run's data_report.json) instead of stopping."""
    max_train_rows: int | None = Field(default=None, gt=0)
    """Use only the first N training rows (quick experiments)."""


class EvalSection(Section):
    files: list[str] = []
    """Held-out chat JSONL files evaluated at the end of training (loss and greedy exact match)."""
    max_new_tokens: int = Field(default=16, gt=0)
    """Greedy generation length; answers longer than this cannot match."""
    batch_size: int = Field(default=64, gt=0)
    """Prompts generated per batch (left-padded)."""
    max_rows: int | None = Field(default=None, gt=0)
    """Evaluate only N rows of each file, evenly spaced through it (held-out files are often
    grouped by task: the first N would score one or two tasks)."""
    compare_base: bool = True
    """Also evaluate the untuned base model on the same prompts, for a side-by-side table."""
    retention_file: str | None = None
    """Plain text of the pretraining domain, one passage per line: loss on it shows forgetting."""


Mode = Literal["train", "freeze", "lora"]
Part = Literal[PARTS]


class ExpertSelectionSection(Section):
    """ESFT: score each MoE layer's experts on the training data and train only the top ones."""

    score: Literal["gate", "token"] = "gate"
    """gate: average router probability per expert; token: share of top-k selections per expert."""
    top_p: float = Field(default=0.2, gt=0, le=1)
    """Per layer, keep the fewest experts whose shares add up to this."""
    rows: int = Field(default=256, gt=0)
    """Training rows scored."""
    file: str | None = None
    """Use a selection saved by `moe-tune select-experts` instead of scoring."""


class TrainableSection(Section):
    """What trains. A preset gives every part a mode; a part named here overrides it. The fields
    below are one per part of ``arch.PARTS`` (tests/test_recipe.py binds the two)."""

    preset: Literal[tuple(PRESETS)] = "full"
    """Starting point: a preset of ``trainable.PRESETS``, e.g. full, freeze_experts (all but the
    routed experts), lora_experts, or esft (selected routed experts only)."""
    expert_selection: ExpertSelectionSection | None = None
    """Restrict the routed experts (train or lora) to the selected ones; the esft preset implies it."""
    embeddings: Mode | None = None
    """Input token embeddings."""
    attention: Mode | None = None
    """Attention (and other sequence mixers: mamba, linear attention)."""
    router: Mode | None = None
    """Router weights of every MoE layer (and their biases)."""
    routed_experts: Mode | None = None
    """The routed experts' fused weight tensors."""
    shared_experts: Mode | None = None
    """Shared experts (Qwen-MoE, DeepSeek, Llama-4, ...) and their gates."""
    dense_mlp: Mode | None = None
    """Feed-forward blocks of dense (non-MoE) layers."""
    norms: Mode | None = None
    """RMSNorm / LayerNorm weights (train or freeze only)."""
    lm_head: Mode | None = None
    """Output projection (shared with the embeddings when tied)."""
    other: Mode | None = None
    """Anything the architecture layer could not place in a part."""

    def overrides(self) -> dict[str, str | None]:
        return {part: getattr(self, part) for part in typing.get_args(Part)}

    def selection(self) -> ExpertSelectionSection | None:
        if self.expert_selection is None and self.preset == "esft":
            return ExpertSelectionSection()
        return self.expert_selection


class RouterSection(Section):
    """Router regularizers, computed once by moe_tune (TRL's and the model's own aux loss stay off)."""

    aux_loss_coef: float | None = Field(default=None, ge=0)
    """Load-balancing loss weight. Unset: the model config's router_aux_loss_coef, as TRL does."""
    z_loss_coef: float = Field(default=0.0, ge=0)
    """ST-MoE router z-loss weight (1e-3 in the paper)."""
    anchor_kl_coef: float = Field(default=0.0, ge=0)
    """Weight of KL(base routing || current routing) on the same hidden states."""
    balance_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    """What the load-balancing loss balances: each micro-batch (every rank's together), or the step's
    whole batch, expert counts summed over accumulation steps too (Qwen's global batch, 2501.11873)."""
    bias_balance_rate: float = Field(default=0.0, ge=0)
    """Aux-loss-free balancing (DeepSeek-V3): after every optimizer step, each expert's selection
    bias moves by this times sign(mean load - its load). For families with a score-correction
    bias (DeepSeek-V3, GLM-4-MoE, ...); 1e-3 in DeepSeek-V3."""


class ExpertsSection(Section):
    """Expert dropout, active in training only."""

    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the routed experts' output (Switch Transformer: 0.4 at expert layers)."""
    shared_dropout: bool = False
    """Apply ``dropout`` to the shared experts' output too."""
    drop_expert_prob: float = Field(default=0.0, ge=0, lt=1)
    """Drop each selected expert of a token with this probability; the rest are reweighted."""


class LoraSection(Section):
    r: int = Field(default=16, gt=0)
    """LoRA rank. On a fused expert tensor (E, out, in) each expert gets its own rank-r pair."""
    alpha: float = Field(default=32, gt=0)
    """Scaling numerator: updates are scaled by alpha / r."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA input. PEFT cannot do this on fused experts or routers: keep 0 there."""
    rank_per_part: dict[Part, int] = {}
    """Rank by part, e.g. {routed_experts: 4} for a smaller per-expert rank."""


class Recipe(Section):
    output_dir: str
    """Run folder: resolved recipe, weights, metrics.jsonl, eval/. Never overwritten without --overwrite."""
    seed: int = 42
    """Seed for data order, initialisation of new weights and dropout."""
    model: ModelSection
    parallel: ParallelSection | None = None
    """Sharded training (FSDP2, expert and tensor parallelism) under torchrun; docs/distributed.md."""
    data: DataSection
    trainable: TrainableSection = TrainableSection()
    router: RouterSection = RouterSection()
    experts: ExpertsSection = ExpertsSection()
    lora: LoraSection = LoraSection()
    sft: dict[str, Any] = {}
    """Passed through to TRL's SFTConfig (learning_rate, max_steps, per_device_train_batch_size, ...)."""
    eval: EvalSection = EvalSection()


# SFTConfig keys that have one home elsewhere in the recipe.
_SFT_OWNED_ELSEWHERE = {"output_dir": "output_dir", "seed": "seed", "router_aux_loss_coef": "router.aux_loss_coef",
                        "chat_template_path": "model.chat_template"}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: ``1e-3`` a float, ``no``/``off`` strings (YAML 1.1: a string, a boolean)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def _nearest(name: str, choices: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _section_of(key: str) -> str | None:
    """``section.key`` for a key written at the top level that belongs in a section
    (``max_steps`` -> ``sft.max_steps``, ``preset`` -> ``trainable.preset``)."""
    for section, field in Recipe.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
                and key in field.annotation.model_fields:
            return f"{section}.{key}"
    sft = {f.name for f in dataclasses.fields(_sft_config_class()) if f.init}
    return f"sft.{key}" if key in sft and key not in _SFT_OWNED_ELSEWHERE else None


def _section_fields(loc: tuple, model: type[BaseModel]) -> list[str]:
    """Valid key names at the location of an error (for 'did you mean')."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def explain_error(err: dict, source: str, schema: type[BaseModel] | None = None) -> str:
    """One line for a pydantic error; ``schema`` (default: Recipe) supplies the 'did you mean'."""
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        fields = _section_fields(err["loc"], schema or Recipe)
        if len(err["loc"]) == 1 and (schema or Recipe) is Recipe and (home := _section_of(str(err["loc"][0]))):
            return f"{source}: unknown key '{path}'; did you mean '{home}'?"
        return f"{source}: unknown key '{path}'{_nearest(str(err['loc'][-1]), fields)}"
    if err["type"] == "missing":
        return f"{source}: missing required key '{path}'"
    if err["type"] == "value_error":
        return f"{source}: {path}: {err['msg'].removeprefix('Value error, ')}"
    return f"{source}: {path}: {err['msg']} (got {err['input']!r})"


# Ranges of SFTConfig values that TRL and transformers check only once training starts (or
# never): checked with the recipe, so that a bad value stops before anything loads.
_SFT_RANGES: dict[str, tuple[typing.Callable[[float], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "greater than 0"),
    **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"),
                    (lambda v: v >= 1, "at least 1")),
    "max_steps": (lambda v: v == -1 or v > 0, "greater than 0, or -1 to train sft.num_train_epochs"),
    "num_train_epochs": (lambda v: v > 0, "greater than 0"),
    "warmup_steps": (lambda v: v >= 0, "0 or more (below 1: a share of the steps)"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "max_grad_norm": (lambda v: v >= 0, "0 or more (0: no clipping)"),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "label_smoothing_factor"), (lambda v: 0 <= v < 1, "in [0, 1)")),
    "adam_epsilon": (lambda v: v > 0, "greater than 0"),
    "logging_steps": (lambda v: v > 0, "greater than 0 (below 1: a share of the steps)"),
    "eval_steps": (lambda v: v > 0, "greater than 0 (below 1: a share of the steps)"),
    "save_steps": (lambda v: v > 0, "greater than 0 (below 1: a share of the steps)"),
    "save_total_limit": (lambda v: v >= 1, "at least 1"),
    "max_length": (lambda v: v >= 1, "at least 1 token"),
    "dataloader_num_workers": (lambda v: v >= 0, "0 or more"),
}


def _sft_config_class():
    from trl import SFTConfig  # noqa: PLC0415  (TRL is slow to import; only needed here)

    return SFTConfig


def check_sft(sft: dict[str, Any], source: str) -> None:
    """Check ``sft`` keys and value types against TRL's SFTConfig before anything heavy runs."""
    if {"activation_checkpointing", "gradient_checkpointing"} <= set(sft):
        raise MoeTuneError(f"{source}: set only one of sft.activation_checkpointing and "
                           "sft.gradient_checkpointing (its deprecated name)")
    cls = _sft_config_class()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, value in sft.items():
        if key in _SFT_OWNED_ELSEWHERE:
            raise MoeTuneError(f"{source}: 'sft.{key}' is set by the recipe key "
                               f"'{_SFT_OWNED_ELSEWHERE[key]}'; move it there")
        if key not in fields:
            raise MoeTuneError(f"{source}: unknown key 'sft.{key}' (not a TRL SFTConfig field)"
                               f"{_nearest(key, fields)}")
        if key in ("activation_checkpointing", "gradient_checkpointing") and value == "auto":
            continue  # moe_tune's own value: on where the planned peak exceeds the machine (train.plan_run)
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # an annotation pydantic cannot check; TRL checks it itself
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            raise MoeTuneError(f"{source}: sft.{key}: {e.errors()[0]['msg']} (got {value!r})") from None
        if key in _SFT_RANGES and isinstance(value, int | float) and not _SFT_RANGES[key][0](value):
            raise MoeTuneError(f"{source}: sft.{key}: must be {_SFT_RANGES[key][1]} (got {value!r})")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["sft.max_steps=3", "output_dir=/tmp/x"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise MoeTuneError(f"command line: override '{item}' is not of the form key.subkey=value")
        try:
            value = _yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MoeTuneError(f"command line: override '{item}' conflicts with an earlier one")
        node[leaf] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise MoeTuneError(f"{shown(path)}: recipe file not found")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MoeTuneError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        where = f":{e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise MoeTuneError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise MoeTuneError(f"{path}: a recipe is a YAML mapping of sections (model:, data:, sft:, ...)")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge overrides into, and validate a recipe. Raises MoeTuneError with the dotted key."""
    path = Path(path)
    data = _merge(read_yaml(path), parse_overrides(overrides or []))
    source = str(path) + (" (with command-line overrides)" if overrides else "")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        # an unknown key explains a "missing" one next to it (``pth`` for ``path``): report it first
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise MoeTuneError(explain_error(errors[0], source)) from None
    check_sft(recipe.sft, source)
    return recipe


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with every local path that exists here absolute (hub names stay): a run
    folder's recipe.yaml then works from any working directory."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path
    out = recipe.model_copy(deep=True)
    out.output_dir = str(Path(recipe.output_dir).resolve())
    out.model.path = absolute(recipe.model.path)
    if recipe.model.chat_template not in TEMPLATE_NAMES:
        out.model.chat_template = absolute(recipe.model.chat_template)
    out.data.train, out.data.valid = absolute(recipe.data.train), absolute(recipe.data.valid)
    out.eval.files = [absolute(f) for f in recipe.eval.files]
    out.eval.retention_file = absolute(recipe.eval.retention_file)
    if recipe.trainable.expert_selection is not None:
        out.trainable.expert_selection.file = absolute(recipe.trainable.expert_selection.file)
    return out


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
