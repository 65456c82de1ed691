"""Which tokens of a chat row are trained: each assistant turn's, whatever the chat template.

TRL finds assistant turns through ``{% generation %}`` markers in the template, or through a
training version of the template that it ships (``trl/chat_templates/*_training.jinja``). Most
real templates have neither (Mixtral's ``[INST]``, OLMoE's ``<|user|>``, DeepSeek-V2's
``User:``), so for those moe_tune renders the conversation turn by turn, as axolotl and
LLaMA-Factory do: what the template adds for an assistant turn is the text rendered through that
turn minus the text rendered up to it with the generation prompt, and the tokens over those
characters are trained. That needs a template that renders earlier turns the same whatever
follows (prefix-preserving); one that is not, without a training version, is refused.

Whitespace after a turn's end-of-turn token is the separator before the next turn: not trained.

A base checkpoint often has no template: ``model.chat_template`` gives it one (a name of
``TEMPLATES``, a ``.jinja`` file, or another tokenizer's folder). The special tokens it names that
the tokenizer lacks are added, and the end of an assistant turn becomes the eos token, so that
generation stops there; the model's embeddings grow to the new tokens (loading.py), whose rows
train even where the embeddings are frozen (trainable.py).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from trl.data_utils import pack_dataset

from moe_tune.errors import MoeTuneError, shown
from moe_tune.model.sources import hub_unreachable, read_tokenizer
from moe_tune.recipe import TEMPLATE_NAMES, TEMPLATES

TEMPLATE_KEY = "model.chat_template"
TEMPLATE_FILE = f"{TEMPLATE_KEY} in the recipe"
PATHS = {"markers": "the template's {% generation %} markers",
         "trl": "TRL's training version of the template",
         "turns": "turn by turn (the template has no markers, and TRL ships no training version of it)"}


@dataclass(frozen=True)
class Masking:
    path: str       # a key of PATHS
    template: str   # the template rendered with


def masking(tokenizer) -> Masking:
    """How assistant tokens are found for this tokenizer's chat template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers  # noqa: PLC0415

    template = tokenizer.chat_template
    template = template["default"] if isinstance(template, dict) else template
    if has_generation_markers(template):
        return Masking("markers", template)
    try:
        training = get_training_chat_template(tokenizer)
    except ValueError:  # TRL has no training version of this template
        training = None
    return Masking("trl", training) if training else Masking("turns", template)


