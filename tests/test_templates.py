"""Which tokens of a chat row train, for the chat templates users meet: the published formats of MoE
models (tests/chat_templates/, without {% generation %} markers, as real ones are), the MoE templates
TRL ships, and broken templates (tests/chat_templates/broken/), each refused in one line.

Every template renders the same conversation through the shipped tokenizer (bos <|bos|>, eos <|end|>;
special tokens it lacks, such as <|im_end|>, tokenize as text), and the trained tokens must be exactly
each assistant turn's content with its end-of-turn marker, plus what a template's rendering adds."""

from itertools import groupby
from pathlib import Path

import pytest
import trl
from transformers import AutoTokenizer

from moe_tune.model.templates import (check_rows, first_row, give_template, masking, read_template, show_trained,
                                    tokenize_row)
from moe_tune.data.rows import read_chat_rows
from moe_tune.errors import MoeTuneError

from conftest import ROOT, SHIPPED_MODEL, without_template

FIXTURES = ROOT / "tests" / "chat_templates"
BROKEN = FIXTURES / "broken"
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 plus 3?"},
                {"role": "assistant", "content": "It is 6."}]


def qwen_think(answer):  # Qwen3's training template renders an empty <think> block before every answer
    return f"<think>\n\n</think>\n\n{answer}<|im_end|>\n"


# template -> (how its assistant turns are found, the trained text of each assistant turn)
PUBLISHED = {  # tests/chat_templates/<name>.jinja: no markers, and TRL ships no training version
    # eos_token (</s> in Mixtral's tokenizer) ends a turn; the space after [/INST] is the answer's
    "mixtral_instruct": ("turns", [" 4<|end|>", " It is 6.<|end|>"]),
    "olmoe_instruct": ("turns", ["4<|end|>", "It is 6.<|end|>"]),
    # the generation prompt is 'Assistant:', a turn 'Assistant: ...': the space is the answer's
    "deepseek_v2_chat": ("turns", [" 4<|end|>", " It is 6.<|end|>"]),
    # the last turn keeps the eos_token that closes a conversation (here also <|end|>), as TRL's phi3_5 does
    "phi3_5_moe_instruct": ("turns", ["4<|end|>", "It is 6.<|end|>\n<|end|>"]),
    "granite3_moe_instruct": ("turns", ["4<|end_of_text|>", "It is 6.<|end_of_text|>"]),
    "jamba_instruct": ("turns", [" 4<|eom|>", " It is 6.<|eom|>"]),
}
SHIPPED_BY_TRL = {  # trl/chat_templates/<name>.jinja, those of MoE families (model type in transformers)
    # deepseek_v3: TRL's training template trains the <｜Assistant｜> tag too (the generation prompt)
    "deepseekv3": ("trl", ["<｜Assistant｜>4<｜end▁of▁sentence｜>", "<｜Assistant｜>It is 6.<｜end▁of▁sentence｜>"]),
    # glm4_moe: an empty think block; no end-of-turn token: a turn ends with the next role tag, <|user|>,
    # even after the last turn
    "glm4moe": ("trl", ["\n<think></think>\n4<|user|>", "\n<think></think>\nIt is 6.<|user|>"]),
    # gpt_oss: the whole harmony message trains, its header too; the conversation's last ends in <|return|>
    "gptoss": ("trl", ["<|start|>assistant<|channel|>final<|message|>4<|end|>",
                       "<|start|>assistant<|channel|>final<|message|>It is 6.<|return|>"]),
    # qwen3_moe, qwen3_5_moe (3.5, 3.6, 3.8); TRL's marks the newline after <|im_end|>
    **{name: ("trl", [qwen_think("4"), qwen_think("It is 6.")])
       for name in ("qwen3", "qwen3_5_think", "qwen3_5_nothink", "qwen3_6", "qwen3_8")},
    "qwen3_instruct_2507": ("trl", ["4<|im_end|>\n", "It is 6.<|im_end|>\n"]),
    "qwen3_vl": ("trl", ["4<|im_end|>\n", "It is 6.<|im_end|>\n"]),  # qwen3_vl_moe
    "qwen2_5": ("trl", ["\n4<|im_end|>\n", "\nIt is 6.<|im_end|>\n"]),  # qwen2_moe; the role's newline too
    # phimoe: the final eos_token (here also <|end|>) is trained
    "phi3_5": ("trl", ["4<|end|>\n", "It is 6.<|end|>\n<|end|>"]),
    # nemotron_h (Nemotron 3): an empty think block
    **{name: ("trl", ["<think></think>4<|im_end|>\n", "<think></think>It is 6.<|im_end|>\n"])
       for name in ("nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra", "nemotron_3_5_lightning")},
    # lfm2_moe; LFM2.5's revisions ship with {% generation %} markers
    **{name: (how, ["4<|im_end|>\n", "It is 6.<|im_end|>\n"]) for name, how in
       (("lfm2", "trl"), ("lfm2_v2", "trl"), ("lfm2_2_5", "markers"), ("lfm2_2_5_v2", "markers"))},
    # gemma4: TRL ships no training version; its template is prefix-preserving
    **{name: ("turns", ["4<turn|>", "It is 6.<turn|>"])
       for name in ("gemma4", "gemma4_v2", "gemma4_v3", "gemma4_v4", "gemma4_v5")},
}
# TRL's other templates: dense families, vision-language ones, and DiffusionGemma (not a causal LM)
NOT_MOE = {"cohere", "cohere2", "deepseek_r1_distill", "diffusion_gemma", "gemma", "gemma3", "idefics3",
           "lfm2_2_5_vl", "llama3", "llama3_1", "llama3_2", "llava_next", "muse_glimmer", "phi3",
           "qwen2_5_vl", "smolvlm"}


