"""Multi-process training: 2 processes (gloo, CPU) under torchrun against 1 process with the same
global batch, and the shipped launch configs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moe_tune.cli import main
from moe_tune.training.distributed import register_moe_leaf_modules

from conftest import ROOT, SHIPPED_MODEL

COMMON = [str(ROOT / "recipes" / "quickstart.yaml"), "sft.max_steps=8", "sft.logging_steps=1",
          "sft.warmup_steps=0", "sft.eval_strategy=no", "data.valid=null", "data.max_train_rows=512",
          "eval.max_rows=8", "eval.compare_base=false", "eval.retention_file=null"]


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def train(cmd, batch, tmp_path, name, *overrides, base=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([*cmd, *([base] if base else COMMON), f"sft.per_device_train_batch_size={batch}",
                          f"output_dir={tmp_path / name}", *overrides],
                         capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path / name, out


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, monkeypatch):
    one = tmp_path / "one"  # in this process: a second interpreter's imports cost more than the run
    monkeypatch.chdir(ROOT)
    assert main(["train", *COMMON, "sft.per_device_train_batch_size=16", f"output_dir={one}"]) == 0
    two, out = train([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                      "-m", "moe_tune.cli", "train"], 8, tmp_path, "two")
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        # the same rows per step, loss normalised by the global token count: equal up to float order
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=2e-3), step
        # router terms over both ranks' tokens, as one process computes them on the whole batch
        assert b[step]["aux_loss"] == pytest.approx(a[step]["aux_loss"], rel=1e-4), step
        assert b[step]["ce_loss"] == pytest.approx(a[step]["ce_loss"], rel=2e-3), step
    # rank 0 alone wrote the run files and evaluated; the saved model loads and matches
    assert out.stdout.count("run folder:") == 1
    assert (two / "model" / "model.safetensors").is_file() and not (two / "model.tmp").exists()
    assert (two / "eval" / "report.json").is_file()
    # the saved model loads and scores like the single-process one (parameters are not compared
    # one by one: Adam turns float-order differences in near-zero gradients into lr-sized steps)
    from moe_tune.training.run_dir import load_run_model

    load_run_model(two, "float32")
    scores = [json.loads((r / "eval" / "report.json").read_text()) for r in (one, two)]
    name = next(iter(scores[0]))
    a_loss, b_loss = (s[name]["results"]["tuned"]["overall"]["loss"] for s in scores)
    assert b_loss == pytest.approx(a_loss, rel=0.02)


def test_zero3_leaf_modules_only_under_zero3(monkeypatch):
    from moe_tune.model.arch import describe
    from moe_tune.model.loading import load_model

    model, _ = load_model(str(SHIPPED_MODEL))
    assert register_moe_leaf_modules(model, describe(model)) == []  # no ZeRO-3: nothing to do


CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_launch_configs_parse_and_name_existing_options():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    options = {o for action in launch_command_parser()._actions for o in action.option_strings}
    assert {c.stem for c in CONFIGS} == {"ddp", "fsdp2", "zero3"}
    for path in CONFIGS:
        config = ClusterConfig.from_yaml_file(path)  # unknown top-level keys raise
        for section in (config.fsdp_config, config.deepspeed_config):
            for key in section or {}:  # nested keys become `accelerate launch --KEY` options
                assert f"--{key}" in options, f"{path.name}: {key}"
        header = path.read_text().split("\n\n")[0]
        assert "accelerate launch --config_file recipes/accelerate/" + path.name in header
        assert "--num_machines 2" in header  # the several-node command too
    fsdp = ClusterConfig.from_yaml_file(ROOT / "recipes" / "accelerate" / "fsdp2.yaml").fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert ClusterConfig.from_yaml_file(ROOT / "recipes" / "accelerate" / "zero3.yaml").deepspeed_config[
        "zero_stage"] == 3


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp2_config_trains_and_saves_like_plain_training(tmp_path):
    """The shipped FSDP2 config on one GPU: fully_shard wrapping, bf16 mixed precision and the
    gathered save, against a plain bf16 run of the same recipe (one GPU is all there is here)."""
    plain, _ = train([sys.executable, "-m", "moe_tune.cli", "train"], 16, tmp_path, "plain", "sft.bf16=true")
    fsdp, out = train([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml"), "--num_processes", "1",
                       "-m", "moe_tune.cli", "train"], 16, tmp_path, "fsdp2", "sft.bf16=true")
    a, b = losses(plain), losses(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:  # bf16 autocast against FSDP2's bf16 parameters: close, not equal
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=0.05), step
    assert (fsdp / "model" / "model.safetensors").is_file() and (fsdp / "eval" / "report.json").is_file()
    from moe_tune.training.run_dir import load_run_model

    load_run_model(fsdp, "float32")


# --- sharded at load time (the recipe's parallel section) against one process -----------------
#
# Each layout trains 4 steps on 2 or 4 processes (gloo) with 8 rows a step between them, against
# one process with the 8 rows: every step's loss and router terms and the final weights must agree to fp32 order.
# The shipped Mixtral and a tiny Qwen3-MoE; full fine-tuning (with z-loss and the KL anchor on),
# freeze_experts, LoRA on the experts and ESFT. Refused combinations are tested in test_bad_input.

SHARDED = [str(ROOT / "recipes" / "quickstart.yaml"), "sft.max_steps=4", "sft.logging_steps=1",
           "sft.warmup_steps=0", "sft.eval_strategy=no", "data.valid=null", "data.max_train_rows=128",
           "eval.files=[]", "eval.retention_file=null", "sft.save_strategy=steps", "sft.save_steps=2"]
PRESET_OVERRIDES = {"full": ["router.z_loss_coef=0.001", "router.anchor_kl_coef=0.1"],
                    "freeze_experts": ["trainable.preset=freeze_experts"],
                    "lora_experts": ["trainable.preset=lora_experts"],
                    "esft": ["trainable.preset=esft"]}
LAYOUTS = {"fsdp": ["parallel.fsdp_size=2"], "fsdp_ep": ["parallel.fsdp_size=2", "parallel.ep_size=2"],
           # 4 processes: each expert on 2 ranks of 4 (EP 2) and FSDP-sharded between them; HSDP x EP
           "fsdp4_ep2": ["parallel.fsdp_size=4", "parallel.ep_size=2"],
           "hsdp_ep": ["parallel.dp_replicate_size=2", "parallel.fsdp_size=2", "parallel.ep_size=2"]}
PROCESSES = {"fsdp": 2, "fsdp_ep": 2, "fsdp4_ep2": 4, "hsdp_ep": 4}
MATRIX = [("mixtral", "fsdp", p) for p in PRESET_OVERRIDES] + \
         [("mixtral", "fsdp_ep", "esft"), ("qwen3_moe", "fsdp_ep", "full")] + \
         [("qwen3_moe", "fsdp", "lora_experts")] + \
         [("mixtral", "fsdp4_ep2", "full"), ("qwen3_moe", "hsdp_ep", "freeze_experts")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """family -> model path, and (family, preset) -> the single-process run, trained on first use."""
    from conftest import tiny_checkpoint

    folder = tmp_path_factory.mktemp("one-process")
    models = {"mixtral": str(SHIPPED_MODEL),
              "qwen3_moe": str(tiny_checkpoint("qwen3_moe", folder / "qwen3_moe", num_experts=4))}
    runs = {}

    def get(family, preset):
        if (family, preset) not in runs:  # in this process: a second interpreter's imports cost more than the run
            run = folder / f"{family}-{preset}"
            cwd = os.getcwd()
            os.chdir(ROOT)
            try:
                code = main(["train", SHARDED[0], "sft.per_device_train_batch_size=8", f"output_dir={run}",
                             f"model.path={models[family]}", *SHARDED[1:], *PRESET_OVERRIDES[preset]])
            finally:
                os.chdir(cwd)
            assert code == 0
            runs[family, preset] = run
        return runs[family, preset]

    get.models = models
    return get


def saved_weights(run):
    from safetensors.torch import load_file

    (path,) = (run / "model").glob("*.safetensors")
    return load_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("family, layout, preset", MATRIX, ids=["-".join(m) for m in MATRIX])
def test_a_sharded_run_matches_one_process(one_process, tmp_path, family, layout, preset):
    one = one_process(family, preset)
    n = PROCESSES[layout]  # the same 8 rows a step, 8 // n on each rank
    two, out = train([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", "moe_tune.cli",
                      "train"], 8 // n, tmp_path, "two", f"model.path={one_process.models[family]}", *SHARDED[1:],
                     *PRESET_OVERRIDES[preset], *LAYOUTS[layout], base=SHARDED[0])
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # the router terms over both ranks' tokens, as one process sees them
        for key in ("loss", "ce_loss", "aux_loss", "z_loss", "router_kl", "grad_norm"):
            assert (key in b[step]) == (key in a[step]), (step, key)
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
    # RUN/model is an unsharded save, the same files and weights (Adam turns float order into ~1e-5)
    ref, got = saved_weights(one), saved_weights(two)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-4, rtol=0, msg=name)
    assert sorted(p.name for p in (two / "model").iterdir()) == sorted(p.name for p in (one / "model").iterdir())
    if preset == "esft":
        assert json.loads((two / "expert_selection.json").read_text()) == \
            json.loads((one / "expert_selection.json").read_text())
    from transformers import AutoModelForCausalLM

    if preset == "lora_experts":
        from peft import PeftModel

        adapter = json.loads((two / "model" / "adapter_config.json").read_text())
        assert adapter["auto_mapping"]["base_model_class"] == \
            {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(one_process.models[family]), two / "model")
    else:
        AutoModelForCausalLM.from_pretrained(two / "model")  # plain transformers loads it
    # checkpoints keep the weights; training does not resume (transformers' engine keeps no optimizer)
    assert (two / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert out.stdout.count("run folder:") == 1


@pytest.mark.slow
def test_each_rank_holds_the_planned_share_of_the_training_state():
    """benchmarks/parallel_memory.py on the shipped model: each rank's shards of the weights,
    gradients and AdamW moments against `moe-tune plan --gpus 2`'s per-GPU states (FSDP2 x EP)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parallel_memory.py"), "--layouts", "fsdp2_ep"],
                         capture_output=True,
                         text=True, cwd=ROOT, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["layout"]: r for r in json.loads(out.stdout)["results"]}
    assert set(results) == {"fsdp2_ep"}  # FSDP2 alone holds the same states (benchmarks/results/parallel-memory-*)
    for result in results.values():
        assert 0.8 <= result["states_vs_plan"] <= 1.25, result
        assert len(result["per_rank"]) == 2


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: make gpu-check runs for real")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "g")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "gpu-check: no CUDA device here; run it on a machine with a CUDA GPU (the CPU checks are make test)"]
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_a_sharded_run_stops_when_a_rank_dies_and_refuses_to_resume_its_training(tmp_path):
    """One rank killed mid-training: the launcher stops the other within a bounded time (no hang
    on a collective); the run kept its weights-only checkpoints, and --resume says in one line
    why training cannot go on and what to do."""
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                                 "moe_tune.cli", "train", *SHARDED, "sft.max_steps=400", "sft.per_device_train_batch_size=4",
                                 "parallel.fsdp_size=2", f"output_dir={run}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
        assert launcher.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    killed = time.time()
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.time() - killed < 90, err[-2000:]
    assert not (run / "model").exists()  # nothing looks finished
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "moe_tune.cli",
                          "train", str(run), "--resume"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode != 0
    refusals = [line for line in out.stderr.splitlines() if line.startswith("moe-tune: error:")]
    assert refusals and "trained sharded (the parallel section), whose checkpoints hold the weights only" \
        in refusals[0] and "start again with --overwrite" in refusals[0], out.stderr[-2000:]