def _render(tokenizer, messages: list[dict], template: str, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the (start, end) characters of each assistant turn)."""
    text, spans, eos = _render(tokenizer, messages, template), [], tokenizer.eos_token
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[:i + 1], template)
        if eos and through.endswith(eos) and not text.startswith(through):
            # Phi-3's template closes a conversation with eos_token unless a generation prompt follows: an
            # earlier turn has it only when rendered as the last (the last turn keeps it, as in TRL's phi3_5)
            through = through.removesuffix(eos)
        if not (through.startswith(before) and text.startswith(through)):
            raise MoeTuneError("the chat template is not prefix-preserving (rendering a longer conversation changes "
                               "an earlier turn), so its assistant tokens cannot be found turn by turn, and TRL ships "
                               "no training version of it; give the checkpoint's tokenizer a template with "
                               f"{{% generation %}} markers ({TEMPLATE_FILE}), or set sft.assistant_only_loss: "
                               "false to train on every token")
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_row(tokenizer, messages: list[dict], how: Masking) -> tuple[list[int], list[int]]:
    """(input_ids, mask: 1 for each trained token) of a conversation."""
    if how.path != "turns":
        out = tokenizer.apply_chat_template(messages, chat_template=how.template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    if not tokenizer.is_fast:
        raise MoeTuneError(f"{tokenizer.name_or_path}: finding assistant tokens turn by turn needs a fast "
                           "tokenizer (tokenizer.json) for character offsets")
    text, spans = assistant_spans(tokenizer, messages, how.template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # a token is trained when its characters overlap an assistant turn's
    mask = [int(any(s < end and e > start for s, e in spans)) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def content_trained(tokenizer, messages: list[dict], how: Masking, ids: list[int], mask: list[int]) -> str | None:
    """The role of a user or system message whose content tokens are trained, or None."""
    if not tokenizer.is_fast:
        return None
    text = _render(tokenizer, messages, how.template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:  # rendered and tokenized differently: offsets would not line up
        return None
    cursor = 0
    for message in messages:
        start = text.find(message["content"], cursor) if message["content"] else -1
        if start < 0:
            continue
        end, cursor = start + len(message["content"]), start + len(message["content"])
        if message["role"] != "assistant" and any(
                m and s < end and e > start for (s, e), m in zip(enc["offset_mapping"], mask)):
            return message["role"]
    return None


def show_trained(tokenizer, ids: list[int], mask: list[int], mark: tuple[str, str] = ("[[", "]]")) -> str:
    """The row as text, each run of trained tokens between ``mark``s."""
    pieces, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            piece = tokenizer.decode(ids[start:i])
            pieces.append(f"{mark[0]}{piece}{mark[1]}" if mask[start] else piece)
            start = i
    return "".join(pieces)


CONTENT_CHECKED = 256  # rows whose user and system tokens are checked untrained: a template masks all rows alike


def check_rows(path: str, rows: list[dict], tokenizer, how: Masking) -> None:
    """Before training: every row trains some token, and none of a user's or system's."""
    for i, row in enumerate(rows, 1):
        try:
            ids, mask = tokenize_row(tokenizer, row["messages"], how)
        except MoeTuneError:
            raise
        except Exception as e:  # noqa: BLE001 - the template raised (roles it rejects, a missing key): its message
            raise MoeTuneError(f"{path} row {i}: the chat template cannot render it ({str(e).splitlines()[0]}); "
                               f"fix the row's roles, or give the checkpoint another template "
                               f"({TEMPLATE_FILE})") from None
        if not any(mask):
            raise MoeTuneError(f"{path} row {i}: no token of it would be trained (the chat template renders no "
                               "assistant turn for it); check its roles, or give the checkpoint another template "
                               f"({TEMPLATE_FILE})")
        role = content_trained(tokenizer, row["messages"], how, ids, mask) if i <= CONTENT_CHECKED else None
        if role:
            raise MoeTuneError(f"{path} row {i}: the {role} message's tokens would be trained ({PATHS[how.path]} "
                               f"mark them); give the checkpoint a template that marks only assistant turns "
                               f"({TEMPLATE_FILE}), "
                               "or set sft.assistant_only_loss: false")


def first_row(tokenizer, rows: list[dict], how: Masking) -> str:
    """The first row as trained: the trained tokens between [[ and ]], and how they were found."""
    ids, mask = tokenize_row(tokenizer, rows[0]["messages"], how)
    return (f"first training row, {sum(mask)} of {len(ids)} tokens trained (between [[ ]]; assistant turns found "
            f"by {PATHS[how.path]}):\n{show_trained(tokenizer, ids, mask)}")


PREVIEW_ROWS, PREVIEW_SHOWN = 64, 4  # the rows `packing_preview` packs, and shows


def packing_preview(tokenizer, rows: list[dict], how: Masking, max_length: int) -> str:
    """The first packed sequence of the first rows, as TRL's best-fit packing makes it: each row
    between ‖ marks, where its position ids restart."""
    encoded = [tokenize_row(tokenizer, r["messages"], how)[0] for r in rows[:PREVIEW_ROWS]]
    first = pack_dataset(Dataset.from_dict({"input_ids": encoded}), max_length, "bfd")[0]
    lengths, pieces, start = first["seq_lengths"], [], 0
    for length in lengths[:PREVIEW_SHOWN]:
        pieces.append(tokenizer.decode(first["input_ids"][start:start + length]))
        start += length
    more = f" ({len(lengths) - PREVIEW_SHOWN} rows more)" if len(lengths) > PREVIEW_SHOWN else ""
    return (f"packing: the first packed sequence of the first {len(encoded)} rows holds {len(lengths)} rows "
            f"({'+'.join(map(str, lengths))} of {max_length} tokens); each row attends only to itself, its "
            "positions restarting at ‖:\n‖" + "‖".join(pieces) + "‖" + more)


# --- giving a checkpoint a template (model.chat_template) ----------------------------------------

# literals in a template that name a special token: ChatML's <|im_start|>, DeepSeek's <｜User｜>
SPECIAL_LITERAL = re.compile(r"<\|[^\s|<>]+\|>|<｜[^\s｜<>]+｜>")
PROBE = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]


@dataclass(frozen=True)
class GivenTemplate:
    """A chat template that ``model.chat_template`` gives the checkpoint's tokenizer."""

    source: str               # as the recipe names it: a name, a .jinja file or a tokenizer folder
    template: str             # the Jinja text
    tokens: tuple[str, ...]   # the special tokens it names: added where the tokenizer lacks them


