"""Reading chat JSONL: good rows load, bad rows name file and line."""

import json

import pytest

from moe_tune.data import chat_dataset, read_chat_rows, split_prompt
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
    ds = chat_dataset(path)
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
