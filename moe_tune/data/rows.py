"""Reading instruction data in several formats, checked row by row with file:line errors.

Every source becomes rows of one shape, ``{"messages": [...], "task": str, "group": str}`` (``task``
and ``group`` only when the source row has them), so the rest of moe_tune sees chat rows only.

Sources: a JSONL file, a JSON file holding a list of rows, a folder written by
``datasets.Dataset.save_to_disk``, or a Hugging Face Hub dataset name. Row formats: chat
``messages``, Alpaca (``instruction``/``input``/``output``), ShareGPT (``conversations``) and
``prompt``/``completion``; one format per file, detected from the first good row or declared.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from moe_tune.errors import MoeTuneError, shown
from moe_tune.model.sources import hub_unreachable
from moe_tune.recipe import FORMATS

ROLES = {"system", "user", "assistant"}
# How each format is named in messages, and the keys that mark a row as being in it.
LABELS = {"chat": "chat 'messages'", "alpaca": "Alpaca", "sharegpt": "ShareGPT",
          "prompt_completion": "prompt/completion"}
KEYS = {"chat": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
        "prompt_completion": ("prompt", "completion")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
# A Hub id is "name" or "org/name"; a missing path that looks like a data file is reported as missing.
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")

Record = tuple[str, str, object]  # (where for messages, "line N"/"row N", the parsed row)


class _BadRow(Exception):
    """One row that cannot be read; skipped or raised as MoeTuneError depending on skip_bad_rows."""


# --- where rows come from ---------------------------------------------------------------------

def _not_utf8(path: Path) -> MoeTuneError:
    return MoeTuneError(f"{path}: not UTF-8 text; convert the file to UTF-8")


def _jsonl_records(path: Path) -> Iterator[Record]:
    """Lines parsed one at a time, so that max_rows stops reading a big file early."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM would otherwise spoil line 1
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, f"line {lineno}", _BadRow(f"{where}: not valid JSON ({e.msg})")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _file_records(path: Path) -> Iterator[Record]:
    """A JSON list of rows when the file starts with '[' (and is not .jsonl), JSONL otherwise."""
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not text.lstrip().startswith("["):
        return _jsonl_records(path)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:  # the whole list is one value: no row to skip, so fatal
        raise MoeTuneError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return ((f"{path}: row {i}", f"row {i}", item) for i, item in enumerate(items, 1))


def _dataset_records(name: str, ds: Dataset) -> Iterator[Record]:
    """Rows of an Arrow dataset. Arrow fills a column a row lacks with None, so None means absent."""
    for i, row in enumerate(ds, 1):
        yield f"{name}: row {i}", f"row {i}", {k: v for k, v in row.items() if v is not None}


def _train_split(name: str, ds: Dataset | DatasetDict) -> Dataset:
    """The rows to train on: a Dataset as is, the 'train' (or only) split of a DatasetDict."""
    if isinstance(ds, Dataset):
        return ds
    if "train" in ds or len(ds) == 1:
        return ds["train"] if "train" in ds else next(iter(ds.values()))
    raise MoeTuneError(f"{name}: holds splits {sorted(ds)} but no 'train'; point at one split's folder")


def _hub_dataset(name: str) -> Dataset:
    if why := hub_unreachable():
        raise MoeTuneError(f"{shown(name)}: neither a local file nor reachable on the Hub offline ({why}); "
                           "check the path or the dataset name")
    try:
        return load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, no access, no train split: all one answer
        reason = (str(e).splitlines() or [""])[0][:200]
        raise MoeTuneError(f"{shown(name)}: neither a local file nor reachable on the Hub "
                           f"({type(e).__name__}: {reason}); check the path or the dataset name") from None


def _records(path: str | Path) -> Iterator[Record]:
    """Rows of a local file, a save_to_disk folder or a Hub dataset, each with where it came from."""
    local = Path(path)
    if local.is_file():
        return _file_records(local)
    if local.is_dir():
        if not any((local / marker).is_file() for marker in DISK_MARKERS):
            raise MoeTuneError(f"{local}: a folder, but not one written by datasets' save_to_disk "
                               "(no dataset_info.json or state.json); give a data file or such a folder")
        return _dataset_records(str(local), _train_split(str(local), load_from_disk(str(local))))
    name = str(path)
    if HUB_NAME.fullmatch(name) and local.suffix not in (".json", ".jsonl"):
        return _dataset_records(name, _hub_dataset(name))
    raise MoeTuneError(f"{shown(local)}: data file not found")


# --- row formats --------------------------------------------------------------------------------

def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(row: dict, key: str, where: str, rule: str) -> str:
    """A required string field; ``rule`` says what rows of this format need."""
    if key not in row:
        raise _BadRow(f"{where}: field '{key}' missing ({rule})")
    if not isinstance(row[key], str):
        raise _BadRow(f"{where}: field '{key}' must be a string, got {_kind(row[key])} ({rule})")
    return row[key]


