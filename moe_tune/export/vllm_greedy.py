"""Greedy answers from vLLM's offline engine: run by ``moe_tune.export.serving`` with the serving
environment's Python (``make serving-env``), not imported by moe_tune itself.

    python vllm_greedy.py REQUEST.json ANSWERS.json

REQUEST: {"model": folder, "conversations": [[{"role", "content"}, ...], ...],
"max_new_tokens": n, "dtype": "float32" | "bfloat16" | ...}. ANSWERS: the decoded completions,
in order. Conversations go through ``LLM.chat``, so the checkpoint's own chat template and
tokenizer render them inside vLLM, as its OpenAI-compatible server would.

Only the standard library and vLLM are used: this file runs beside a transformers version other
than moe_tune's.
"""

import json
import os
import sys


def main(request_path: str, answers_path: str) -> None:
    request = json.load(open(request_path))
    # vLLM's CPU backend otherwise claims most of the machine's memory for its KV cache
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    # prompts here are short; a long context would only reserve KV cache the CPU does not have
    config = json.load(open(os.path.join(request["model"], "config.json")))
    context = min(config.get("max_position_embeddings") or 4096, 4096)
    llm = LLM(model=request["model"], dtype=request["dtype"], seed=0, enforce_eager=True, max_model_len=context)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    outputs = llm.chat(request["conversations"], params, use_tqdm=False)
    with open(answers_path, "w") as f:
        json.dump([out.outputs[0].text for out in outputs], f)


if __name__ == "__main__":  # vLLM starts its engine in a child process that re-imports this file
    main(*sys.argv[1:])
