"""Held-out evaluation: loss on assistant tokens and greedy-generation exact match, per task.

Router logits are turned off for inference: with ``output_router_logits=True``, batched
generation on left-padded input crashes in several MoE families, and nothing here needs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe_tune.data.rows import split_prompt
from moe_tune.model import templates
from moe_tune.model.loading import padding_side
from moe_tune.training.run_dir import write_json


def normalize(text: str) -> str:
    """Whitespace-collapsed, without a trailing full stop; case is kept (uppercasing is a task)."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


@contextlib.contextmanager
def inference_mode(model):
    """Eval mode, no grad, router logits off; restores the model's state afterwards."""
    config = model.config.get_text_config()
    saved = (model.training, getattr(config, "output_router_logits", None))
    if saved[1] is not None:
        config.output_router_logits = False
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(saved[0])
        if saved[1] is not None:
            config.output_router_logits = saved[1]


def on_accelerator(model):
    """The model on this process's GPU, when there is one and the model is on the CPU: where
    evaluation runs. Quantized models stay where bitsandbytes put them."""
    if torch.cuda.is_available() and model.device.type == "cpu" and not getattr(model, "is_quantized", False):
        model.to(torch.device("cuda", torch.cuda.current_device()))
    return model


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _answer_losses(model, tokenizer, rows: list[dict], batch_size: int) -> list[tuple[float, int]]:
    """Per row: (summed cross-entropy over the assistant tokens, number of those tokens)."""
    out, how = [], templates.masking(tokenizer)  # the assistant tokens of any template
    for batch in _batches(rows, batch_size):
        enc = [dict(zip(("input_ids", "assistant_masks"), templates.tokenize_row(tokenizer, r["messages"], how)))
               for r in batch]
        width = max(len(e["input_ids"]) for e in enc)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in enc])
        attn = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in enc])
        mask = torch.tensor([e["assistant_masks"] + [0] * (width - len(e["input_ids"])) for e in enc])
        ids, attn = ids.to(model.device), attn.to(model.device)
        logits = model(input_ids=ids, attention_mask=attn).logits.float()  # (batch, seq, vocab)
        # token t is predicted from position t-1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        nll = nll.cpu()  # (batch, seq - 1), read row by row below
        target = mask[:, 1:].bool()
        out += [(float(nll[i][target[i]].sum()), int(target[i].sum())) for i in range(len(batch))]
    return out


def greedy_answers(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int,
                   progress: bool = False) -> list[str]:
    """Each row's greedy completion of its conversation up to the final answer, decoded."""
    outputs = []
    with padding_side(tokenizer, "left"):
        for batch in tqdm(list(_batches(rows, batch_size)), desc="generating", disable=not progress):
            prompts = [tokenizer.apply_chat_template(split_prompt(r)[0], tokenize=False,
                                                     add_generation_prompt=True) for r in batch]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure per pair, from Google's rouge-score package."""
    from rouge_score import rouge_scorer  # noqa: PLC0415

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def _summary(indices: list[int], losses, hits, rouge) -> dict:
    nll = sum(losses[i][0] for i in indices)
    n_tok = sum(losses[i][1] for i in indices)
    loss = nll / n_tok if n_tok else float("nan")
    return {"n": len(indices), "exact_match": sum(hits[i] for i in indices) / len(indices),
            "rouge_l": sum(rouge[i] for i in indices) / len(indices),
            "loss": loss, "perplexity": math.exp(loss) if n_tok else float("nan")}


@torch.no_grad()
def text_loss(model, tokenizer, texts: list[str], batch_size: int = 16) -> dict:
    """Mean next-token loss on plain text (each passage after a BOS, as in pretraining): the
    retention check, to show what fine-tuning forgot."""
    nll, count = 0.0, 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    with inference_mode(model):
        for batch in _batches(texts, batch_size):
            ids = [bos + tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch]
            width = max(map(len, ids))
            pad = tokenizer.pad_token_id
            x = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=model.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=model.device)
            logits = model(input_ids=x, attention_mask=mask).logits.float()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            nll += float((losses * mask[:, 1:]).sum())
            count += int(mask[:, 1:].sum())
    return {"n": len(texts), "loss": nll / count, "perplexity": math.exp(nll / count)}


def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 64, max_new_tokens: int = 16,
             progress: bool = True) -> dict:
    """Loss and exact match over ``rows``, overall, per ``task`` and per ``group`` field."""
    with inference_mode(model):
        losses = _answer_losses(model, tokenizer, rows, batch_size)
        predictions = greedy_answers(model, tokenizer, rows, batch_size, max_new_tokens, progress)
    references = [split_prompt(r)[1] for r in rows]
    hits = [exact_match(p, ref) for p, ref in zip(predictions, references)]
    rouge = rouge_l(predictions, references)
    result = {"overall": _summary(list(range(len(rows))), losses, hits, rouge)}
    for key in ("group", "task"):
        groups = defaultdict(list)
        for i, r in enumerate(rows):
            if key in r:
                groups[r[key]].append(i)
        if groups:
            result[f"per_{key}"] = {g: _summary(idx, losses, hits, rouge) for g, idx in sorted(groups.items())}
    result["samples"] = [{"task": r.get("task"), "prompt": split_prompt(r)[0][-1]["content"],
                          "reference": split_prompt(r)[1], "prediction": p, "correct": h}
                         for r, p, h in list(zip(rows, predictions, hits))[:20]]
    return result


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table with one exact-match and one loss column per model (e.g. base, tuned)."""
    names = list(results)
    first = results[names[0]]
    header = (["", "n"] + [f"{m} exact match" for m in names] + [f"{m} ROUGE-L" for m in names]
              + [f"{m} loss" for m in names])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def line(label: str, key: str | None, group: str | None) -> str:
        stats = [results[m][key][group] if key else results[m]["overall"] for m in names]
        cells = [label, str(stats[0]["n"])] + [f"{s['exact_match']:.1%}" for s in stats]
        cells += [f"{s['rouge_l']:.3f}" for s in stats] + [f"{s['loss']:.3f}" for s in stats]
        return "| " + " | ".join(cells) + " |"

    lines.append(line("**all**", None, None))
    for key in ("per_group", "per_task"):
        for group in first.get(key, {}):
            lines.append(line(f"{key[4:]}: {group}", key, group))
    return "\n".join(lines)


def save_results(path: Path, data_file: str, results: dict[str, dict]) -> None:
    """``{"file": ..., "results": {label: metrics}}``; labels already in the file are kept."""
    old = json.loads(path.read_text())["results"] if path.is_file() else {}
    write_json(path, {"file": data_file, "results": {**old, **results}})
