"""Serving checks: an exported checkpoint's greedy answers in vLLM and in llama.cpp, against
transformers' on the same held-out prompts.

Each engine lives in its own place, made by the Makefile: vLLM's CPU build in ``.venv-serve``
(``make serving-env``; it pins a transformers older than moe_tune's, so it cannot share this
environment), llama.cpp's source, converter and binaries in ``~/.cache/moe_tune/llama.cpp``
(``make llama-cpp``). llama.cpp's answers come from its ``llama-simple`` (the library's greedy
sampler, printing each token as it is decoded): ``llama-completion`` prints through an
asynchronous log that, in this version, sometimes exits before the answer is written. MOE_TUNE_SERVE_ENV and MOE_TUNE_LLAMA_CPP point elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moe_tune.data.rows import split_prompt
from moe_tune.errors import MoeTuneError
from moe_tune.evaluation.heldout import greedy_answers
from moe_tune.export.gguf import CONVERTER_TYPES
from moe_tune.model.loading import load_model, load_tokenizer

MIN_IDENTICAL = 0.95  # share of identical greedy answers below which an unquantized export is refused
# Types that keep the weights as they are (up to rounding): only these are held to MIN_IDENTICAL
# unless --min-identical says otherwise; a quantized file's agreement is reported.
UNQUANTIZED = ("f32", "f16", "bf16")
VLLM_SCRIPT = Path(__file__).with_name("vllm_greedy.py")


# --- where the engines are ------------------------------------------------------------------------

# ``make serving-env`` writes the environment's absolute path here, so that an export run from
# any folder finds it (before this, it was looked up in the working directory only)
SERVE_ENV_RECORD = Path.home() / ".cache" / "moe_tune" / "serving-env"


def vllm_python() -> Path:
    """The serving environment's Python, which has vLLM: MOE_TUNE_SERVE_ENV, else where
    ``make serving-env`` last made it, else the checkout's .venv-serve."""
    if "MOE_TUNE_SERVE_ENV" in os.environ:
        env, why = Path(os.environ["MOE_TUNE_SERVE_ENV"]).absolute(), "MOE_TUNE_SERVE_ENV"
    elif SERVE_ENV_RECORD.is_file():
        env, why = Path(SERVE_ENV_RECORD.read_text().strip()), f"recorded by make serving-env in {SERVE_ENV_RECORD}"
    else:
        env, why = Path(__file__).resolve().parents[2] / ".venv-serve", "the moe_tune checkout's"
    python = env / "bin" / "python"
    if not python.is_file():
        raise MoeTuneError(f"vLLM's environment is missing ({python} not found; {why}); run `make serving-env` in "
                           "the moe_tune checkout, or set MOE_TUNE_SERVE_ENV to a virtualenv with vllm")
    return python


def llama_cpp_home() -> Path:
    """The folder ``make llama-cpp`` fills: llama.cpp/ (the source, with its converter) and bin/."""
    home = Path(os.environ.get("MOE_TUNE_LLAMA_CPP", Path.home() / ".cache" / "moe_tune" / "llama.cpp"))
    needed = [home / "bin" / "llama-simple", home / "bin" / "llama-quantize",
              home / "llama.cpp" / "convert_hf_to_gguf.py"]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise MoeTuneError(f"llama.cpp is not built ({missing[0]} not found); run `make llama-cpp` in the moe_tune "
                           "checkout, or set MOE_TUNE_LLAMA_CPP to the folder it made")
    return home


# --- comparing answers ----------------------------------------------------------------------------

@dataclass
class Agreement:
    """One engine's greedy answers beside transformers' on the same prompts."""

    engine: str
    questions: list[str]
    reference: list[str]  # transformers'
    answers: list[str]  # the engine's

    @property
    def identical(self) -> int:
        return sum(a == b for a, b in zip(self.answers, self.reference))

    @property
    def share(self) -> float:
        return self.identical / len(self.reference)

    def summary(self) -> str:
        return f"{self.engine}: {self.identical}/{len(self.reference)} greedy answers identical to transformers'"

    def first_difference(self) -> str:
        for question, ours, theirs in zip(self.questions, self.reference, self.answers):
            if ours != theirs:
                return f"{question!r}: transformers {ours!r}, {self.engine} {theirs!r}"
        return "none"

    def check(self, minimum: float) -> None:
        if self.share < minimum:
            raise MoeTuneError(f"export refused: {self.summary()}, below {minimum:.0%}; first difference: "
                               f"{self.first_difference()}")


def _question(row: dict) -> str:
    return split_prompt(row)[0][-1]["content"]