def _optional_text(row: dict, key: str, where: str) -> str | None:
    """An optional string field; null counts as absent."""
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise _BadRow(f"{where}: field '{key}' must be a string, got {_kind(value)}")
    return value


def _turns(row: dict, where: str, key: str, role_key: str, text_key: str, roles: dict[str, str],
           missing: str) -> list[dict]:
    """A list of turns (chat ``messages`` or ShareGPT ``conversations``) as role/content messages."""
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise _BadRow(f"{where}: {missing}")
    for i, t in enumerate(turns):
        if not (isinstance(t, dict) and t.get(role_key) in roles and isinstance(t.get(text_key), str)):
            got = (f"got {_kind(t)}" if not isinstance(t, dict) else
                   f"got {role_key} {t.get(role_key)!r}" if t.get(role_key) not in roles else
                   f"got {text_key} of type {_kind(t.get(text_key))}")
            raise _BadRow(f"{where}: {key}[{i}] needs '{role_key}' (one of {sorted(roles)}) "
                          f"and a string '{text_key}', {got}")
    return [{"role": roles[t[role_key]], "content": t[text_key]} for t in turns]


def _from_chat(row: dict, where: str) -> list[dict]:
    return _turns(row, where, "messages", "role", "content", {r: r for r in ROLES},
                  "missing or empty 'messages'; each row needs "
                  '"messages": [{"role": "user", ...}, {"role": "assistant", ...}]')


def _from_alpaca(row: dict, where: str) -> list[dict]:
    rule = "Alpaca rows need 'instruction' and 'output'"
    instruction, output = _text(row, "instruction", where, rule), _text(row, "output", where, rule)
    extra, system = _optional_text(row, "input", where), _optional_text(row, "system", where)
    # The usual Alpaca prompt: the input, when there is one, follows the instruction.
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_sharegpt(row: dict, where: str) -> list[dict]:
    return _turns(row, where, "conversations", "from", "value", SHAREGPT_ROLES,
                  "field 'conversations' missing or empty; ShareGPT rows need "
                  '"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]')


def _from_prompt_completion(row: dict, where: str) -> list[dict]:
    rule = "prompt/completion rows need string 'prompt' and 'completion'"
    prompt, completion = _text(row, "prompt", where, rule), _text(row, "completion", where, rule)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


CONVERTERS = {"chat": _from_chat, "alpaca": _from_alpaca, "sharegpt": _from_sharegpt,
              "prompt_completion": _from_prompt_completion}


def _has_keys(row: dict, fmt: str) -> bool:
    return all(row.get(k) is not None for k in KEYS[fmt])


def _format_of(row: dict) -> str | None:
    """The format whose keys the row has, or None; the first match wins for rows with several."""
    return next((fmt for fmt in KEYS if _has_keys(row, fmt)), None)


def _guess_format(row: dict, where: str) -> str:
    """The format of the first row of an 'auto' file. A row with only some of a format's keys
    ('instruction' without 'output') is still read as that format, so its error names the missing field."""
    fmt = _format_of(row)
    if fmt is None and any(k in row for k in ("instruction", "input", "output")):
        fmt = "alpaca"
    if fmt is None and any(k in row for k in ("prompt", "completion")):
        fmt = "prompt_completion"
    if fmt is None:
        raise _BadRow(f"{where}: no known data format in keys {sorted(row)}; rows need 'messages', "
                      "'conversations' (ShareGPT), 'instruction' and 'output' (Alpaca), "
                      "or 'prompt' and 'completion'")
    return fmt


def _convert(row: object, where: str, fmt: str | None, origin: str) -> tuple[dict, str]:
    """(the row in the internal shape, its format). ``fmt`` is the file's format once known
    (declared, or detected at ``origin``); a row clearly in another format is then a bad row."""
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(f"{where}: a row must be a JSON object, got {_kind(row)}")
    if fmt is not None and not _has_keys(row, fmt) and (other := _format_of(row)) is not None:
        raise _BadRow(f"{where}: row is in {LABELS[other]} format but the file is {LABELS[fmt]} "
                      f"({origin}); all rows of one file must be in one format")
    fmt = fmt or _guess_format(row, where)
    messages = CONVERTERS[fmt](row, where)
    if messages[-1]["role"] != "assistant":
        raise _BadRow(f"{where}: the last message must be the assistant's answer")
    out = {"messages": messages}
    for key in ("task", "group"):  # kept for per-task / per-group scores in evaluate
        if (value := _optional_text(row, key, where)) is not None:
            out[key] = value
    return out, fmt


