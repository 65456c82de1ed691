"""Reading instruction data: every format becomes chat rows; bad rows name file, line or row, and field."""

import json
from pathlib import Path

import pytest

from moe_tune.data.rows import messages_dataset, read_chat_rows, read_rows, split_prompt
from moe_tune.errors import MoeTuneError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "task": "t"}


def write_lines(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_rows_and_builds_dataset(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD)] * 3 + [""])
    assert len(read_chat_rows(path)) == 3
    assert len(read_chat_rows(path, max_rows=2)) == 2
    ds = messages_dataset(read_chat_rows(path))
    assert ds.column_names == ["messages"] and len(ds) == 3
    assert split_prompt(GOOD) == ([{"role": "user", "content": "hi"}], "yo")


def test_shipped_splits_read(root):
    for name in ("train", "valid", "heldout"):
        assert read_chat_rows(root / "data" / f"{name}.jsonl")


@pytest.mark.parametrize("bad, expected", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"prompt": "x"}', "missing or empty 'messages'"),
    ('{"messages": []}', "missing or empty 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"messages\[0\] needs 'role'"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"messages\[0\] needs 'role'"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "last message must be the assistant"),
    (json.dumps({**GOOD, "task": 5}), "'task' must be a string"),
])
def test_bad_row_names_file_and_line(tmp_path, bad, expected):
    path = write_lines(tmp_path, [json.dumps(GOOD), bad])
    with pytest.raises(MoeTuneError, match=expected) as err:
        read_chat_rows(path)
    assert str(err.value).startswith(f"{path}:2: ")


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(MoeTuneError, match="data file not found"):
        read_chat_rows(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MoeTuneError, match="the file is empty"):
        read_chat_rows(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(MoeTuneError, match="not UTF-8"):
        read_chat_rows(tmp_path / "latin.jsonl")


# --- other formats: every one becomes the same chat rows -----------------------------------------

USER_YO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
ALPACA = {"instruction": "Add.", "input": "2 3", "output": "5", "task": "add", "group": "g"}
ALPACA_ROWS = [ALPACA, {"instruction": "Say yo.", "output": "yo"},
               {"instruction": "Say yo.", "input": "", "output": "yo", "system": "Be brief."}]
ALPACA_EXPECTED = [
    {"messages": [{"role": "user", "content": "Add.\n\n2 3"}, {"role": "assistant", "content": "5"}],
     "task": "add", "group": "g"},
    {"messages": [{"role": "user", "content": "Say yo."}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say yo."},
                  {"role": "assistant", "content": "yo"}]},
]
SHAREGPT = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "yo"}, {"from": "user", "value": "again"},
                              {"from": "assistant", "value": "yo yo"}], "task": "t"}
SHAREGPT_EXPECTED = {"task": "t", "messages": [
    {"role": "system", "content": "s"}, *USER_YO,
    {"role": "user", "content": "again"}, {"role": "assistant", "content": "yo yo"}]}
PROMPT_COMPLETION = {"prompt": "hi", "completion": "yo", "group": "g"}


def write_text(path, text):
    path.write_text(text)
    return path


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    return write_text(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows))


def write_json_list(tmp_path, rows):
    return write_text(tmp_path / "d.json", json.dumps(rows, indent=1))


