"""Where checkpoints, tokenizers and data sets come from: a local folder, or the Hugging Face Hub
when it can be reached. Asked before anything loads, so that offline a missing path fails at
once with one line instead of after huggingface_hub's retries."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants
from transformers import AutoTokenizer

from moe_tune.errors import MoeTuneError

LOCAL_CONFIGS = Path(__file__).resolve().parent / "configs"  # published configs, for plan and inspect offline


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be asked now (offline by setting, or no connection), or
    None. Checked before a hub id is tried, so that offline it fails at once rather than after
    huggingface_hub's retries."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return f"{host} cannot be reached"
    return None


def read_tokenizer(path: str):
    """The tokenizer saved at ``path``, as it is; one line when there is none to load."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MoeTuneError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