# --- public API -----------------------------------------------------------------------------------

class ReadRows(NamedTuple):
    """A data source as read: its rows in the internal chat shape, one message per skipped bad
    row, and the rows' format as LABELS names it."""

    rows: list[dict]
    skipped: list[str]
    format: str


def read_rows(path: str | Path, max_rows: int | None = None, fmt: str = "auto",
              skip_bad_rows: bool = False) -> ReadRows:
    """The rows of ``path``, checked. A bad row raises
    MoeTuneError naming file, line or row and field, unless ``skip_bad_rows``; ``max_rows`` counts
    good rows. A source with no good row raises either way."""
    if fmt not in FORMATS:
        raise MoeTuneError(f"{path}: unknown data.format {fmt!r}; use one of {', '.join(FORMATS)}")
    file_fmt, origin = (None, "") if fmt == "auto" else (fmt, f"declared as data.format: {fmt}")
    rows, skipped = [], []
    for where, place, record in _records(path):
        try:
            row, row_fmt = _convert(record, where, file_fmt, origin)
        except _BadRow as e:
            if not skip_bad_rows:
                raise MoeTuneError(str(e)) from None
            skipped.append(str(e))
            continue
        if file_fmt is None:  # the first good row fixes the format of the rest
            file_fmt, origin = row_fmt, f"detected from {place}"
        rows.append(row)
        if max_rows and len(rows) >= max_rows:
            break
    if not rows and skipped:
        raise MoeTuneError(f"{path}: no usable rows, all {len(skipped)} are bad; the first: {skipped[0]}")
    if not rows:
        raise MoeTuneError(f"{path}: no rows; the file is empty")
    return ReadRows(rows, skipped, LABELS[file_fmt])


class TrainRows(NamedTuple):
    """The rows a run trains and validates on, as read once before any weights load."""

    train: ReadRows
    valid: ReadRows | None


def read_train_rows(data) -> TrainRows:
    """The recipe's ``data`` section's training and validation rows."""
    return TrainRows(read_rows(data.train, data.max_train_rows, data.format, data.skip_bad_rows),
                     read_rows(data.valid, None, data.format, data.skip_bad_rows) if data.valid else None)


def read_chat_rows(path: str | Path, max_rows: int | None = None, fmt: str = "auto",
                   skip_bad_rows: bool = False) -> list[dict]:
    """Just the rows of ``read_rows``: what evaluate, export and the trainer take."""
    return read_rows(path, max_rows, fmt, skip_bad_rows)[0]


def spread(rows: list[dict], count: int) -> list[dict]:
    """``count`` rows evenly spaced through ``rows`` (held-out files are grouped by task)."""
    if len(rows) <= count:
        return rows
    return [rows[i * len(rows) // count] for i in range(count)]


def messages_dataset(rows: list[dict]) -> Dataset:
    """A ``datasets.Dataset`` with just the ``messages`` column, as TRL's SFTTrainer expects."""
    return Dataset.from_list([{"messages": r["messages"]} for r in rows])


def check_lengths(path: str, rows: list[dict], tokenizer, max_length: int | None, skip: bool,
                  cuts: bool = True) -> None:
    """A row longer than sft.max_length would be cut, often through its answer: say which.
    Where nothing ``cuts`` rows (sft.padding_free without packing), a longer row is refused."""
    if not max_length:
        return
    texts = []
    for i, r in enumerate(rows, 1):
        try:
            texts.append(tokenizer.apply_chat_template(r["messages"], tokenize=False))
        except Exception as e:  # noqa: BLE001 - the template raised (roles it rejects, a missing key): its message
            raise MoeTuneError(f"{path} row {i}: the chat template cannot render it ({str(e).splitlines()[0]}); "
                               "fix the row's roles, or give the checkpoint another template") from None
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths, 1) if n > max_length]
    if not long:
        return
    (row, n), more = long[0], f" (and {len(long) - 1} more)" if len(long) > 1 else ""
    if not cuts:
        raise MoeTuneError(f"{path} row {row}: {n} tokens, longer than sft.max_length {max_length}{more}, and "
                           "sft.padding_free without sft.packing cuts no row; raise sft.max_length, shorten the row, "
                           "or set sft.packing: true")
    if skip:
        print(f"note: {path}: {len(long)} rows are longer than sft.max_length {max_length} and will be cut")
        return
    raise MoeTuneError(f"{path} row {row}: {n} tokens, longer than sft.max_length {max_length}{more}; raise "
                       "sft.max_length, shorten the row, or set data.skip_bad_rows: true to train on it cut")


def split_prompt(row: dict) -> tuple[list[dict], str]:
    """(conversation up to the final answer, the final answer) of a chat row."""
    return row["messages"][:-1], row["messages"][-1]["content"]

