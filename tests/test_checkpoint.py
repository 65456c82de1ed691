"""Export round trips: adapter reload, merged reload, same logits; a mismatch is refused."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moe_tune.model.arch import describe
from moe_tune.cli import main
from moe_tune.data.rows import read_chat_rows
from moe_tune.export.checkpoint import _fingerprint, _sample_batch, check_merge
from moe_tune.model.loading import load_model

from conftest import ROOT, SHIPPED_MODEL

QUICK = ["sft.max_steps=15", "sft.learning_rate=5e-3", "sft.eval_strategy=no", "data.max_train_rows=128",
         "eval.files=[]", "sft.warmup_steps=0"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={run}", *QUICK,
                 "trainable.preset=lora_all", "trainable.router=lora", "trainable.norms=train",
                 f"data.train={ROOT / 'data' / 'train.jsonl'}", f"data.valid={ROOT / 'data' / 'valid.jsonl'}"])
    assert code == 0
    return run


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
def test_adapter_and_merged_checkpoints_reload_with_the_same_logits(lora_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merged", str(out)]) == 0
    base, tokenizer = load_model(str(SHIPPED_MODEL))
    batch = _sample_batch(tokenizer, read_chat_rows(ROOT / "data" / "heldout.jsonl", 6))
    adapter = PeftModel.from_pretrained(base, lora_run / "model").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged, batch), logits(adapter, batch), atol=1e-4, rtol=1e-4)
    # the adapter really changed the model: LoRA on experts, router and attention, norms trained
    plain = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL).eval()
    assert not torch.allclose(logits(plain, batch), logits(merged, batch), atol=1e-3)
    assert describe(merged).num_experts == 8


@pytest.mark.slow
def test_export_never_replaces_a_folder_silently(lora_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(lora_run), "--merged", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--merged", str(out), "--overwrite"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_check_merge_reports_a_different_model():
    base, tokenizer = load_model(str(SHIPPED_MODEL))
    arch = describe(base)
    batch = _sample_batch(tokenizer, read_chat_rows(ROOT / "data" / "heldout.jsonl", 4))
    before = _fingerprint(base, arch, batch)
    assert check_merge(before, _fingerprint(base, arch, batch)) is None
    with torch.no_grad():
        base.get_submodule(arch.layers[0].router_weight.rsplit(".", 1)[0]).weight.mul_(-1)
    problem = check_merge(before, _fingerprint(base, arch, batch))
    assert problem is not None and ("logits differ" in problem or "router" in problem)


def test_export_of_a_non_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--merged", str(tmp_path / "out")]) == 2
    assert "not a moe-tune run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_a_base_model_plus_adapter(lora_run, tmp_path, capsys):
    import json

    out = tmp_path / "eval"
    code = main(["eval", str(SHIPPED_MODEL), "--adapter", str(lora_run / "model"), "--data",
                 str(ROOT / "data" / "heldout.jsonl"), "--max-rows", "12", "--max-new-tokens", "4",
                 "--retention", str(ROOT / "data" / "retention.txt"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "heldout.json").read_text())["results"]
    assert set(results) == {"base", "tuned"}
    assert results["base"]["overall"]["loss"] != results["tuned"]["overall"]["loss"]
    assert set(json.loads((out / "retention.json").read_text())["results"]) == {"base", "tuned"}
    # the routers carry LoRA in this run: their analytics are left out, with a note, not wrong
    assert "routing analytics of 'tuned' skipped" in capsys.readouterr().out