def transformers_answers(checkpoint: Path, rows: list[dict], max_new_tokens: int, dtype: str) -> list[str]:
    """Greedy answers of the checkpoint as written, reloaded in transformers."""

    model, tokenizer = load_model(str(checkpoint), dtype)
    return greedy_answers(model.eval(), tokenizer, rows, batch_size=32, max_new_tokens=max_new_tokens)


def _run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """``command``'s completed process, its output decoded as transformers decodes tokens (a
    token may end inside a UTF-8 character; a broken one becomes U+FFFD)."""
    done = subprocess.run(command, capture_output=True, **kwargs)
    done.stdout, done.stderr = (out.decode("utf-8", errors="replace") for out in (done.stdout, done.stderr))
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error:" in line] or lines  # the cause, not the traceback
        raise MoeTuneError(f"{what} failed (exit {done.returncode}): {errors[-1] if errors else 'no output'}")
    return done


# --- vLLM -----------------------------------------------------------------------------------------

def vllm_answers(checkpoint: Path, rows: list[dict], max_new_tokens: int, dtype: str) -> list[str]:
    """Greedy answers of vLLM's offline engine, which renders each conversation with the
    checkpoint's own chat template (as its server does)."""
    python = vllm_python()
    with tempfile.TemporaryDirectory() as tmp:
        request, answers = Path(tmp) / "request.json", Path(tmp) / "answers.json"
        request.write_text(json.dumps({"model": str(checkpoint.resolve()), "dtype": dtype,
                                       "max_new_tokens": max_new_tokens,
                                       "conversations": [split_prompt(r)[0] for r in rows]}))
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        _run([str(python), str(VLLM_SCRIPT), str(request), str(answers)], "vLLM", env=env, cwd=tmp)
        return json.loads(answers.read_text())


def verify_vllm(checkpoint: Path, rows: list[dict], max_new_tokens: int, dtype: str) -> Agreement:
    return Agreement("vLLM", [_question(r) for r in rows], transformers_answers(checkpoint, rows, max_new_tokens, dtype),
                     vllm_answers(checkpoint, rows, max_new_tokens, dtype))


# --- llama.cpp ------------------------------------------------------------------------------------

def convert_gguf(checkpoint: Path, out: Path, quant: str) -> None:
    """``checkpoint`` as a GGUF file of type ``quant``, by llama.cpp's converter (and
    llama-quantize for the types the converter does not write)."""
    home = llama_cpp_home()
    first = out if quant in CONVERTER_TYPES else out.with_name(out.name + ".f16")
    _run([sys.executable, "-m", "moe_tune.export.gguf", str(home), str(checkpoint), "--outfile", str(first),
          "--outtype", quant if quant in CONVERTER_TYPES else "f16"], "llama.cpp's convert_hf_to_gguf.py")
    if first != out:
        try:
            _run([str(home / "bin" / "llama-quantize"), str(first), str(out), quant.upper()], "llama-quantize")
        finally:
            first.unlink(missing_ok=True)


def llama_cpp_answers(gguf: Path, prompts: list[str], max_new_tokens: int, special: list[str]) -> list[str]:
    """Greedy completions of rendered prompts in llama.cpp, one process each: llama.cpp
    tokenizes the text itself (special tokens included), and prints the prompt's pieces, then
    each new token until an end-of-generation token. ``special``: token texts that transformers'
    decoding skips, dropped here too."""
    binary = llama_cpp_home() / "bin" / "llama-simple"
    answers = []
    for prompt in prompts:
        printed = _run([str(binary), "-m", str(gguf), "-n", str(max_new_tokens), prompt], "llama.cpp (llama-simple)",
                       stdin=subprocess.DEVNULL).stdout
        if not printed.startswith(prompt):
            raise MoeTuneError(f"llama.cpp tokenized the prompt {prompt!r} into other text ({printed[:len(prompt)]!r}): "
                               "the GGUF's tokenizer differs from the checkpoint's")
        answer = printed[len(prompt):].removesuffix("\n")
        for token in special:
            answer = answer.replace(token, "")
        answers.append(answer)
    return answers


def verify_llama_cpp(checkpoint: Path, gguf: Path, rows: list[dict], max_new_tokens: int, dtype: str) -> Agreement:

    tokenizer = load_tokenizer(str(checkpoint))
    prompts = [tokenizer.apply_chat_template(split_prompt(r)[0], tokenize=False, add_generation_prompt=True)
               for r in rows]
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return Agreement("llama.cpp", [_question(r) for r in rows],
                     transformers_answers(checkpoint, rows, max_new_tokens, dtype),
                     llama_cpp_answers(gguf, prompts, max_new_tokens, special))
