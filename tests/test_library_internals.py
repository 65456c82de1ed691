"""The private internals of transformers, TRL, PEFT, accelerate, datasets and bitsandbytes that
moe_tune reaches into, named in one place: an upgrade that moves one fails here, by name, rather
than somewhere in a run. pyproject.toml caps those libraries at the releases this list was checked against."""

import ast
import importlib
import importlib.metadata
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl import SFTConfig

from families import tiny_config

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
OUR_CODE = ("moe_tune", "benchmarks", "scripts")

# (module, attribute path): every private name of those libraries that our code uses, as the module
# it comes from and the path to it there. An attribute set in __init__ is looked up on a tiny real
# instance of its class. A path "" stands for a private module itself.
INTERNALS = [
    # moe.experts_kernel: the default SiLU gate of experts classes, recognised and differentiated in place
    ("transformers.integrations.moe", "_default_apply_gate"),
    # moe.experts_kernel: transformers' grouped-matmul kernel (the CUDA path)
    ("transformers.integrations.moe", "_grouped_linear"),
    # moe.experts_kernel: the gate every experts class gets, and the expert-parallel flag of its instances
    ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts._apply_gate"),
    ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts._is_expert_parallel"),
    # moe.experts_policy, training.pipeline: whether a model's experts can take another kernel
    ("transformers", "PreTrainedModel._can_set_experts_implementation"),
    # moe.experts_policy, benchmarks/throughput.py: the experts kernel a model's config names
    ("transformers", "PretrainedConfig._experts_implementation"),
    # plan.accounting: eager attention keeps its (B, heads, S, S) probabilities
    ("transformers", "PretrainedConfig._attn_implementation"),
    # plan.fit: the layer classes FSDP wraps one by one
    ("transformers", "PreTrainedModel._no_split_modules"),
    # training.sft_trainer: MoeSFTTrainer overrides it, to resume through from_pretrained
    ("transformers", "Trainer._load_from_checkpoint"),
    # training.sft_trainer: MoeSFTTrainer overrides it, so that every save writes the config as loaded
    ("transformers", "Trainer._save"),
    # training.sft_trainer: TRL's num_tokens count, carried on by a resumed run
    ("trl", "SFTTrainer._total_train_tokens"),
    # model.quantized_experts: transformers' bitsandbytes quantizers, subclassed to take the routed
    # experts too (their hooks before and after the weights load), picked by name from transformers'
    # mapping while a model loads (model.loading.quantizing_experts), with the per-tensor step's base
    ("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer._process_model_before_weight_loading"),
    ("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer._process_model_after_weight_loading"),
    ("transformers.quantizers.quantizer_bnb_8bit", "Bnb8BitHfQuantizer._process_model_before_weight_loading"),
    ("transformers.quantizers.quantizer_bnb_8bit", "Bnb8BitHfQuantizer._process_model_after_weight_loading"),
    ("transformers.quantizers.auto", "AUTO_QUANTIZER_MAPPING"),
    ("transformers.core_model_loading", "ConversionOps"),
    # model.quantized_experts: bitsandbytes' C++ CPU dequantization of 4-bit blocks, called into a
    # buffer moe_tune reuses (its dequantize_4bit writes into a fresh tensor only on a CPU); the
    # names are cdequantize_blockwise_cpu_{nf4,fp4}_{bf16,fp32,fp16}, with the arguments of
    # bitsandbytes/backends/cpu/ops.py
    ("bitsandbytes.cextension", "lib._lib.cdequantize_blockwise_cpu_nf4_bf16"),
    ("bitsandbytes.cextension", "lib._lib.cdequantize_blockwise_cpu_fp4_fp32"),
    # plan.accounting: the vocabulary chunk of TRL's fused LM-head loss
    ("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE"),
]


def instance_of(cls: type, tmp_path: Path):
    """A tiny real object of ``cls``: the Mixtral model of tests/families.py, its config or one of
    its modules, or a trainer of it."""
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    if issubclass(cls, Trainer):
        tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-moe")
        return cls(model=model, args=SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                   train_dataset=Dataset.from_dict({"text": ["a row"]}), processing_class=tokenizer)
    return next(x for x in (model.config, *model.modules()) if isinstance(x, cls))


def exists(module: str, path: str, tmp_path: Path) -> bool:
    try:
        obj = importlib.import_module(module)
        *owners, name = path.split(".") if path else [""]
        for part in owners:
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    if not name or hasattr(obj, name):
        return True
    return isinstance(obj, type) and hasattr(instance_of(obj, tmp_path), name)


@pytest.mark.parametrize("module, path", INTERNALS, ids=[f"{m}:{p}" for m, p in INTERNALS])
def test_private_internal_exists(module, path, tmp_path):
    library = module.split(".")[0]
    version = importlib.metadata.version(library)
    assert exists(module, path, tmp_path), (
        f"{module}:{path} is gone from {library} {version}; moe_tune uses it (see its comment in INTERNALS): "
        f"change moe_tune to the new way, update INTERNALS, and move {library}'s cap in pyproject.toml")


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.endswith("__") for part in dotted.split("."))


def private_imports(path: Path):
    """(line, module, name) of each private module or name imported from the libraries."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in LIBRARIES:
            for alias in node.names:
                if _private(node.module) or _private(alias.name):
                    yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES and _private(alias.name):
                    yield node.lineno, alias.name, ""


# Only imports can be found this way: an attribute access (``model._x``, ``getattr(cfg, "_x")``)
# does not say whose object it reads, so a new one has to be added to INTERNALS by hand.
def test_no_unlisted_private_import():
    listed = set(INTERNALS)
    unlisted = [f"{path.relative_to(ROOT)}:{line} imports {module}{':' + name if name else ''}"
                for folder in OUR_CODE for path in sorted((ROOT / folder).rglob("*.py"))
                for line, module, name in private_imports(path) if (module, name) not in listed]
    assert not unlisted, ("private internals not in INTERNALS (add each, with a comment saying what it is "
                          "for):\n" + "\n".join(unlisted))


def test_the_scan_finds_private_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("from transformers.integrations.moe import (\n    ALL_EXPERTS_FUNCTIONS,\n"
                      "    _grouped_linear as kernel,\n)\nimport trl._compat\nfrom peft import __version__\n"
                      "from moe_tune import _ours\n")
    assert list(private_imports(source)) == [(1, "transformers.integrations.moe", "_grouped_linear"),
                                             (5, "trl._compat", "")]
