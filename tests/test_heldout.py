"""Evaluation on the shipped model: exact match, assistant-token loss, batched generation."""

import math

import pytest
import torch

from moe_tune.data.rows import read_chat_rows
from moe_tune.evaluation.heldout import evaluate, exact_match, format_table, normalize
from moe_tune.model.loading import load_model

from conftest import SHIPPED_MODEL


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(str(SHIPPED_MODEL))


@pytest.fixture(scope="module")
def rows(root):
    return read_chat_rows(root / "data" / "heldout.jsonl")[::15]  # 30 rows, every task family


def test_normalize_and_exact_match():
    assert normalize("  Velm.\n") == "Velm"
    assert exact_match(" 12000 ", "12000")
    assert not exact_match("cat", "CAT")  # case matters: uppercasing is a task
    assert not exact_match("Velm tor", "Velmtor")


def test_loss_is_mean_nll_over_answer_tokens(model_and_tokenizer, rows):
    model, tok = model_and_tokenizer
    result = evaluate(model, tok, rows[:3], batch_size=2, max_new_tokens=4, progress=False)
    # reference: one row at a time, no padding, answer tokens found from the chat template
    nll, count = 0.0, 0
    for row in rows[:3]:
        enc = tok.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
        for t, is_answer in enumerate(enc["assistant_masks"]):
            if is_answer:
                nll -= logp[t - 1, enc["input_ids"][t]].item()
                count += 1
    assert result["overall"]["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert result["overall"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_batched_generation_matches_one_by_one(model_and_tokenizer, rows):
    model, tok = model_and_tokenizer
    model.config.output_router_logits = True  # as during training: evaluation must turn it off
    batched = evaluate(model, tok, rows[:8], batch_size=8, max_new_tokens=6, progress=False)
    single = evaluate(model, tok, rows[:8], batch_size=1, max_new_tokens=6, progress=False)
    assert [s["prediction"] for s in batched["samples"]] == [s["prediction"] for s in single["samples"]]
    assert model.config.output_router_logits is True and model.training is False
    model.config.output_router_logits = False


def test_per_task_and_group_breakdown(model_and_tokenizer, rows):
    model, tok = model_and_tokenizer
    result = evaluate(model, tok, rows, batch_size=16, max_new_tokens=4, progress=False)
    assert set(result["per_group"]) == {"new_phrasing", "unseen_task"}
    assert sum(g["n"] for g in result["per_task"].values()) == len(rows) == result["overall"]["n"]
    hits = sum(s["correct"] for s in result["samples"])
    assert 0 <= hits <= len(result["samples"])
    table = format_table({"base": result, "tuned": result})
    assert table.splitlines()[0].startswith("|  | n | base exact match | tuned exact match")
    assert "task: capital" in table and "group: unseen_task" in table


def test_rouge_l_uses_the_maintained_scorer():
    from moe_tune.evaluation.heldout import rouge_l

    # LCS "the cat sat" = 3 tokens; precision 3/3, recall 3/4 -> F = 6/7
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx([6 / 7])
    assert rouge_l(["CAT"], ["cat"]) == [1.0]  # rouge-score lowercases; exact match does not


def test_text_loss_by_hand(model_and_tokenizer):
    from moe_tune.evaluation.heldout import text_loss

    model, tok = model_and_tokenizer
    texts = ["The capital of Falfenia is Zorbro.", "After 17 comes 18."]
    nll, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
        nll -= sum(logp[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1))
        count += ids.shape[1] - 1
    result = text_loss(model, tok, texts, batch_size=2)
    assert result["loss"] == pytest.approx(nll / count, rel=1e-4) and result["n"] == 2