def tokenizer_with(template: str):
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    tokenizer.chat_template = template
    return tokenizer


def trained_runs(tokenizer, messages, how) -> list[str]:
    """The text of each run of trained tokens."""
    ids, mask = tokenize_row(tokenizer, messages, how)
    runs = groupby(zip(ids, mask), key=lambda pair: pair[1])
    return [tokenizer.decode([i for i, _ in run]) for trained, run in runs if trained]


@pytest.mark.parametrize("path, expected", [(FIXTURES / f"{name}.jinja", e) for name, e in PUBLISHED.items()]
                         + [(TRL_TEMPLATES / f"{name}.jinja", e) for name, e in SHIPPED_BY_TRL.items()],
                         ids=[*PUBLISHED, *SHIPPED_BY_TRL])
def test_each_assistant_turn_and_its_end_train(path, expected):
    tokenizer = tokenizer_with(path.read_text())
    how = masking(tokenizer)
    assert how.path == expected[0]
    assert trained_runs(tokenizer, CONVERSATION, how) == expected[1]
    check_rows("chat.jsonl", [{"messages": CONVERSATION}], tokenizer, how)  # no user or system token trains


def test_fixtures_name_their_model_and_have_no_markers():
    for path in FIXTURES.glob("*.jinja"):
        text = path.read_text()
        assert text.startswith("{#-") and "generation %}" not in text, path.name
    assert {p.stem for p in FIXTURES.glob("*.jinja")} == set(PUBLISHED)


def test_every_trl_template_is_sorted_into_moe_or_not():
    """A template a new TRL ships fails here until it is tested above or named dense."""
    shipped = {p.stem for p in TRL_TEMPLATES.glob("*.jinja") if not p.stem.endswith("_training")}
    assert shipped == set(SHIPPED_BY_TRL) | NOT_MOE


def test_a_template_that_is_not_prefix_preserving_is_refused():
    tokenizer = tokenizer_with((BROKEN / "thinks_last_turn_only.jinja").read_text())
    how = masking(tokenizer)
    assert how.path == "turns"
    with pytest.raises(MoeTuneError, match="not prefix-preserving") as e:
        tokenize_row(tokenizer, CONVERSATION, how)
    assert "model.chat_template" in str(e.value) and "sft.assistant_only_loss: false" in str(e.value)


def check(template_path: Path, rows: list[list[dict]]) -> str:
    """check_rows's one line for ``rows`` under the template at ``template_path``."""
    tokenizer = tokenizer_with(template_path.read_text())
    with pytest.raises(MoeTuneError) as e:
        check_rows("train.jsonl", [{"messages": m} for m in rows], tokenizer, masking(tokenizer))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_check_rows_a_row_with_no_assistant_turn():
    assert check(BROKEN / "prompts_only.jinja", [CONVERSATION]).startswith(
        "train.jsonl row 1: no token of it would be trained")


def test_check_rows_a_row_the_template_raises_on():
    two_users = [CONVERSATION[1], CONVERSATION[3], CONVERSATION[4]]
    assert check(FIXTURES / "mixtral_instruct.jinja", [CONVERSATION, two_users]).startswith(
        "train.jsonl row 2: the chat template cannot render it (After the optional system message, "
        "conversation roles must alternate")


def test_check_rows_markers_around_a_user_message():
    assert check(BROKEN / "marks_every_turn.jinja", [CONVERSATION[1:3]]).startswith(
        "train.jsonl row 1: the user message's tokens would be trained")


