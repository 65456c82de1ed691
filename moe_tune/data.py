"""Reading instruction data: chat ``messages`` JSONL, checked row by row with file:line errors."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from moe_tune.errors import MoeTuneError

ROLES = {"system", "user", "assistant"}


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise MoeTuneError(f"{where}: a row must be a JSON object with a 'messages' list")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MoeTuneError(f"{where}: missing or empty 'messages'; each row needs "
                           '"messages": [{"role": "user", ...}, {"role": "assistant", ...}]')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MoeTuneError(f"{where}: messages[{i}] needs 'role' (one of {sorted(ROLES)}) "
                               "and a string 'content'")
    if messages[-1]["role"] != "assistant":
        raise MoeTuneError(f"{where}: the last message must be the assistant's answer")
    if "task" in row and not isinstance(row["task"], str):
        raise MoeTuneError(f"{where}: 'task' must be a string")
    return row


def read_chat_rows(path: str | Path, max_rows: int | None = None) -> list[dict]:
    """Rows of a chat JSONL file, each validated; a bad row raises with file and line number."""
    path = Path(path)
    if not path.is_file():
        raise MoeTuneError(f"{path}: data file not found")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MoeTuneError(f"{where}: not valid JSON ({e.msg})") from None
                rows.append(_check_row(row, where))
                if max_rows and len(rows) >= max_rows:
                    break
    except UnicodeDecodeError:
        raise MoeTuneError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
    if not rows:
        raise MoeTuneError(f"{path}: no rows; the file is empty")
    return rows


def chat_dataset(path: str | Path, max_rows: int | None = None) -> Dataset:
    """A ``datasets.Dataset`` with just the ``messages`` column, as TRL's SFTTrainer expects."""
    rows = read_chat_rows(path, max_rows)
    return Dataset.from_list([{"messages": r["messages"]} for r in rows])


def split_prompt(row: dict) -> tuple[list[dict], str]:
    """(conversation up to the final answer, the final answer) of a chat row."""
    return row["messages"][:-1], row["messages"][-1]["content"]
