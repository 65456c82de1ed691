import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "data" / "tiny-moe"


def load_script(name: str):
    """Import a file from scripts/ as a module (they are tools, not part of the package)."""
    path = ROOT / "scripts" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def make_data():
    return load_script("make_data")

@pytest.fixture(scope="session")
def ernie_copy() -> Path:
    """data/tiny-moe-ernie, as `make ernie-copy` writes it (the regularizers spec trains it)."""
    import shutil
    import tempfile

    dest = ROOT / "data" / "tiny-moe-ernie"
    if not (dest / "config.json").is_file():  # written aside, then renamed: test workers may race here
        part = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tiny-moe-ernie."))
        load_script("ernie_copy").ernie_copy(SHIPPED_MODEL, part)
        try:
            part.rename(dest)
        except OSError:  # another worker put it in place first
            shutil.rmtree(part)
    return dest


# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist (`make test`, `make check`: one worker per core) each worker, and whatever it
# starts, gets its share of the cores: torch's own default of every core per process would have
# the workers' threads preempt one another. Set before torch is first imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_share))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Keep each test file on one worker (its module fixtures are built once), and every test
    that reads a shared run on the same worker (the run is trained once)."""
    for item in items:
        group = "shared_run" if "shared_run" in getattr(item, "fixturenames", ()) else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


# Runs of the shipped model (the quickstart recipe) that several test files read, each trained once
# a session, when a test first asks for it: shared_run(name). Tests read a run and may write beside
# what it holds (`eval RUN --data OTHER` adds RUN/eval-OTHER); none changes it.
SHARED_RUNS = {
    # test_cli, test_serving: a full fine-tune long enough that greedy answers move away from the
    # base model's (150 steps x 32 rows = 2 epochs), logged every step, evaluated with routing
    # drift halfway and at the end, then on 24 held-out rows
    "full": ["trainable.preset=full", "sft.max_steps=150", "sft.logging_steps=1", "sft.eval_steps=75",
             "eval.max_rows=24", "eval.batch_size=8", "eval.max_new_tokens=4"],
    # test_serving, test_vllm_adapter: LoRA on the experts, as long; not evaluated
    "lora_experts": ["trainable.preset=lora_experts", "sft.max_steps=150", "sft.eval_strategy=no", "eval.files=[]",
                     "eval.retention_file=null"],
}


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """``shared_run(name)``: the folder of the SHARED_RUNS run ``name``, trained on first use."""
    from moe_tune.cli import main

    folder = tmp_path_factory.mktemp("shared-runs")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = None  # until it has trained: a failed run fails each test that asks for it
            cwd = os.getcwd()
            os.chdir(ROOT)  # the recipe names its files from the repository, as a user runs it
            try:
                code = main(["train", "recipes/quickstart.yaml", f"output_dir={folder / name}", *SHARED_RUNS[name]])
            finally:
                os.chdir(cwd)
            assert code == 0, f"the shared run {name!r} did not train"
            made[name] = folder / name
        if made[name] is None:
            pytest.fail(f"the shared run {name!r} did not train (see the first test that asked for it)")
        return made[name]

    return get


def cli_commands() -> dict:
    """moe-tune's commands by name, each the argparse parser the CLI builds for it."""
    import argparse

    from moe_tune.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def tiny_checkpoint(model_type: str, dest: Path, **config) -> Path:
    """A randomly initialised tiny model of ``model_type`` (with ``config``'s fields changed) and
    the shipped tokenizer, saved to ``dest`` so that ``moe-tune train`` can load it like any
    checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from families import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    built = tiny_config(model_type)
    text = built.get_text_config()
    text.update(config)
    for key in [k for k in text.to_dict() if k.startswith("vocab_size")]:  # gemma4: per-layer vocab too
        setattr(text, key, len(tokenizer))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(text, key):
            setattr(text, key, getattr(tokenizer, key))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(built).save_pretrained(dest)
    return _with_shipped_tokenizer(dest)


def shipped_in_bf16(dest: Path) -> Path:
    """The shipped model stored in bf16, as published checkpoints are."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.bfloat16).save_pretrained(dest)
    return _with_shipped_tokenizer(dest)


def _with_shipped_tokenizer(dest: Path) -> Path:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SHIPPED_MODEL / name, dest / name)
    return dest


def without_template(dest: Path) -> Path:
    """The shipped model as a base checkpoint is published: no chat template (its weights linked)."""
    import shutil

    shutil.copytree(SHIPPED_MODEL, dest, ignore=shutil.ignore_patterns("model.safetensors", "chat_template.jinja"))
    (dest / "model.safetensors").symlink_to(SHIPPED_MODEL / "model.safetensors")
    return dest
