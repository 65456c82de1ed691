"""Generate the shipped instruction data and the pretraining corpus, deterministically.

    python scripts/make_data.py    # writes data/{train,valid,heldout}.jsonl, corpus.txt, retention.txt

Everything comes from one seeded random generator over an invented world (countries with
capitals, languages and currencies) plus plain facts about words, letters and numbers.

- ``corpus.txt`` states the facts as ordinary sentences (no instruction format). The tiny
  base model in ``data/tiny-moe`` is pretrained on it by ``scripts/pretrain_base.py``.
- ``train``/``valid`` are chat rows ``{"messages": [...], "task": ...}`` over the TRAIN_TASKS,
  asked with the training phrasings only. Some countries never appear in them, so that the
  held-out questions about them can only be answered from pretraining.
- ``heldout`` has two groups, in the ``group`` field: ``new_phrasing`` (seen tasks asked with
  phrasings never used in training) and ``unseen_task`` (task families absent from training).

Answers are short and exact, so greedy generation can be scored by exact match.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SEED = 1234
N_COUNTRIES = 48
HELDOUT_COUNTRY_SHARE = 0.25  # these countries are asked about in held-out only
N_TRAIN = 2400
N_VALID = 240
N_HELDOUT_PER_TASK = 30
CORPUS_REPEATS = 10  # each fact is stated this many times, in varied sentences

ANIMALS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
    "lion": "roar", "owl": "hoot", "pig": "oink", "horse": "neigh", "snake": "hiss",
    "bee": "buzz", "frog": "croak", "mouse": "squeak", "crow": "caw", "wolf": "howl",
}
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "young"),
    ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("early", "late"), ("hard", "soft"),
    ("full", "empty"), ("wet", "dry"), ("high", "low"), ("rich", "poor"), ("strong", "weak"),
    ("long", "short"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("first", "last"),
    ("near", "far"), ("good", "bad"), ("left", "right"), ("push", "pull"), ("win", "lose"),
    ("inside", "outside"), ("day", "night"), ("begin", "end"), ("buy", "sell"), ("true", "false"),
    ("heavy", "light"), ("awake", "asleep"), ("safe", "dangerous"), ("cheap", "expensive"),
    ("wide", "narrow"), ("sweet", "sour"), ("above", "below"), ("north", "south"),
    ("east", "west"), ("add", "subtract"),
]
NOUNS = [
    "cat", "dog", "tree", "book", "car", "house", "bird", "apple", "river", "cloud", "chair",
    "table", "door", "lamp", "road", "stone", "ship", "coin", "shoe", "hat", "bell", "cup",
    "pen", "map", "boat", "star", "hill", "lake", "ring", "drum", "kite", "desk", "rope",
    "bag", "box", "egg", "fork", "gate", "king", "leaf", "nest", "pear", "rock", "seed",
    "tent", "wall", "frog", "goat", "horn", "jar", "key", "lion", "moon", "nail", "owl",
    "plum", "rose", "sock", "toy", "vase", "wing", "yard", "bean", "cake", "duck", "farm",
    "girl", "hand", "iron", "jet", "kid", "line", "milk", "net", "pot", "rain", "song",
]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYLLABLES = [
    "zor", "vel", "mar", "tan", "qui", "bro", "del", "fen", "gal", "hum", "ister", "kal", "lun",
    "mor", "nek", "ost", "pra", "rav", "sil", "tor", "ul", "vin", "wex", "yar", "zen", "dra",
    "bel", "cor", "fal", "gor", "hes", "ith", "jor", "kes", "lor", "mir", "nor", "pel", "quo",
    "ros", "sar", "tel", "vor", "xan", "zul",
]


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    currency: str


@dataclass(frozen=True)
class Task:
    """A task family: how to draw an item, how to ask it, and how to state it as a fact."""

    name: str
    items: Callable[["World"], list[tuple[str, str]]]  # (subject, answer) pairs
    train_phrasings: tuple[str, ...]
    heldout_phrasings: tuple[str, ...]
    facts: tuple[str, ...]  # corpus sentences; "{x}" is the subject, "{y}" the answer


class World:
    def __init__(self, rng: random.Random):
        self.countries = self._make_countries(rng)
        n_hidden = int(len(self.countries) * HELDOUT_COUNTRY_SHARE)
        self.heldout_countries = {c.name for c in self.countries[:n_hidden]}

    @staticmethod
    def _word(rng: random.Random, n: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(n))

    def _make_countries(self, rng: random.Random) -> list[Country]:
        used: set[str] = set()

        def fresh(n: int, suffix: str = "") -> str:
            while True:
                w = self._word(rng, n) + suffix
                if w not in used:
                    used.add(w)
                    return w

        out = []
        for _ in range(N_COUNTRIES):
            out.append(Country(
                name=fresh(2, "ia").capitalize(),
                capital=fresh(2).capitalize(),
                language=fresh(2, "ese").capitalize(),
                currency=fresh(2, "o").lower(),
            ))
        return out


def _plural(w: str) -> str:
    if w.endswith(("s", "x", "ch", "sh")):
        return w + "es"
    if w.endswith("y") and w[-2] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


TASKS: list[Task] = [
    Task("capital",
         lambda w: [(c.name, c.capital) for c in w.countries],
         ("What is the capital of {x}?", "Name the capital city of {x}.",
          "Which city is the capital of {x}?", "Tell me the capital of {x}."),
         ("What city is {x}'s capital?", "Give the capital of {x}."),
         ("The capital of {x} is {y}.", "{y} is the capital city of {x}.",
          "In {x}, the capital is {y}.")),
    Task("language",
         lambda w: [(c.name, c.language) for c in w.countries],
         ("What language is spoken in {x}?", "Which language do people speak in {x}?",
          "Name the language of {x}.", "Tell me the main language of {x}."),
         ("In {x}, what language do people speak?", "Give the language spoken in {x}."),
         ("People in {x} speak {y}.", "The language of {x} is {y}.",
          "{y} is the language spoken in {x}.")),
    Task("antonym",
         lambda w: ANTONYMS + [(b, a) for a, b in ANTONYMS],
         ("What is the opposite of {x}?", "Give the opposite of the word {x}.",
          "Name a word that means the opposite of {x}.", "Tell me the antonym of {x}."),
         ("What word is the opposite of {x}?", "Which word means the opposite of {x}?"),
         ("The opposite of {x} is {y}.", "{x} is the opposite of {y}.",
          "The word {x} means the opposite of {y}.")),
    Task("next_letter",
         lambda w: [(a, b) for a, b in zip(LETTERS, LETTERS[1:])],
         ("Which letter comes after {x}?", "What is the next letter after {x}?",
          "Name the letter that follows {x}.", "Tell me the letter after {x} in the alphabet."),
         ("In the alphabet, what letter comes after {x}?", "Give the letter that comes after {x}."),
         ("After the letter {x} comes {y}.", "The letter after {x} is {y}.",
          "In the alphabet, {x} is followed by {y}.")),
    Task("next_number",
         lambda w: [(str(n), str(n + 1)) for n in range(0, 99)],
         ("What number comes after {x}?", "What is the next number after {x}?",
          "Name the number that follows {x}.", "Tell me the number after {x}."),
         ("Which number comes after {x}?", "Give the number that comes after {x}."),
         ("After {x} comes {y}.", "The number after {x} is {y}.",
          "When counting, {x} is followed by {y}.")),
    Task("uppercase",
         lambda w: [(n, n.upper()) for n in NOUNS],
         ("Write {x} in capital letters.", "Write the word {x} in capital letters.",
          "Spell {x} in capital letters.", "Give {x} in capital letters."),
         ("How is {x} written in capital letters?", "Show the word {x} in capital letters."),
         ("The word {x} in capital letters is {y}.", "In capital letters, {x} is written {y}.")),
    Task("plural",
         lambda w: [(n, _plural(n)) for n in NOUNS],
         ("What is the plural of {x}?", "Give the plural of the word {x}.",
          "Name the plural form of {x}.", "Tell me the plural of {x}."),
         ("What word is the plural of {x}?", "Write the plural form of {x}."),
         ("The plural of {x} is {y}.", "One {x}, two {y}.", "More than one {x} are called {y}.")),
    Task("count_letters",
         lambda w: [(n, str(len(n))) for n in NOUNS],
         ("How many letters are in the word {x}?", "Count the letters in {x}.",
          "How many letters does {x} have?", "Tell me the number of letters in {x}."),
         ("What is the number of letters in the word {x}?", "Give the count of letters in {x}."),
         ("The word {x} has {y} letters.", "There are {y} letters in the word {x}.")),
    Task("first_letter",
         lambda w: [(n, n[0]) for n in NOUNS],
         ("What is the first letter of {x}?", "Name the first letter of the word {x}.",
          "Which letter does {x} start with?", "Tell me the first letter of {x}."),
         ("Give the first letter of the word {x}.", "What letter starts the word {x}?"),
         ("The first letter of {x} is {y}.", "The word {x} starts with {y}.")),
    Task("km_to_m",
         lambda w: [(str(k), str(k * 1000)) for k in range(1, 60)],
         ("How many meters are in {x} kilometers?", "Convert {x} kilometers to meters.",
          "What is {x} kilometers in meters?", "Tell me how many meters make {x} kilometers."),
         ("Give {x} kilometers in meters.", "How many meters is {x} kilometers?"),
         ("{x} kilometers is {y} meters.", "There are {y} meters in {x} kilometers.")),
    Task("add",
         lambda w: [(f"{a} plus {b}", str(a + b)) for a in range(10) for b in range(10)],
         ("What is {x}?", "Compute {x}.", "Work out {x}.", "Tell me what {x} makes."),
         ("What does {x} equal?", "Give the result of {x}."),
         ("{x} is {y}.", "{x} makes {y}.", "{x} equals {y}.")),
    Task("animal_sound",
         lambda w: list(ANIMALS.items()),
         ("What sound does a {x} make?", "What does a {x} say?",
          "Name the sound a {x} makes.", "Tell me the sound of a {x}."),
         ("Which sound does a {x} make?", "Give the sound that a {x} makes."),
         ("A {x} says {y}.", "The sound a {x} makes is {y}.", "You can hear a {x} {y}.")),
    # Task families that never appear in training: held-out only.
    Task("currency",
         lambda w: [(c.name, c.currency) for c in w.countries],
         (),
         ("What currency is used in {x}?", "Name the currency of {x}."),
         ("The currency of {x} is the {y}.", "People in {x} pay with the {y}.",
          "In {x}, money is counted in {y}.")),
    Task("previous_letter",
         lambda w: [(b, a) for a, b in zip(LETTERS, LETTERS[1:])],
         (),
         ("Which letter comes before {x}?", "What is the letter before {x}?"),
         ("Before the letter {x} comes {y}.", "The letter before {x} is {y}.")),
    Task("previous_number",
         lambda w: [(str(n + 1), str(n)) for n in range(0, 99)],
         (),
         ("What number comes before {x}?", "Name the number before {x}."),
         ("Before {x} comes {y}.", "The number before {x} is {y}.")),
]
TRAIN_TASKS = [t.name for t in TASKS if t.train_phrasings]
UNSEEN_TASKS = [t.name for t in TASKS if not t.train_phrasings]
COUNTRY_TASKS = {"capital", "language", "currency"}


def _row(question: str, answer: str, task: str, group: str | None = None) -> dict:
    row = {"messages": [{"role": "user", "content": question},
                        {"role": "assistant", "content": answer}], "task": task}
    if group:
        row["group"] = group
    return row


def _train_items(task: Task, world: World) -> list[tuple[str, str]]:
    items = task.items(world)
    if task.name in COUNTRY_TASKS:
        items = [(x, y) for x, y in items if x not in world.heldout_countries]
    return items


def make_instructions(rng: random.Random, world: World) -> dict[str, list[dict]]:
    train_tasks = [t for t in TASKS if t.train_phrasings]

    def sample(n: int) -> list[dict]:
        rows = []
        for i in range(n):
            task = train_tasks[i % len(train_tasks)]
            x, y = rng.choice(_train_items(task, world))
            rows.append(_row(rng.choice(task.train_phrasings).format(x=x), y, task.name))
        rng.shuffle(rows)
        return rows

    train, valid = sample(N_TRAIN), sample(N_VALID)
    heldout = []
    for task in TASKS:
        group = "new_phrasing" if task.train_phrasings else "unseen_task"
        items = task.items(world)
        for _ in range(N_HELDOUT_PER_TASK):
            x, y = rng.choice(items)
            heldout.append(_row(rng.choice(task.heldout_phrasings).format(x=x), y, task.name, group))
    return {"train": train, "valid": valid, "heldout": heldout}


def make_corpus(rng: random.Random, world: World) -> str:
    """Plain sentences stating every fact, several times, in shuffled paragraphs."""
    sentences = []
    for task in TASKS:
        for x, y in task.items(world):
            for _ in range(CORPUS_REPEATS):
                sentences.append(rng.choice(task.facts).format(x=x, y=y))
    for c in world.countries:  # a little connected prose per country
        for _ in range(CORPUS_REPEATS):
            sentences.append(f"{c.name} is a country. Its capital is {c.capital}, "
                             f"its people speak {c.language} and pay with the {c.currency}.")
    rng.shuffle(sentences)
    paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    return "\n".join(paragraphs) + "\n"


def retention_sample(corpus: str, every: int = 10, size: int = 100) -> str:
    """Pretraining-domain passages for the retention check: what instruction tuning forgets."""
    return "\n".join(corpus.splitlines()[::every][:size]) + "\n"


def generate(seed: int = SEED) -> tuple[dict[str, list[dict]], str]:
    rng = random.Random(seed)
    world = World(rng)
    return make_instructions(rng, world), make_corpus(rng, world)


def write(out_dir: Path, seed: int = SEED) -> None:
    splits, corpus = generate(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    (out_dir / "corpus.txt").write_text(corpus)
    (out_dir / "retention.txt").write_text(retention_sample(corpus))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    write(args.out, args.seed)
    print(f"wrote {args.out}/train.jsonl valid.jsonl heldout.jsonl corpus.txt")


if __name__ == "__main__":
    main()
