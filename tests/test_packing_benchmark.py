"""benchmarks/packing.py's set-up: the long-tailed rows it trains on (scripts/make_long_tailed_data.py),
the packed batch it chooses, and the tokens it counts: the rows', never the padding."""

import importlib.util
import statistics
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from moe_tune.training.packing import ROW_TOKENS, RowTokens

from conftest import ROOT, SHIPPED_MODEL, load_script


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("packing_benchmark", ROOT / "benchmarks" / "packing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def long_tailed():
    return load_script("make_long_tailed_data")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SHIPPED_MODEL)


def test_long_tailed_lengths_have_the_stated_median_and_tail(long_tailed, tokenizer):
    """Uncapped, each text's tokens follow its log-normal: the stated median and 95th percentile."""
    rows, redrawn = long_tailed.generate(rows=2000, seed=1, max_tokens=10**6, tokenizer=tokenizer)
    assert redrawn == 0
    found = long_tailed.lengths(rows, tokenizer)
    for part, drawn in (("prompt", long_tailed.PROMPT), ("answer", long_tailed.ANSWER)):
        assert statistics.median(found[part]) == pytest.approx(drawn.median, rel=0.1), part
        assert long_tailed.percentile(found[part], 95) == pytest.approx(drawn.p95, rel=0.15), part
    # each text is exactly as long as drawn: the words' costs add up, the template adds the same to every row
    template = long_tailed.vocabulary(tokenizer).template_tokens
    assert {row - p - a for p, a, row in zip(found["prompt"], found["answer"], found["row"])} == {template}
    assert max(found["row"]) > 5 * statistics.median(found["row"])  # long-tailed


def test_long_tailed_rows_fit_the_cap_and_repeat_with_their_seed(long_tailed, tokenizer):
    rows, redrawn = long_tailed.generate(rows=300, seed=0, max_tokens=128, tokenizer=tokenizer)
    assert max(long_tailed.lengths(rows, tokenizer)["row"]) <= 128
    assert redrawn > 0  # rows over the cap were drawn again
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert long_tailed.generate(rows=300, seed=0, max_tokens=128, tokenizer=tokenizer) == (rows, redrawn)
    assert long_tailed.generate(rows=300, seed=1, max_tokens=128, tokenizer=tokenizer)[0] != rows


def test_counted_tokens_are_the_rows_not_the_padding(bench):
    examples = [{"input_ids": list(range(3, 3 + n))} for n in (11, 4, 17, 9)]  # 41 tokens
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)  # (4, 17), as TRL pads
    assert bench.batch_tokens(examples, padded) == (41, 4 * 17, 4)
    # packed by TRL's bfd into sequences of up to 20 tokens, flattened, the end padded to a multiple of 16
    rows = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples]})
    packed = pack_dataset(rows, 20, strategy="bfd")
    sequences = [packed[i] for i in range(len(packed))]
    assert len(sequences) < len(examples)
    collate = RowTokens(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True,
                                                        pad_to_multiple_of=16))
    batch = collate(sequences)
    assert batch["input_ids"].shape == (1, 48)
    assert bench.batch_tokens(sequences, batch) == (41, 48, 4)
    # a mask that disagrees with the rows (one pad counted as a token) stops the count
    batch[ROW_TOKENS] = torch.ones_like(batch[ROW_TOKENS])
    with pytest.raises(RuntimeError, match="mask counts 48 tokens, its rows 41"):
        bench.batch_tokens(sequences, batch)


def test_the_packed_batch_holds_about_the_padded_batchs_real_tokens(bench, tokenizer):
    path = ROOT / "data" / "train.jsonl"
    data = bench.plan_dataset("shipped", "data/train.jsonl", path, 128, 32, tokenizer)
    assert data.padded_batch == 32 and 1 < data.packed_batch < 32
    # within half a packed sequence of each other
    assert abs(data.planned_real_tokens["packed"] - data.planned_real_tokens["padded"]) <= 128 / 2

