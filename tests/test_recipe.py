"""Recipes: every shipped file validates; mistakes name the file and dotted key."""

import re
from pathlib import Path

import pytest

from moe_tune.errors import MoeTuneError
from moe_tune.recipe import Recipe, dump_recipe, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "recipes" / "compare").glob("*.yaml"))  # comparison specs, not recipes
LAUNCH = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))  # accelerate configs (test_distributed)
SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p not in SPECS + LAUNCH)

MINIMAL = """
output_dir: runs/x
model:
  path: data/tiny-moe
data:
  train: data/train.jsonl
sft:
  max_steps: 5
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    text = path.read_text()
    assert text.startswith("#"), "a recipe starts with a comment saying what it is for"
    header = text.split("\n\n")[0]
    launch = "-m moe_tune.cli train" if recipe.parallel is not None else "moe-tune train"  # under torchrun
    assert launch in header, "the header gives the command that runs it"


HUB = ROOT / "recipes" / "hub"  # recipes for real checkpoints, on users' machines
HUB_CONFIGS = {"mixtral-8x7b-qlora": "mixtral-8x7b", "qwen3-30b-a3b-lora-experts": "qwen3-30b-a3b",
               "qwen3-30b-a3b-qlora": "qwen3-30b-a3b",
               "olmoe-1b-7b-freeze-experts": "olmoe-1b-7b", "mixtral-8x7b-base-chatml": "mixtral-8x7b",
               "mixtral-8x7b-fsdp2-ep": "mixtral-8x7b", "qwen3-30b-a3b-fsdp2-ep": "qwen3-30b-a3b"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipes_point_at_existing_files(path):
    recipe = load_recipe(path)
    for f in [recipe.data.train, recipe.data.valid, *recipe.eval.files]:
        if f:
            assert (ROOT / f).is_file(), f
    if HUB in path.parents:
        assert not (ROOT / recipe.model.path).exists() and "/" in recipe.model.path  # a hub id
    else:
        assert (ROOT / recipe.model.path / "config.json").is_file()


def test_the_trainable_section_has_a_field_per_part_and_the_presets_of_trainable():
    import typing

    from moe_tune.recipe import PARTS
    from moe_tune.recipe import TrainableSection
    from moe_tune.recipe import PRESETS

    fields = set(TrainableSection.model_fields) - {"preset", "expert_selection"}
    assert fields == set(PARTS)
    assert typing.get_args(TrainableSection.model_fields["preset"].annotation) == tuple(PRESETS)


def test_every_preset_has_a_recipe_for_the_shipped_model():
    from moe_tune.recipe import PRESETS

    for preset in PRESETS:
        recipe = load_recipe(ROOT / "recipes" / "strategies" / f"{preset}.yaml")
        assert recipe.trainable.preset == preset and recipe.model.path == "data/tiny-moe"


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_recipe_headers_state_the_planned_memory(name, capsys):
    """The GB in each header is what `moe-tune plan` computes from the published config."""
    import json
    import re

    from moe_tune.cli import main

    path = HUB / f"{name}.yaml"
    config = ROOT / "moe_tune" / "model" / "configs" / HUB_CONFIGS[name]
    if load_recipe(path).parallel is not None:  # sharded: the peak per GPU of its layout
        stated = float(re.search(r"per GPU: ([\d.]+) GB of 80", path.read_text()).group(1))
        assert main(["plan", str(path), f"model.path={config}", "--gpu-memory", "80GB", "--json"]) == 0
        fit = json.loads(capsys.readouterr().out)["per_device"]
        assert fit["strategies"][fit["strategy"]]["peak_gb"] == pytest.approx(stated, abs=0.05)
        return
    stated = float(re.search(r"weights \+ optimizer: ([\d.]+) GB", path.read_text()).group(1))
    assert main(["plan", str(path), f"model.path={config}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_gb"] == pytest.approx(stated, abs=0.05)


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_recipes_train_the_answers_only(name, tmp_path):
    from moe_tune.training.sft_trainer import sft_config

    recipe = load_recipe(HUB / f"{name}.yaml")
    assert recipe.sft["assistant_only_loss"] is True and sft_config(recipe, tmp_path).assistant_only_loss is True


def test_every_hub_recipe_is_planned_from_a_published_config():
    assert {p.stem for p in HUB.glob("*.yaml")} == set(HUB_CONFIGS)


def test_minimal_recipe_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.seed == 42 and r.model.dtype == "float32" and r.eval.files == []
    assert r.sft == {"max_steps": 5}


def test_overrides_are_typed_and_nested(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["sft.max_steps=3", "output_dir=/tmp/y",
                                               "sft.learning_rate=2e-4", "eval.compare_base=false"])
    assert r.sft["max_steps"] == 3 and r.output_dir == "/tmp/y"
    assert r.sft["learning_rate"] == pytest.approx(2e-4) and r.eval.compare_base is False


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(MoeTuneError, match="key.subkey=value"):
        parse_overrides(["sft.max_steps"])
    with pytest.raises(MoeTuneError, match="key.subkey=value"):
        parse_overrides(["sft..x=1"])


def test_dump_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    again = load_recipe(write(tmp_path, dump_recipe(r)))
    assert again == r


@pytest.mark.parametrize("text, expected", [
    (MINIMAL.replace("path:", "pth:"), r"unknown key 'model.pth'; did you mean 'path'"),
    (MINIMAL + "evall:\n  files: []\n", r"unknown key 'evall'; did you mean 'eval'"),
    (MINIMAL.replace("max_steps", "max_stepz"), r"unknown key 'sft.max_stepz'.*did you mean 'max_steps'"),
    (MINIMAL.replace("max_steps: 5", "max_steps: five"), r"sft.max_steps: .*integer.*'five'"),
    (MINIMAL.replace("data:\n  train: data/train.jsonl\n", ""), r"missing required key 'data'"),
    (MINIMAL + "eval:\n  batch_size: -1\n", r"eval.batch_size: .*greater than 0"),
    (MINIMAL + "model:\n  path: x\n  dtype: float8\n", r"model.dtype"),
    (MINIMAL.replace("max_steps: 5", "output_dir: x"), r"'sft.output_dir' is set by the recipe key 'output_dir'"),
    (MINIMAL.replace("max_steps: 5", "router_aux_loss_coef: 0.01"), r"'sft.router_aux_loss_coef' is set by the recipe key 'router.aux_loss_coef'"),
    ("model: [1, 2\n", r"r.yaml:\d+: not valid YAML"),
    ("- just\n- a list\n", r"a recipe is a YAML mapping"),
])
def test_recipe_errors_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(MoeTuneError, match=expected) as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_override_errors_name_the_key(tmp_path):
    with pytest.raises(MoeTuneError, match=r"command-line overrides.*unknown key 'sft.lerning_rate'"
                                           r".*did you mean 'learning_rate'"):
        load_recipe(write(tmp_path, MINIMAL), ["sft.lerning_rate=1e-3"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(MoeTuneError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(MINIMAL.encode("utf-16"))
    with pytest.raises(MoeTuneError, match="not UTF-8"):
        load_recipe(path)


def test_yaml_12_scalars(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["sft.eval_strategy=no", "sft.learning_rate=1e-3",
                                               "eval.compare_base=false", "sft.bf16=true"])
    assert r.sft["eval_strategy"] == "no" and r.sft["learning_rate"] == 1e-3
    assert r.eval.compare_base is False and r.sft["bf16"] is True


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_comparison_spec_validates(path, ernie_copy):
    from moe_tune.evaluation.compare import check_spec, load_spec

    spec = load_spec(path)
    check_spec(spec)  # every variant's recipe
    assert len(spec.seeds) == 3 and "moe-tune compare" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("override, says", [
    ("sft.learning_rate=-1e-3", "sft.learning_rate: must be greater than 0 (got -0.001)"),
    ("sft.per_device_train_batch_size=0", "sft.per_device_train_batch_size: must be at least 1 (got 0)"),
    ("sft.max_steps=-5", "sft.max_steps: must be greater than 0, or -1 to train sft.num_train_epochs (got -5)"),
    ("sft.gradient_accumulation_steps=0", "sft.gradient_accumulation_steps: must be at least 1 (got 0)"),
    ("sft.adam_beta2=1.0", "sft.adam_beta2: must be in [0, 1) (got 1.0)"),
])
def test_out_of_range_sft_values_stop_plan_and_train_before_anything_loads(tmp_path, capsys, override, says):
    """TRL and torch find these only once training starts (torch's 'Invalid learning rate' after
    the model loaded, a run folder left behind); the recipe check finds them first."""
    from moe_tune.cli import main

    with pytest.raises(MoeTuneError, match=re.escape(says)):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", [override])
    for command in ("plan", "train"):
        assert main([command, str(ROOT / "recipes" / "quickstart.yaml"), override,
                     f"output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "run").exists()


def test_in_range_sft_values_pass(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["sft.max_steps=-1", "sft.num_train_epochs=0.5",
                                                                 "sft.warmup_steps=0.1", "sft.max_grad_norm=0"])
    assert recipe.sft["max_steps"] == -1 and recipe.sft["warmup_steps"] == 0.1


def test_a_missing_relative_path_is_named_with_the_folder_it_was_read_from(tmp_path, monkeypatch, capsys):
    """Relative paths are read from the working directory; run elsewhere, the error says where."""
    from moe_tune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(ROOT / "recipes" / "quickstart.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"data/tiny-moe (read from {tmp_path}): no such model folder" in err
    assert main(["plan", "--help"]) == 0
    assert "read from the current working directory" in " ".join(capsys.readouterr().out.split())