def save_dataset(tmp_path, rows):
    """A save_to_disk folder; Arrow gives every row every column, None where a row lacks it."""
    from datasets import Dataset

    path = tmp_path / "saved"
    columns = {k: None for r in rows for k in r}  # from_list would take the columns of row 1 only
    Dataset.from_list([{k: r.get(k) for k in columns} for r in rows]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("write", [write_jsonl, write_json_list, save_dataset], ids=["jsonl", "json", "disk"])
@pytest.mark.parametrize("source, expected", [
    ([GOOD, {**GOOD, "group": "g", "extra": 1}], [{"messages": USER_YO, "task": "t"},
                                                 {"messages": USER_YO, "task": "t", "group": "g"}]),
    (ALPACA_ROWS, ALPACA_EXPECTED),
    ([SHAREGPT], [SHAREGPT_EXPECTED]),
    ([PROMPT_COMPLETION], [{"messages": USER_YO, "group": "g"}]),
], ids=["chat", "alpaca", "sharegpt", "prompt_completion"])
def test_every_format_and_source_reads_to_chat_rows(tmp_path, write, source, expected):
    rows, skipped, _ = read_rows(write(tmp_path, source))
    assert rows == expected and skipped == []


def test_declared_format_and_dataset_of_any_format(tmp_path):
    path = write_json_list(tmp_path, ALPACA_ROWS)
    assert read_rows(path, fmt="alpaca")[0] == ALPACA_EXPECTED
    ds = messages_dataset(read_chat_rows(path, max_rows=2))
    assert ds.column_names == ["messages"] and len(ds) == 2
    assert ds[0]["messages"] == ALPACA_EXPECTED[0]["messages"]
    # A declared format that does not fit is named, not guessed around.
    with pytest.raises(MoeTuneError, match=r"d.json: row 1: row is in Alpaca .* \(declared as data.format: chat\)"):
        read_rows(path, fmt="chat")
    with pytest.raises(MoeTuneError, match="unknown data.format 'csv'"):
        read_rows(path, fmt="csv")


def test_jsonl_content_in_a_json_file_reads_as_jsonl(tmp_path):
    # Many "x.json" files are really JSONL; the first character decides, not the suffix.
    path = write_jsonl(tmp_path, [PROMPT_COMPLETION], "d.json")
    assert read_rows(path)[0] == [{"messages": USER_YO, "group": "g"}]


# --- bad rows: file, line or row, and the field at fault -----------------------------------------

@pytest.mark.parametrize("good, bad, expected", [
    (ALPACA, {"instruction": "x"}, r"field 'output' missing \(Alpaca rows need 'instruction' and 'output'\)"),
    (ALPACA, {**ALPACA, "instruction": 3}, "field 'instruction' must be a string, got int"),
    (ALPACA, {**ALPACA, "input": ["x"]}, "field 'input' must be a string, got list"),
    (ALPACA, {**ALPACA, "system": 1}, "field 'system' must be a string, got int"),
    (ALPACA, {**ALPACA, "group": 1}, "field 'group' must be a string, got int"),
    (SHAREGPT, {"conversations": []}, "field 'conversations' missing or empty"),
    (SHAREGPT, {"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\] needs 'from'"),
    (SHAREGPT, {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": None}]},
     r"conversations\[1\] needs 'from' .* and a string 'value'"),
    (SHAREGPT, {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "last message must be the assistant"),
    (PROMPT_COMPLETION, {"prompt": "x", "completion": 2}, "field 'completion' must be a string, got int"),
    (PROMPT_COMPLETION, {"prompt": "x"}, "field 'completion' missing"),
])
@pytest.mark.parametrize("write, prefix", [(write_jsonl, "{}:2: "), (write_json_list, "{}: row 2: ")],
                         ids=["jsonl", "json"])
def test_bad_row_of_each_format_names_place_and_field(tmp_path, write, prefix, good, bad, expected):
    path = write(tmp_path, [good, bad])
    with pytest.raises(MoeTuneError, match=expected) as err:
        read_rows(path)
    assert str(err.value).startswith(prefix.format(path))


def test_bad_row_in_saved_dataset_names_row(tmp_path):
    path = save_dataset(tmp_path, [ALPACA, {"instruction": "x", "output": None}])
    with pytest.raises(MoeTuneError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}: row 2: field 'output' missing (Alpaca rows need")


@pytest.mark.parametrize("first, expected", [
    ({"instruction": "x"}, "field 'output' missing"),
    ({"completion": "x"}, "field 'prompt' missing"),
    ({"text": "x"}, r"no known data format in keys \['text'\]"),
])
def test_first_row_errors_name_what_is_missing(tmp_path, first, expected):
    path = write_jsonl(tmp_path, [first])
    with pytest.raises(MoeTuneError, match=expected) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}:1: ")


@pytest.mark.parametrize("write, where, origin", [
    (write_jsonl, "{}:3", "line 1"), (write_json_list, "{}: row 3", "row 1")], ids=["jsonl", "json"])
def test_mixed_formats_name_the_row(tmp_path, write, where, origin):
    path = write(tmp_path, [GOOD, GOOD, ALPACA])
    expected = (f"{where.format(path)}: row is in Alpaca format but the file is chat 'messages' "
                f"(detected from {origin}); all rows of one file must be in one format")
    with pytest.raises(MoeTuneError) as err:
        read_rows(path)
    assert str(err.value) == expected


def test_skip_bad_rows_counts_and_reports(tmp_path):
    path = write_lines(tmp_path, ["{oops", json.dumps({"instruction": "x"}), json.dumps(ALPACA),
                                  json.dumps(GOOD), json.dumps({**ALPACA, "output": 5}), json.dumps(ALPACA)])
    rows, skipped, _ = read_rows(path, skip_bad_rows=True)
    # The format comes from the first good row (line 3): line 2's partial Alpaca row does not count.
    assert rows == [ALPACA_EXPECTED[0]] * 2
    assert skipped == [
        f"{path}:1: not valid JSON (Expecting property name enclosed in double quotes)",
        f"{path}:2: field 'output' missing (Alpaca rows need 'instruction' and 'output')",
        f"{path}:4: row is in chat 'messages' format but the file is Alpaca (detected from line 3); "
        "all rows of one file must be in one format",
        f"{path}:5: field 'output' must be a string, got int (Alpaca rows need 'instruction' and 'output')",
    ]
    # max_rows counts good rows; reading stops there, so later bad rows are not seen.
    assert read_rows(path, max_rows=1, skip_bad_rows=True)[:2] == ([ALPACA_EXPECTED[0]], skipped[:2])
    assert read_chat_rows(path, skip_bad_rows=True) == rows
    assert len(messages_dataset(read_chat_rows(path, skip_bad_rows=True))) == 2


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_lines(tmp_path, ["{oops", json.dumps({"text": "x"})])
    with pytest.raises(MoeTuneError) as err:
        read_rows(path, skip_bad_rows=True)
    assert str(err.value).startswith(f"{path}: no usable rows, all 2 are bad; the first: {path}:1: not valid")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(MoeTuneError, match="the file is empty"):
        read_rows(tmp_path / "empty.json", skip_bad_rows=True)


def test_unreadable_sources(tmp_path):
    (tmp_path / "latin.json").write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(MoeTuneError, match="latin.json: not UTF-8"):
        read_rows(tmp_path / "latin.json")
    (tmp_path / "broken.json").write_text('[{"prompt": "x"},\n')
    with pytest.raises(MoeTuneError, match=r"broken.json: not valid JSON \(.* at line 2"):
        read_rows(tmp_path / "broken.json")
    with pytest.raises(MoeTuneError, match="not one written by datasets' save_to_disk"):
        read_rows(tmp_path)
    with pytest.raises(MoeTuneError, match=r"data/none.jsonl \(read from .*\): data file not found"):
        read_rows("data/none.jsonl")


def test_hub_name_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # datasets and huggingface_hub read these at import, so set the module flags as well as the env.
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)  # so the name cannot be a local folder
    with pytest.raises(MoeTuneError, match=r"^org-x/none \(read from .*\): neither a local file nor reachable on the Hub"):
        read_rows("org-x/none")


def test_saved_dataset_dict_reads_its_train_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([PROMPT_COMPLETION]),
                 "test": Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    assert read_chat_rows(tmp_path / "dd") == [{"messages": USER_YO, "group": "g"}]


def test_a_spread_sample_covers_every_task_of_a_grouped_file():
    """Held-out files are grouped by task: N rows taken evenly through the file, not the first N
    (eval.max_rows, export's serving check)."""
    from moe_tune.data.rows import spread

    rows = read_chat_rows(Path(__file__).resolve().parents[1] / "data" / "heldout.jsonl")
    tasks = {r["task"] for r in rows}
    assert len({r["task"] for r in rows[:60]}) <= 2 < len(tasks)  # the first 60 rows: one or two tasks
    picked = spread(rows, 60)
    assert len(picked) == 60 and picked[0] is rows[0] and {r["task"] for r in picked} == tasks
    assert spread(rows[:7], 100) == rows[:7]