def test_the_shipped_template_trains_the_answer_and_its_end():
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    rows = read_chat_rows(ROOT / "data" / "train.jsonl", max_rows=1)
    how = masking(tokenizer)
    answer = rows[0]["messages"][-1]["content"]
    assert how.path == "markers"
    assert f"[[ {answer}<|end|>]]" in first_row(tokenizer, rows, how)
    ids, mask = tokenize_row(tokenizer, rows[0]["messages"], how)
    assert show_trained(tokenizer, ids, mask, mark=("<", ">")).endswith(f"<|assistant|>< {answer}<|end|>>")


def test_turn_by_turn_finds_what_the_markers_mark():
    """On the shipped template, which has markers, the turn-by-turn path trains the same tokens
    on every training row kind (the path real templates without markers take)."""
    import json

    from moe_tune.model.templates import Masking

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    marked = masking(tokenizer)
    turns = Masking("turns", marked.template)
    rows = [json.loads(line) for line in (ROOT / "data" / "train.jsonl").read_text().splitlines()[:50]]
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, *rows[0]["messages"],
                              {"role": "user", "content": "And again?"}, {"role": "assistant", "content": "Same."}]})
    for row in rows:
        assert tokenize_row(tokenizer, row["messages"], turns) == tokenize_row(tokenizer, row["messages"], marked)


# --- model.chat_template: a template for a base checkpoint -----------------------------------------

def base_tokenizer(tmp_path):
    return AutoTokenizer.from_pretrained(without_template(tmp_path / "base"))


