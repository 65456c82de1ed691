"""The shipped instruction data: deterministic, checkable, and honestly split."""

import json
import random
import re

import pytest


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def generated(make_data):
    return make_data.generate()


def test_generator_is_deterministic(make_data, generated):
    again = make_data.generate()
    assert again == generated
    assert make_data.generate(seed=7)[0]["train"] != generated[0]["train"]


def test_shipped_files_match_the_generator(root, generated, make_data):
    splits, corpus = generated
    for name, rows in splits.items():
        assert read_jsonl(root / "data" / f"{name}.jsonl") == rows, f"data/{name}.jsonl is stale"
    assert (root / "data" / "corpus.txt").read_text() == corpus
    assert (root / "data" / "retention.txt").read_text() == make_data.retention_sample(corpus)


def test_at_least_twelve_trained_families_and_three_unseen(make_data, generated):
    splits, _ = generated
    train_tasks = {r["task"] for r in splits["train"]}
    assert len(train_tasks) >= 12
    assert train_tasks == set(make_data.TRAIN_TASKS)
    unseen = {r["task"] for r in splits["heldout"] if r["group"] == "unseen_task"}
    assert len(unseen) >= 3
    assert not unseen & train_tasks
    assert {r["task"] for r in splits["valid"]} <= train_tasks


def _pattern(phrasing: str) -> re.Pattern:
    return re.compile(re.escape(phrasing).replace(re.escape("{x}"), ".+") + "$")


def test_heldout_phrasings_never_appear_in_training(make_data, generated):
    splits, _ = generated
    train_questions = [r["messages"][0]["content"] for r in splits["train"] + splits["valid"]]
    for task in make_data.TASKS:
        for phrasing in task.heldout_phrasings:
            pattern = _pattern(phrasing)
            assert not any(pattern.match(q) for q in train_questions), (task.name, phrasing)
    heldout = [r for r in splits["heldout"] if r["group"] == "new_phrasing"]
    assert {r["task"] for r in heldout} == set(make_data.TRAIN_TASKS)


def test_heldout_countries_are_absent_from_training(make_data):
    world = make_data.World(random.Random(make_data.SEED))
    splits, _ = make_data.generate()
    text = json.dumps(splits["train"] + splits["valid"])
    assert world.heldout_countries
    for name in world.heldout_countries:
        assert name not in text


def test_answers_are_exact_and_facts_are_in_the_corpus(make_data, generated):
    splits, corpus = generated
    for row in splits["train"][:300] + splits["heldout"]:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"]
        answer = row["messages"][1]["content"]
        assert answer and answer == answer.strip() and "\n" not in answer
    # every answer of a fact-lookup task is stated in the pretraining corpus
    for row in splits["heldout"]:
        if row["task"] in {"capital", "language", "currency"}:
            assert row["messages"][1]["content"] in corpus
    # and the corpus is plain text, not instructions
    assert "<|" not in corpus and "?" not in corpus


def test_plural_rules(make_data):
    assert make_data._plural("box") == "boxes"
    assert make_data._plural("fly") == "flies"
    assert make_data._plural("toy") == "toys"
    assert make_data._plural("cat") == "cats"


def test_write_creates_all_files(make_data, tmp_path):
    make_data.write(tmp_path, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "heldout.jsonl", "retention.txt",
                                                          "train.jsonl", "valid.jsonl"]
    assert len(read_jsonl(tmp_path / "train.jsonl")) == make_data.N_TRAIN