def read_template(value: str) -> GivenTemplate:
    """The template ``value`` names, checked to parse and to render a user/assistant exchange."""
    path = Path(value)
    if value in TEMPLATE_NAMES:
        text = (TEMPLATES / f"{value}.jinja").read_text(encoding="utf-8")
        tokens = SPECIAL_LITERAL.findall(text)
    elif path.is_file():
        if path.suffix not in (".jinja", ".j2"):
            raise MoeTuneError(f"{value}: {TEMPLATE_KEY} names a file that is not a Jinja template (.jinja); "
                               "give a .jinja file, a template name or a tokenizer folder")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MoeTuneError(f"{value}: not UTF-8 text; save the template as UTF-8") from None
        tokens = SPECIAL_LITERAL.findall(text)
    elif path.suffix in (".jinja", ".j2"):
        raise MoeTuneError(f"{shown(value)}: no such file ({TEMPLATE_KEY}); check the path (relative paths start "
                           "from the working directory)")
    elif path.is_dir() or ("/" in value and not value.startswith((".", "/"))):
        text, tokens = _template_of_tokenizer(value)
    else:
        names = ", ".join(TEMPLATE_NAMES)
        match = difflib.get_close_matches(value, TEMPLATE_NAMES, n=1, cutoff=0.5)
        hint = f"; did you mean '{match[0]}'?" if match else ""
        raise MoeTuneError(f"{TEMPLATE_KEY}: '{value}' is not a template name ({names}), a .jinja file or a "
                           f"tokenizer folder{hint}")
    _check_renders(value, text)
    return GivenTemplate(value, text, tuple(dict.fromkeys(tokens)))


def _template_of_tokenizer(value: str) -> tuple[str, list[str]]:
    """(template, the tokenizer's added tokens that it names) of another tokenizer, as TRL's
    clone_chat_template takes it, but adding only the tokens the template uses."""
    if not Path(value).is_dir() and (why := hub_unreachable()):
        raise MoeTuneError(f"{TEMPLATE_KEY}: {shown(value)}: no such folder, and not reachable as a Hugging Face Hub id "
                           f"offline ({why}); give a local tokenizer folder, a .jinja file or a template name")
    try:
        source = read_tokenizer(value)
    except MoeTuneError as e:
        raise MoeTuneError(f"{TEMPLATE_KEY}: {e}") from None
    text = source.chat_template
    text = text.get("default") if isinstance(text, dict) else text
    if not text:
        raise MoeTuneError(f"{value}: that tokenizer has no chat template to copy ({TEMPLATE_KEY})")
    named = [t.content for t in source.added_tokens_decoder.values() if t.content in text]
    return text, named + SPECIAL_LITERAL.findall(text)


def _check_renders(value: str, text: str) -> None:
    import jinja2  # noqa: PLC0415
    from transformers.utils.chat_template_utils import render_jinja_template  # noqa: PLC0415

    try:
        # the special-token names apply_chat_template passes; the checkpoint's own come later
        render_jinja_template(conversations=[PROBE], chat_template=text,
                              **dict.fromkeys(("bos_token", "eos_token", "pad_token", "unk_token"), ""))
    except jinja2.TemplateSyntaxError as e:
        raise MoeTuneError(f"{value}:{e.lineno}: the chat template does not parse ({e.message}); "
                           f"fix it, or name another in {TEMPLATE_KEY}") from None
    except Exception as e:  # noqa: BLE001 - the template's own raise_exception, or an undefined name
        raise MoeTuneError(f"{value}: the chat template cannot render a user/assistant exchange "
                           f"({str(e).splitlines()[0]}); name another in {TEMPLATE_KEY}") from None


def recipe_template(model_section) -> GivenTemplate | None:
    """The template a recipe's ``model`` section gives the checkpoint, or None."""
    return read_template(model_section.chat_template) if model_section.chat_template else None


def give_template(tokenizer, given: GivenTemplate) -> dict[str, int]:
    """Give ``tokenizer`` the template: add the special tokens it lacks (returned with their ids)
    and make the end of an assistant turn its eos token."""
    from tokenizers import AddedToken  # noqa: PLC0415

    tokenizer.chat_template = given.template
    lacking = [t for t in given.tokens if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                           for t in lacking]}, replace_extra_special_tokens=False)
    ids, mask = tokenize_row(tokenizer, PROBE, masking(tokenizer))
    trained = [i for i, m in zip(ids, mask) if m]
    if not trained:
        raise MoeTuneError(f"{given.source}: the chat template renders no assistant turn (nothing of a "
                           f"user/assistant exchange would be trained); name another in {TEMPLATE_KEY}")
    if trained[-1] in tokenizer.all_special_ids:  # e.g. <|im_end|>: generation stops where a turn ends
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(trained[-1])
    return {t: tokenizer.convert_tokens_to_ids(t) for t in lacking}


def new_tokens(path: str, given: GivenTemplate, vocab_size: int) -> dict[str, int]:
    """The tokens (and ids) the template adds to the checkpoint's tokenizer, for the plan; with
    no tokenizer to ask (a published config alone), every token it names, after ``vocab_size``."""
    try:
        tokenizer = read_tokenizer(path)
    except MoeTuneError:
        return {t: vocab_size + i for i, t in enumerate(given.tokens)}
    return give_template(tokenizer, given)
