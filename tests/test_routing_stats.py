"""Routing analytics: each metric against a hand-computed value, and the report's files."""

import json
import math

import pytest
import torch

from moe_tune.model.arch import describe
from moe_tune.data.rows import read_chat_rows
from moe_tune.model.loading import load_model
from moe_tune.evaluation.report import write_report
from moe_tune.moe.routing import RouterTap, chat_batches
from moe_tune.evaluation.routing_stats import imbalance, js_divergence, profile, summarize

from conftest import ROOT, SHIPPED_MODEL


def test_imbalance_by_hand():
    stats = imbalance(torch.tensor([0.5, 0.25, 0.25, 0.0]))
    assert stats["cv"] == pytest.approx(math.sqrt(0.03125) / 0.25)
    assert stats["max_over_mean"] == pytest.approx(2.0)


def test_js_divergence_by_hand():
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(math.log(2))
    p = torch.tensor([0.2, 0.3, 0.5])
    assert js_divergence(p, p) == pytest.approx(0.0)
    q = torch.tensor([0.5, 0.3, 0.2])
    m = (p + q) / 2
    expected = 0.5 * float((p * (p / m).log()).sum()) + 0.5 * float((q * (q / m).log()).sum())
    assert js_divergence(p, q) == pytest.approx(expected)


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load_model(str(SHIPPED_MODEL))
    rows = read_chat_rows(ROOT / "data" / "heldout.jsonl")[::25]  # 18 rows, several tasks
    return model, tokenizer, describe(model), rows


def test_profile_by_hand(shipped):
    model, tokenizer, arch, rows = shipped
    prof = profile(model, arch, tokenizer, rows, batch_size=5)
    block = arch.layers[0].block
    # the same rows one by one, counted by hand
    counts, entropy, tokens = torch.zeros(8), 0.0, 0
    for _, enc in chat_batches(tokenizer, rows, 1):
        with RouterTap(model, arch) as tap, torch.no_grad():
            model(**enc)
            r = tap.take(enc["attention_mask"])[block]
        counts += torch.bincount(r.topk.reshape(-1), minlength=8)
        entropy += float(-(r.probs * r.probs.log()).sum())
        tokens += r.probs.shape[0]
    torch.testing.assert_close(prof.load[block], counts / counts.sum())
    assert prof.entropy[block] == pytest.approx(entropy / tokens, rel=1e-4)
    assert prof.top1[block].shape == (tokens,)
    assert set(prof.task_load) == {r["task"] for r in rows}
    for layers in prof.task_load.values():
        assert float(layers[block].sum()) == pytest.approx(1.0)


def test_summary_and_drift(shipped):
    model, tokenizer, arch, rows = shipped
    prof = profile(model, arch, tokenizer, rows)
    same = summarize(prof, prof)
    assert same["mean_over_layers"]["js_from_base"] == pytest.approx(0.0)
    assert same["mean_over_layers"]["top1_changed"] == 0.0
    moved = profile(model, arch, tokenizer, rows)
    moved.top1 = {b: (t + 1) % 8 for b, t in moved.top1.items()}  # every top-1 different
    assert summarize(moved, prof)["mean_over_layers"]["top1_changed"] == 1.0
    assert set(same["layers"][arch.layers[0].block]) >= {"load", "cv", "max_over_mean", "entropy",
                                                          "never_selected", "js_from_base", "top1_changed"}


def test_report_files(shipped, tmp_path):
    from moe_tune.evaluation.heldout import evaluate

    model, tokenizer, arch, rows = shipped
    results = {"base": evaluate(model, tokenizer, rows, max_new_tokens=3, progress=False)}
    results["tuned"] = results["base"]
    prof = profile(model, arch, tokenizer, rows)
    routing = {"base": summarize(prof), "tuned": summarize(prof, prof)}
    md = write_report(tmp_path, {"data/heldout.jsonl": {"results": results, "routing": routing}})
    text = md.read_text()
    assert "| tuned | " in text and "![drift](heldout_drift.png)" in text
    for name in ("expert_load", "metrics", "drift", "task_usage"):
        png = tmp_path / f"heldout_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["data/heldout.jsonl"]["routing"]["tuned"]["mean_over_layers"]["js_from_base"] == 0.0
