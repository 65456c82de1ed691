"""Chat rows whose lengths are long-tailed like a public instruction set's (Alpaca's), for
benchmarks/packing.py: many short rows and a few long ones, which is where padding costs most.

    python scripts/make_long_tailed_data.py --out /tmp/long-tailed.jsonl   # 2,400 rows, as data/train.jsonl

Each row is ``{"messages": [user, assistant]}``, like data/train.jsonl. The prompt's length and
the answer's are drawn separately, each from a log-normal given by its median and its 95th
percentile, in tokens of the shipped tokenizer (data/tiny-moe):

    prompt: median 16, 95th percentile 50  (sigma = ln(50/16) / 1.645 = 0.69)
    answer: median 40, 95th percentile 180 (sigma = ln(180/40) / 1.645 = 0.91)

so that a whole row (the chat template adds 6 tokens) has a median near 65 tokens and a tail
past 200. These are chosen, not fitted: nothing is downloaded here. They are Alpaca-like in
shape: Alpaca's 52,002 rows pair a short instruction with an optional input (about 40% of rows
have one, its datasheet says), which spreads the prompts, and answers that run from one word to
several paragraphs; Stanford's fine-tuning cut rows at 512 tokens. A row longer than
``--max-tokens`` (template included; default 256, the shipped model's max_position_embeddings) is
drawn again, which trims the far tail (3% of draws at the defaults; the summary printed
says how many).

The words are drawn, seeded, from the words of data/train.jsonl, each row's text made exactly as
long as drawn: every word costs the tokens it takes after a space (the tokenizer splits at
spaces, so the costs add up), and a word that would run past the drawn length is skipped for
another. Same arguments, same file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "data" / "tiny-moe"
WORDS_FROM = ROOT / "data" / "train.jsonl"
Z95 = 1.6449  # the standard normal's 95th percentile


@dataclass(frozen=True)
class LogNormal:
    """A length in tokens, log-normal, given by its median and 95th percentile."""

    median: float
    p95: float

    @property
    def sigma(self) -> float:
        return math.log(self.p95 / self.median) / Z95

    def draw(self, rng: random.Random) -> int:
        return max(1, round(rng.lognormvariate(math.log(self.median), self.sigma)))


PROMPT = LogNormal(median=16, p95=50)
ANSWER = LogNormal(median=40, p95=180)
ROWS, SEED, MAX_TOKENS = 2400, 0, 256


@dataclass(frozen=True)
class Vocabulary:
    """data/train.jsonl's words with the tokens each costs: after a space (inside a text), and
    first in the user's turn (the template puts a newline, not a space, before it)."""

    words: list[str]
    after_space: dict[str, int]
    first: dict[str, int]
    template_tokens: int  # what the chat template adds to a row's two texts


def vocabulary(tokenizer) -> Vocabulary:
    words = sorted({w for line in WORDS_FROM.read_text().splitlines()
                    for m in json.loads(line)["messages"] for w in m["content"].split()})

    def cost(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    template = row_tokens(tokenizer, chat("a", "b")) - cost("a") - cost(" b")
    return Vocabulary(words, {w: cost(" " + w) for w in words}, {w: cost(w) for w in words}, template)


def text(rng: random.Random, tokens: int, vocab: Vocabulary, costs: dict[str, int]) -> str:
    """Words costing exactly ``tokens``: the first word at ``costs``, the rest after a space."""
    out = []
    while tokens > 0:
        word = rng.choice(vocab.words)
        cost = (vocab.after_space if out else costs)[word]
        if cost <= tokens:  # one-token words abound, so a fitting one comes soon
            out.append(word)
            tokens -= cost
    return " ".join(out)


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def row_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def generate(rows: int = ROWS, seed: int = SEED, max_tokens: int = MAX_TOKENS,
             tokenizer=None) -> tuple[list[dict], int]:
    """(the rows, how many draws were over ``max_tokens`` and drawn again)."""
    from transformers import AutoTokenizer  # noqa: PLC0415  (deferred: --help needs no tokenizer)

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    vocab = vocabulary(tokenizer)
    if max_tokens < vocab.template_tokens + 2:
        raise SystemExit(f"--max-tokens {max_tokens}: a row takes at least {vocab.template_tokens + 2} "
                         "tokens")
    rng = random.Random(seed)
    out, redrawn = [], 0
    while len(out) < rows:
        prompt, answer = PROMPT.draw(rng), ANSWER.draw(rng)
        if prompt + answer + vocab.template_tokens > max_tokens:
            redrawn += 1
            continue
        out.append({"messages": chat(text(rng, prompt, vocab, vocab.first),
                                     text(rng, answer, vocab, vocab.after_space))})
    return out, redrawn


def lengths(rows: list[dict], tokenizer) -> dict[str, list[int]]:
    """Tokens per row: its prompt, its answer (each as the template renders it) and the whole row."""
    def cost(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return {"prompt": [cost(r["messages"][0]["content"]) for r in rows],
            "answer": [cost(" " + r["messages"][1]["content"]) for r in rows],
            "row": [row_tokens(tokenizer, r["messages"]) for r in rows]}


def percentile(values: list[int], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summary(rows: list[dict], redrawn: int, tokenizer) -> str:
    found = lengths(rows, tokenizer)
    parts = [f"{name} median {statistics.median(v):g}, p95 {percentile(v, 95):g}, max {max(v)}"
             for name, v in found.items()]
    return (f"{len(rows)} rows; tokens: " + "; ".join(parts) +
            f"; {redrawn} draws ({redrawn / (len(rows) + redrawn):.1%}) over the cap were drawn again")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                    help="longest row, chat template included (keep it <= the run's sft.max_length)")
    ap.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    args = ap.parse_args()
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    rows, redrawn = generate(args.rows, args.seed, args.max_tokens, tokenizer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out}: " + summary(rows, redrawn, tokenizer))


if __name__ == "__main__":
    main()
