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

from moe_tune.chat_template import check_rows, first_row, masking, show_trained, tokenize_row
from moe_tune.data import read_chat_rows
from moe_tune.errors import MoeTuneError

from conftest import ROOT, SHIPPED_MODEL

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
    assert "chat_template.jinja" in str(e.value) and "sft.assistant_only_loss: false" in str(e.value)


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

    from moe_tune.chat_template import Masking

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    marked = masking(tokenizer)
    turns = Masking("turns", marked.template)
    rows = [json.loads(line) for line in (ROOT / "data" / "train.jsonl").read_text().splitlines()[:50]]
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, *rows[0]["messages"],
                              {"role": "user", "content": "And again?"}, {"role": "assistant", "content": "Same."}]})
    for row in rows:
        assert tokenize_row(tokenizer, row["messages"], turns) == tokenize_row(tokenizer, row["messages"], marked)