def test_chatml_adds_its_tokens_and_a_turn_ends_with_eos(tmp_path):
    tokenizer = base_tokenizer(tmp_path)
    assert not tokenizer.chat_template and len(tokenizer) == 1536
    added = give_template(tokenizer, read_template("chatml"))
    assert added == {"<|im_start|>": 1536, "<|im_end|>": 1537} and len(tokenizer) == 1538
    assert tokenizer.eos_token == "<|im_end|>"  # generation stops where a turn ends
    how = masking(tokenizer)
    assert trained_runs(tokenizer, CONVERSATION, how) == ["4<|im_end|>", "It is 6.<|im_end|>"]
    check_rows("chat.jsonl", [{"messages": CONVERSATION}], tokenizer, how)
    ids, _ = tokenize_row(tokenizer, CONVERSATION, how)
    assert ids[0] == tokenizer.bos_token_id and ids.count(1536) == 5  # pretraining's BOS, then ChatML
    assert tokenizer.decode(ids).startswith("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert give_template(tokenizer, read_template("chatml")) == {}  # tokens it has are not added again


def test_a_jinja_file_brings_the_special_tokens_it_names(tmp_path):
    tokenizer = base_tokenizer(tmp_path)
    given = read_template(str(FIXTURES / "jamba_instruct.jinja"))
    assert given.tokens == ("<|startoftext|>", "<|bom|>", "<|system|>", "<|eom|>", "<|user|>", "<|assistant|>")
    added = give_template(tokenizer, given)  # the shipped tokenizer has <|user|> and <|assistant|> already
    assert list(added) == ["<|startoftext|>", "<|bom|>", "<|system|>", "<|eom|>"]
    assert tokenizer.eos_token == "<|eom|>"
    assert trained_runs(tokenizer, CONVERSATION, masking(tokenizer)) == [" 4<|eom|>", " It is 6.<|eom|>"]


def test_a_tokenizer_folder_lends_its_template_and_tokens(tmp_path):
    donor = base_tokenizer(tmp_path)
    give_template(donor, read_template("chatml"))
    donor.save_pretrained(tmp_path / "donor")
    given = read_template(str(tmp_path / "donor"))
    assert given.template == read_template("chatml").template and set(given.tokens) >= {"<|im_start|>", "<|im_end|>"}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert list(give_template(tokenizer, given)) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("value, expected", [
    ("chatm", "model.chat_template: 'chatm' is not a template name (chatml), a .jinja file or a tokenizer folder; "
              "did you mean 'chatml'?"),
    ("data/train.jsonl", "data/train.jsonl: model.chat_template names a file that is not a Jinja template (.jinja); "
                         "give a .jinja file, a template name or a tokenizer folder"),
])
def test_a_template_that_is_not_there(value, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(MoeTuneError) as e:
        read_template(value)
    assert str(e.value) == expected


def test_a_template_that_does_not_parse_names_its_line(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}\n")
    with pytest.raises(MoeTuneError, match=rf"^{path}:2: the chat template does not parse \(unexpected '}}'\)"):
        read_template(str(path))


def test_a_template_that_renders_no_assistant_turn(tmp_path):
    given = read_template(str(BROKEN / "prompts_only.jinja"))
    with pytest.raises(MoeTuneError, match="prompts_only.jinja: the chat template renders no assistant turn"):
        give_template(base_tokenizer(tmp_path), given)


def test_a_folder_whose_tokenizer_has_no_template(tmp_path):
    with pytest.raises(MoeTuneError, match="base: that tokenizer has no chat template to copy"):
        read_template(str(without_template(tmp_path / "base")))


# --- model.chat_template end to end: the new rows train, and every later step keeps them --------------

SMALL = [str(ROOT / "recipes" / "quickstart.yaml"), "model.chat_template=chatml", "sft.max_steps=4",
         "sft.logging_steps=1", "sft.warmup_steps=0", "sft.eval_strategy=no", "data.valid=null",
         "data.max_train_rows=64", "eval.max_rows=6", "eval.retention_file=null"]
NEW_ROWS = slice(1536, 1538)  # <|im_start|>, <|im_end|>


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return without_template(tmp_path_factory.mktemp("checkpoints") / "base")


def shipped_embeddings():
    from safetensors.torch import load_file

    return load_file(SHIPPED_MODEL / "model.safetensors")["model.embed_tokens.weight"]  # (1536, 128), tied


def check_new_rows(weight):
    """Rows of the old tokens as the base has them, to the bit; the new ones trained away from
    their initialisation near the old rows' mean."""
    import torch

    old = shipped_embeddings()
    assert weight.shape == (1538, 128) and torch.equal(weight[:1536], old)
    assert (weight[NEW_ROWS] - old.mean(0)).abs().max() > 1e-2


def plan_of(run):
    import json

    plan = json.loads((run / "plan.json").read_text())
    return plan, {row["part"]: row for row in plan["parts"]}


@pytest.mark.slow
def test_frozen_embeddings_train_only_the_new_rows(base, tmp_path):
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    from moe_tune.cli import main

    run = tmp_path / "run"
    # weight decay would shrink the frozen rows too, were it applied to the embeddings
    assert main(["train", *SMALL, f"model.path={base}", "trainable.preset=experts_only", "sft.learning_rate=1.0e-2",
                 "sft.weight_decay=0.1", f"output_dir={run}"]) == 0
    plan, parts = plan_of(run)
    assert plan["new_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert parts["embeddings"]["mode"] == "freeze" and parts["embeddings"]["trainable"] == 2 * 128
    assert plan["trainable_params"] == parts["routed_experts"]["params"] + 2 * 128
    check_new_rows(load_file(run / "model" / "model.safetensors")["model.embed_tokens.weight"])
    saved = AutoTokenizer.from_pretrained(run / "model")
    assert saved.chat_template == read_template("chatml").template and saved.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(run / "model").eos_token_id == 1537
    assert (run / "eval" / "report.md").is_file()  # the base evaluated beside it, through the tuned tokenizer


@pytest.mark.slow
def test_lora_trains_the_new_rows_through_peft_and_the_export_keeps_them(base, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from moe_tune.cli import main

    run, merged = tmp_path / "lora", tmp_path / "merged"
    assert main(["train", *SMALL, f"model.path={base}", "trainable.preset=lora_experts", "sft.learning_rate=1.0e-2",
                 f"output_dir={run}"]) == 0
    _, parts = plan_of(run)
    assert parts["embeddings"]["trainable"] == 2 * 128
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == {"model.embed_tokens": [1536, 1537]}
    assert main(["eval", str(run), "--out", str(tmp_path / "eval")]) == 0  # base + adapter, and the base alone
    assert main(["export", str(run), "--merged", str(merged)]) == 0  # checks the same logits first
    model = AutoModelForCausalLM.from_pretrained(merged)
    check_new_rows(model.get_input_embeddings().weight.detach())
    assert model.generation_config.eos_token_id == 1537
    assert AutoTokenizer.from_pretrained(merged).chat_template == read_template("chatml").template
    from peft import AutoPeftModelForCausalLM  # PEFT's own loader grows the base to the adapter's tokenizer

    check_new_rows(AutoPeftModelForCausalLM.from_pretrained(run / "model").merge_and_unload()
                   .get_input_embeddings().weight.detach())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["experts_only", "lora_experts"])
def test_a_run_given_a_template_resumes_to_the_same_losses(base, tmp_path, preset):
    import json
    import shutil

    from moe_tune.cli import main

    def losses():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    run = tmp_path / "run"
    assert main(["train", *SMALL, f"model.path={base}", f"trainable.preset={preset}", "sft.learning_rate=5.0e-3",
                 "sft.max_steps=6", "sft.save_strategy=steps", "sft.save_steps=3", "eval.compare_base=false",
                 f"output_dir={run}"]) == 0
    whole = losses()
    for path in (run / "model", run / "eval", run / "checkpoints" / "checkpoint-6"):  # as if killed after step 3
        shutil.rmtree(path)
    assert main(["train", str(run), "--resume"]) == 0
    assert sorted(losses()) == list(range(1, 7))
    for step in range(4, 7):
        assert losses()[step] == pytest.approx(whole[step], rel=1e-4, abs=1e-5), step
