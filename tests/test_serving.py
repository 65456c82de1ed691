"""Exports served where users serve them: vLLM's CPU engine on the merged checkpoint and
llama.cpp on the GGUF file, after a full fine-tune, after LoRA on the experts and, where bf16
pays, after a run that held its frozen experts in bf16 (a model folder of two dtypes), answering
100 held-out prompts greedily as transformers does.

The engines come from ``make serving-env`` and ``make llama-cpp``; ``make test`` builds both
and points MOE_TUNE_SERVE_ENV and MOE_TUNE_LLAMA_CPP at them. A plain ``pytest`` without them
skips these tests with the command to run; with the variables set, a missing engine fails.
"""

import json
import os
import re

import pytest
import torch

from moe_tune.export import serving
from moe_tune.cli import main
from moe_tune.data.rows import read_chat_rows, spread
from moe_tune.errors import MoeTuneError
from moe_tune.evaluation.heldout import greedy_answers
from moe_tune.export.gguf import declared_family
from moe_tune.model.loading import checkpoint_dtypes, load_model
from moe_tune.training.sft_trainer import BF16_PAYS, bf16_speedup

from conftest import ROOT, SHIPPED_MODEL, shipped_in_bf16

HELDOUT = ROOT / "data" / "heldout.jsonl"
# as conftest.SHARED_RUNS: long enough that the answers move away from the base model's; not evaluated
TUNE = ["sft.max_steps=150", "sft.eval_strategy=no", "eval.files=[]", "eval.retention_file=null",
        f"data.train={ROOT / 'data' / 'train.jsonl'}", f"data.valid={ROOT / 'data' / 'valid.jsonl'}"]
AGREEMENT = re.compile(r"(vLLM|llama\.cpp): (\d+)/(\d+) greedy answers identical to transformers'")


def _engine(variable: str, find, make: str):
    if variable not in os.environ:
        try:
            find()
        except MoeTuneError:
            pytest.skip(f"run `make {make}` (make test does)")
    return find()


# Each test asks for its engine first: without it, it skips before any run is trained for it.
@pytest.fixture(scope="session")
def vllm():
    return _engine("MOE_TUNE_SERVE_ENV", serving.vllm_python, "serving-env")


@pytest.fixture(scope="session")
def llama_cpp():
    return _engine("MOE_TUNE_LLAMA_CPP", serving.llama_cpp_home, "llama-cpp")


def _bf16_pays() -> bool:
    """A CPU whose bf16 matmuls pay, by the plan's own measure: where bf16 is emulated, the 150
    bf16 steps of the run below would take about an hour."""
    return not torch.cuda.is_available() and bf16_speedup(2048, 2048) >= BF16_PAYS


@pytest.fixture(scope="module")
def bf16_frozen_experts_run(tmp_path_factory):
    """Where bf16 pays, a freeze_experts run of the shipped model stored in bf16, under bf16
    autocast, whose model folder keeps the frozen experts in bf16 and every other weight in fp32
    (experts_policy.holds_frozen_experts_in_bf16)."""
    if not _bf16_pays():
        pytest.skip("frozen experts are held in bf16 only on a CPU whose bf16 matmuls pay")
    folder = tmp_path_factory.mktemp("serving")
    bf16 = shipped_in_bf16(folder / "tiny-moe-bf16")
    run = folder / "bf16_frozen_experts"
    assert main(["train", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={run}", "trainable.preset=freeze_experts",
                 f"model.path={bf16}", "sft.bf16=true", *TUNE]) == 0
    # what the serving tests then read for it: frozen experts in bf16, the rest fp32 (checked here,
    # not in a test of its own: a test that asks for no shared run may be scheduled on the other
    # pytest worker, which would train this run a second time)
    dtypes = checkpoint_dtypes(str(run / "model"))
    assert {("experts" if ".experts." in key else "other", dtype) for key, dtype in dtypes.items()} == {
        ("experts", "BF16"), ("other", "F32")}
    return run


# A full fine-tune and a LoRA-on-experts run of the shipped model (conftest.SHARED_RUNS), and the one above
SERVED = ["full", "lora_experts", "bf16_frozen_experts"]
# vLLM's start costs about 40 s a check: it serves the merged LoRA export (every weight written by
# the merge) and the bf16 one (mixed dtypes), or the full run's where bf16 does not pay (no bf16 run)
SERVED_BY_VLLM = ["lora_experts", "bf16_frozen_experts_or_full"]


@pytest.fixture
def served_run(request, shared_run):
    if request.param == "bf16_frozen_experts":
        return request.getfixturevalue("bf16_frozen_experts_run")
    if request.param == "bf16_frozen_experts_or_full":
        return request.getfixturevalue("bf16_frozen_experts_run") if _bf16_pays() else shared_run("full")
    return shared_run(request.param)


