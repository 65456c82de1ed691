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
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_tune.errors import MoeTuneError

TEMPLATE_FILE = "chat_template.jinja in the model folder"
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


def first_training_row(recipe, args) -> str | None:
    """``first_row`` of a recipe's training data, for ``moe-tune plan``; None where all tokens
    train (``args``, the run's SFTConfig, says), or there is no tokenizer or data to show (a
    published config alone, a hub dataset offline): a plan needs neither."""
    from moe_tune.data import read_chat_rows  # noqa: PLC0415
    from moe_tune.loading import load_tokenizer  # noqa: PLC0415

    if not args.assistant_only_loss:
        return None
    try:
        tokenizer = load_tokenizer(recipe.model.path)
        rows = read_chat_rows(recipe.data.train, 1, recipe.data.format, recipe.data.skip_bad_rows)
    except MoeTuneError:
        return None
    return first_row(tokenizer, rows, masking(tokenizer))
