"""moe-tune chat: answers streamed as they are generated, greedy ones equal to transformers' own;
the conversation kept and rendered by the model's (or the run's) chat template; an empty line,
the end of input or --prompt's one answer ends it; options checked before anything loads."""

import os
import subprocess
import sys

import pytest

from moe_tune.cli import main
from moe_tune.evaluation.chat import Sampling, chat_loop, load_chat_model, render

from conftest import ROOT, SHIPPED_MODEL

PROMPT = "What city is Telrosia's capital?"  # data/heldout.jsonl's first row
SHORT = 8  # new tokens per answer: the shipped base never ends a turn on its own


@pytest.fixture(scope="module")
def tiny():
    return load_chat_model(SHIPPED_MODEL)


def reference(model, tokenizer, history, max_new_tokens=SHORT) -> str:
    """transformers' own greedy answer to the conversation as the chat template renders it."""
    enc = tokenizer(render(tokenizer, history), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def user(text):
    return {"role": "user", "content": text}


def test_prompt_answers_once_greedily_as_transformers_does(tiny, capsys):
    code = main(["chat", str(SHIPPED_MODEL), "--prompt", PROMPT, "--max-new-tokens", str(SHORT)])
    out = capsys.readouterr().out
    assert code == 0
    expected = reference(*tiny, [user(PROMPT)])
    assert expected.strip() and out == expected + "\n"  # streamed, then the streamer's newline


@pytest.mark.slow
def test_stdin_turns_until_an_empty_line(tiny):
    """Two turns answered, each with the one before it; the line after the empty one is not read."""
    done = subprocess.run([sys.executable, "-m", "moe_tune.cli", "chat", str(SHIPPED_MODEL), "--max-new-tokens",
                           str(SHORT)], input="hi\nsecond\n\nnot asked\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    first = reference(*tiny, [user("hi")])
    second = reference(*tiny, [user("hi"), {"role": "assistant", "content": first}, user("second")])
    assert done.stdout == f"{first}\n{second}\n"


def test_each_turn_is_rendered_with_the_exchanges_before_it(tiny, capsys):
    model, tokenizer = tiny
    history = chat_loop(model, tokenizer, Sampling(max_new_tokens=SHORT), system="Answer briefly.",
                        lines=["hi", "second", "", "not asked"])
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    first_exchange = tokenizer.apply_chat_template(history[:3], tokenize=False)
    second_prompt = render(tokenizer, history[:4])
    assert second_prompt.startswith(first_exchange) and history[2]["content"] in second_prompt
    assert "Answer briefly." in second_prompt and second_prompt.endswith("<|user|>\nsecond\n<|assistant|>")
    assert history[4]["content"] == reference(model, tokenizer, history[:4])
    assert capsys.readouterr().out == f"{history[2]['content']}\n{history[4]['content']}\n"


def test_ctrl_c_ends_the_conversation_as_an_empty_line_does(tiny, capsys):
    def typed():
        yield "hi"
        raise KeyboardInterrupt

    history = chat_loop(*tiny, Sampling(max_new_tokens=SHORT), lines=typed())
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_sampling_is_seeded(tiny, capsys):
    model, tokenizer = tiny
    sampled = [chat_loop(model, tokenizer, Sampling(temperature=1.5, top_p=0.9, max_new_tokens=SHORT, seed=seed),
                         lines=[PROMPT])[-1]["content"] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("option, expected", [
    (["--temperature", "-0.5"], "--temperature: must be >= 0, 0 for greedy (got -0.5)"),
    (["--top-p", "0", "--temperature", "1"], "--top-p: must be in (0, 1] (got 0.0)"),
    (["--top-p", "1.5", "--temperature", "1"], "--top-p: must be in (0, 1] (got 1.5)"),
    (["--top-p", "0.9"], "--top-p: applies only when sampling; add --temperature T (T > 0)"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1 (got 0)"),
])
def test_out_of_range_options_are_one_line_before_loading(option, expected, capsys):
    code = main(["chat", "no/such/model", *option])  # the model would fail too, were it loaded first
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"moe-tune: error: {expected}"]


def fake_run(folder):
    folder.mkdir()
    (folder / "recipe.yaml").write_text((ROOT / "recipes" / "quickstart.yaml").read_text())
    return str(folder)


@pytest.mark.parametrize("argv, expected", [
    (lambda tmp: ["no/such/model"], "no/such/model (read from"),
    (lambda tmp: [fake_run(tmp / "run")], "this run has no saved model yet"),
    (lambda tmp: [fake_run(tmp / "run"), "--adapter", str(tmp)], "a run folder already knows its adapter"),
    (lambda tmp: [str(SHIPPED_MODEL), "--adapter", str(tmp)], "not a PEFT adapter folder (no adapter_config.json)"),
])
def test_what_cannot_be_loaded_is_one_line(argv, expected, tmp_path, capsys):
    code = main(["chat", *argv(tmp_path), "--prompt", "hi"])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and len(out.err.strip().splitlines()) == 1 and expected in out.err, out.err


@pytest.fixture(scope="module")
def lora_chatml_run(tmp_path_factory):
    """A LoRA run given another chat template (ChatML: new tokens, a new turn end)."""
    run = tmp_path_factory.mktemp("runs") / "chatml"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the recipe's paths are relative to the repository
        assert main(["train", "recipes/quickstart.yaml", f"output_dir={run}", "sft.max_steps=2",
                     "trainable.preset=lora_experts", "model.chat_template=chatml", "data.max_train_rows=64",
                     "data.valid=null", "sft.eval_strategy=no", "eval.files=[]", "eval.retention_file=null"]) == 0
    return run


@pytest.mark.slow
def test_a_run_answers_in_its_own_chat_template(lora_chatml_run, capsys):
    """RUN, and its base with RUN/model as --adapter, load the same tuned model and the run's tokenizer."""
    model, tokenizer = load_chat_model(lora_chatml_run)
    assert render(tokenizer, [user(PROMPT)]).endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    expected = reference(model, tokenizer, [user(PROMPT)])
    for argv in ([str(lora_chatml_run)], [str(SHIPPED_MODEL), "--adapter", str(lora_chatml_run / "model")]):
        assert main(["chat", *argv, "--prompt", PROMPT, "--max-new-tokens", str(SHORT)]) == 0
        assert capsys.readouterr().out == expected + "\n"
