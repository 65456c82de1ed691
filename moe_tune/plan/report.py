"""The plan report: what a run will train and what it needs, shown by ``moe-tune plan`` and
written to RUN/plan.json."""

from __future__ import annotations

from moe_tune.data.rows import read_chat_rows
from moe_tune.errors import MoeTuneError
from moe_tune.model.loading import load_tokenizer
from moe_tune.model.templates import GivenTemplate, first_row, masking


def first_training_row(recipe, args, template: GivenTemplate | None = None) -> str | None:
    """``first_row`` of a recipe's training data, for ``moe-tune plan``; None where all tokens
    train (``args``, the run's SFTConfig, says), or there is no tokenizer or data to show (a
    published config alone, a hub dataset offline): a plan needs neither."""
    if not args.assistant_only_loss:
        return None
    try:
        tokenizer = load_tokenizer(recipe.model.path, template)
        rows = read_chat_rows(recipe.data.train, 1, recipe.data.format, recipe.data.skip_bad_rows)
    except MoeTuneError:
        return None
    return first_row(tokenizer, rows, masking(tokenizer))