@pytest.fixture(scope="module")
def base_answers():
    model, tokenizer = load_model(str(SHIPPED_MODEL))
    rows = spread(read_chat_rows(HELDOUT), 100)
    return greedy_answers(model.eval(), tokenizer, rows, batch_size=32, max_new_tokens=12)


def _agreement(output: str) -> tuple[int, int]:
    engine, identical, total = AGREEMENT.search(output).groups()
    return int(identical), int(total)


def _served_answers_differ_from_base(checkpoint, base_answers) -> int:
    """How many of the 100 prompts the exported model answers unlike the untuned base."""
    model, tokenizer = load_model(str(checkpoint))
    rows = spread(read_chat_rows(HELDOUT), 100)
    tuned = greedy_answers(model.eval(), tokenizer, rows, batch_size=32, max_new_tokens=12)
    return sum(a != b for a, b in zip(tuned, base_answers))


@pytest.mark.slow
@pytest.mark.parametrize("served_run", SERVED_BY_VLLM, indirect=True)
def test_vllm_answers_as_transformers_does(vllm, served_run, base_answers, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(served_run), "--merged", str(out), "--verify", "vllm"]) == 0
    identical, total = _agreement(capsys.readouterr().out)
    assert total == 100 and identical >= 95
    # what vLLM served is the tuned model: the expert deltas reached it
    assert _served_answers_differ_from_base(out, base_answers) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("served_run", SERVED, indirect=True)
def test_llama_cpp_answers_as_transformers_does(llama_cpp, served_run, tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    assert main(["export", str(served_run), "--gguf", str(gguf)]) == 0
    identical, total = _agreement(capsys.readouterr().out)
    assert total == 100 and identical >= 95
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # the side folder is gone


@pytest.mark.slow
def test_a_quantized_gguf_is_reported_and_replaced_only_with_overwrite(llama_cpp, shared_run, tmp_path, capsys):
    run = shared_run("full")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)  # an earlier export
    assert main(["export", str(run), "--gguf", str(gguf), "--quant", "q4_k_m", "--verify-rows", "20"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--gguf", str(gguf), "--quant", "q4_k_m", "--verify-rows", "20",
                 "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "q4_k_m GGUF by llama.cpp's converter and llama-quantize" in out and _agreement(out)[1] == 20
    assert gguf.stat().st_size > 1000


@pytest.mark.slow
def test_a_refused_export_leaves_nothing(llama_cpp, shared_run, tmp_path, capsys):
    """Agreement below --min-identical (here: every answer must match on a 4-bit file, and the
    tiny model's 4-bit answers do not all match) refuses the export with one line."""
    gguf = tmp_path / "model.gguf"
    code = main(["export", str(shared_run("lora_experts")), "--gguf", str(gguf), "--quant", "q2_k", "--min-identical", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]  # after the loading bars: the one line that says why
    assert "export refused: llama.cpp:" in last and "below 100%; first difference:" in last, last
    assert list(tmp_path.iterdir()) == []


def test_the_shipped_tokenizer_is_declared_as_gpt2(tmp_path):
    """llama.cpp's converter does not know the shipped vocabulary's hash; its pre-tokenizer is
    GPT-2's exactly, which is what gguf_convert registers it by."""
    assert declared_family(SHIPPED_MODEL) == "gpt-2"
    spec = json.loads((SHIPPED_MODEL / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # another split: not GPT-2's any more
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert declared_family(tmp_path) is None


@pytest.mark.parametrize("variable, option, expected", [
    ("MOE_TUNE_SERVE_ENV", ["--merged", "out", "--verify", "vllm"], "vLLM's environment is missing"),
    ("MOE_TUNE_LLAMA_CPP", ["--gguf", "out.gguf"], "llama.cpp is not built")])
def test_a_missing_engine_is_one_line_before_anything_loads(variable, option, expected, tmp_path, monkeypatch,
                                                            capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text((ROOT / "recipes" / "quickstart.yaml").read_text())
    monkeypatch.setenv(variable, str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), *option]) == 2
    err = capsys.readouterr().err.strip()
    make = "make serving-env" if variable == "MOE_TUNE_SERVE_ENV" else "make llama-cpp"
    assert len(err.splitlines()) == 1 and expected in err and make in err, err
    assert not (tmp_path / option[1]).exists()


def test_agreement_counts_and_refuses():
    agreement = serving.Agreement("vLLM", ["q1", "q2", "q3", "q4"], [" a", " b", " c", " d"], [" a", " b", " c", " x"])
    assert agreement.identical == 3 and agreement.share == 0.75
    agreement.check(0.75)
    with pytest.raises(MoeTuneError, match=r"vLLM: 3/4 .* below 95%; first difference: 'q4': transformers ' d', "
                                           r"vLLM ' x'"):
        agreement.check(0.95)

