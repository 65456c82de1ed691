"""Trying a model by hand (``moe-tune chat``): a run's or a checkpoint's answers to prompts,
streamed as they are generated, over a conversation its own chat template renders.

load_chat_model -> answer (one turn) -> chat_loop (turns read from stdin until an empty line)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import TextStreamer, set_seed

from moe_tune.errors import MoeTuneError
from moe_tune.evaluation.heldout import inference_mode, on_accelerator
from moe_tune.recipe import ModelSection
from moe_tune.training import run_dir


@dataclass(frozen=True)
class Sampling:
    """How each answer is generated, checked when made (before any model loads)."""

    temperature: float = 0.0
    """0: greedy (the answers ``moe-tune eval`` scores); above 0: sampled at that temperature."""
    top_p: float | None = None
    """Nucleus sampling: only the most likely tokens whose probabilities sum to this; needs temperature > 0."""
    max_new_tokens: int = 128
    """The longest answer, in tokens; an answer ends sooner at the tokenizer's end of turn."""
    seed: int | None = None
    """Seeds the sampling once, for the whole conversation."""

    def __post_init__(self):
        if self.temperature < 0:
            raise MoeTuneError(f"--temperature: must be >= 0, 0 for greedy (got {self.temperature})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MoeTuneError(f"--top-p: must be in (0, 1] (got {self.top_p})")
        if self.top_p is not None and self.temperature == 0:
            raise MoeTuneError("--top-p: applies only when sampling; add --temperature T (T > 0)")
        if self.max_new_tokens < 1:
            raise MoeTuneError(f"--max-new-tokens: must be >= 1 (got {self.max_new_tokens})")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p or 1.0,
                "max_new_tokens": self.max_new_tokens}


def load_chat_model(target: Path, adapter: str | None = None, dtype: str | None = None):
    """(model, tokenizer) of a run folder (its tuned model and tokenizer, in the run's dtype) or
    of a model folder (``adapter``: a PEFT adapter folder applied to it), on the GPU if there is one."""
    is_run = (target / run_dir.RECIPE_FILE).is_file()
    if adapter and is_run:
        raise MoeTuneError(f"{target}: a run folder already knows its adapter; drop --adapter")
    if dtype is None:
        dtype = run_dir.load_run_recipe(target).model.dtype if is_run else ModelSection.model_fields["dtype"].default
    model, tokenizer, _ = run_dir.load_run_model(target, dtype, adapter)
    return on_accelerator(model), tokenizer


def render(tokenizer, history: list[dict]) -> str:
    """The conversation so far as the tokenizer's chat template writes it, up to where the
    assistant's next answer starts."""
    try:
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the template raised (a role it rejects): its message
        roles = "/".join(dict.fromkeys(m["role"] for m in history))
        raise MoeTuneError(f"the chat template cannot render a {roles} conversation "
                           f"({str(e).splitlines()[0]})") from None


def answer(model, tokenizer, history: list[dict], sampling: Sampling, stream: bool = True) -> str:
    """The model's next turn after ``history``, streamed to stdout token by token as it is
    generated; it stops at the tokenizer's eos (a run's turn end) or after max_new_tokens."""
    enc = tokenizer(render(tokenizer, history), return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with inference_mode(model):  # eval mode, router logits off
        out = model.generate(**enc, **sampling.generate_kwargs(), streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_loop(model, tokenizer, sampling: Sampling, system: str | None = None, lines=None) -> list[dict]:
    """Answer each line read (stdin by default) with the whole conversation before it, until an
    empty line, end of input or Ctrl-C; returns the conversation."""
    history = [{"role": "system", "content": system}] if system else []
    lines = lines if lines is not None else _stdin_lines()
    if sampling.seed is not None:
        set_seed(sampling.seed)
    try:
        for line in lines:
            if not line.strip():
                break
            history.append({"role": "user", "content": line.rstrip("\n")})
            history.append({"role": "assistant", "content": answer(model, tokenizer, history, sampling)})
    except KeyboardInterrupt:  # Ctrl-C ends the conversation, as an empty line does
        print(file=sys.stderr)
    return history


def _stdin_lines():
    """Lines typed at a "> " prompt on a terminal; piped input is read as it is, without one."""
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return
