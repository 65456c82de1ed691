"""Packing (``sft.packing``, ``sft.padding_free``): several rows in one sequence, each row
attending only to itself.

TRL's padding-free collator flattens a micro-batch into one sequence, (1, tokens), with
``position_ids`` restarting at every row and no attention mask. transformers builds a
block-diagonal causal mask from those restarts, but only where no 2D mask and no cache reach it
(``masking_utils._preprocess_mask_arguments``). So moe_tune:

- passes ``use_cache=False`` with every packed batch, and never a 2D mask;
- gives the families whose forward builds its masks without the ``position_ids`` (gpt-oss,
  AFMoE) the same masks built with them, through the mapping of masks their forward accepts;
- refuses families whose layers carry state along the sequence (Mamba, gated-delta and
  short-convolution layers: a causal ``Conv1d`` in every one of them), before loading;
- measures isolation on the loaded model before the first step (``check_isolation``): rows
  packed must score as the rows apart, or the run stops with one line.

The router terms and bias balancing count the rows' tokens only (``ROW_TOKENS``, made here and
read by the trainer), not the padding ``sft.pad_to_multiple_of`` adds.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import masking_utils
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import text_config
from moe_tune.plan.modes import unwrapped

ROW_TOKENS = "row_tokens"  # (1, tokens) 1 where a token belongs to a row, 0 on padding; popped before the model

# the masks a layer type needs, built by transformers' own functions
MASK_BUILDERS = {"full_attention": masking_utils.create_causal_mask,
                 "sliding_attention": masking_utils.create_sliding_window_causal_mask,
                 "chunked_attention": masking_utils.create_chunked_causal_mask}

PROBE_LENGTHS = (7, 5, 9, 6)  # rows of the isolation probe: short, of unequal lengths, 27 tokens in all
# largest difference between a packed row's logits and the row's alone, relative to the largest
# logit, that still counts as isolated: rows measured 1e-7..7e-7 apart in fp32 in every family that
# isolates, and 1.4e-3 or more in those that leak (docs/packing.md); 16-bit weights round to ~4e-3
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
HALF_TOLERANCE = 3e-2


def packs(args) -> bool:
    """Whether the run trains on flattened rows (the SFTConfig's packing or padding_free)."""
    return bool(args.packing or args.padding_free)


def check_packing_args(sft: dict, args: dict) -> None:
    """Refusals among the ``sft`` settings, and evaluation kept on whole rows: ``args`` (the
    SFTConfig's keyword arguments) gets ``eval_packing: false`` where the recipe leaves it unset."""
    if not (args.get("packing") or args.get("padding_free")):
        return
    if sft.get("eval_packing"):
        raise MoeTuneError("sft.eval_packing: evaluation runs on whole rows, padded, so that eval_loss is the same "
                           "number whether a run packs or not (runs are compared by it); leave sft.eval_packing unset")
    if args.get("packing") and "max_length" in args and args["max_length"] is None:  # TRL's default is 1024
        raise MoeTuneError("sft.max_length: packing fills sequences of sft.max_length tokens, and it is null; set it "
                           "(e.g. 1024), or drop sft.packing")
    if args.get("packing") and args.get("packing_strategy") == "wrapped":
        raise MoeTuneError("sft.packing_strategy: wrapped cuts rows at every block boundary, so a row's tail trains "
                           "without its prompt; use bfd (the default) or bfd_split")
    args["eval_packing"] = False


def check_packable(model: nn.Module, family: str) -> None:
    """Before loading (``model`` may be on the meta device): refuse families whose layers carry
    state from one position to the next. Their causal convolutions (Mamba, gated-delta,
    short-convolution layers) run across row boundaries; transformers keeps rows apart there only
    with the causal-conv1d kernels, on a GPU, which were not tested here."""
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv1d)]
    if convs:
        raise MoeTuneError(f"sft.packing: {family} has layers that carry state along the sequence ({convs[0]}: a "
                           "causal convolution), which would run from one packed row into the next; train without "
                           "sft.packing and sft.padding_free")



class RowTokens:
    """TRL's padding-free collator, plus ``ROW_TOKENS``: which tokens are the rows' (the padding
    ``pad_to_multiple_of`` adds is not).

    TRL flattens a micro-batch of packed sequences into one, (1, B x max_length), which the
    varlen kernels of flash attention want. Any other attention builds a dense (N, N) mask and
    attends over all of it: with ``sequences_apart`` each packed sequence stays a row of the
    batch, (B, longest), positions restarting within it and padding at its end (position 0:
    each pad token a sequence of its own, trained on by nothing)."""

    def __init__(self, collate, sequences_apart: bool = False):
        self.collate, self.sequences_apart = collate, sequences_apart

    def __call__(self, examples: list[dict]) -> dict:
        if self.sequences_apart and len(examples) > 1 and all("seq_lengths" in e for e in examples):
            return self._apart(examples)
        batch = self.collate(examples)
        rows = sum(len(example["input_ids"]) for example in examples)
        batch[ROW_TOKENS] = (torch.arange(batch["input_ids"].shape[1]) < rows).long().unsqueeze(0)  # (1, tokens)
        return batch

    def _apart(self, examples: list[dict]) -> dict:
        parts = [self(example_alone) for example_alone in ([e] for e in examples)]  # (1, n_i) each
        longest = max(part["input_ids"].shape[1] for part in parts)
        fill = {"input_ids": self.collate.pad_token_id, "labels": -100, "position_ids": 0, ROW_TOKENS: 0}
        return {key: torch.cat([nn.functional.pad(part[key], (0, longest - part[key].shape[1]), value=value)
                                for part in parts]) for key, value in fill.items()}  # (B, longest)


def packed_collators(collate, model: nn.Module) -> tuple[RowTokens, DataCollatorForLanguageModeling]:
    """A packed run's (training, evaluation) collators from TRL's padding-free ``collate``: the
    rows' tokens marked, sequences kept apart but under flash attention, whose varlen kernels
    want them flat; evaluation on whole rows, padded."""
    flash = "flash" in (model.config._attn_implementation or "")
    return (RowTokens(collate, sequences_apart=not flash),
            DataCollatorForLanguageModeling(pad_token_id=collate.pad_token_id,
                                            pad_to_multiple_of=collate.pad_to_multiple_of))


def model_inputs(inputs: dict) -> tuple[dict, torch.Tensor | None]:
    """(what the model is called with, the mask of the rows' tokens): a packed batch loses
    ``ROW_TOKENS`` and gets ``use_cache=False`` (a cache makes transformers drop the packed mask);
    a padded one keeps its attention mask, which is also its mask of tokens."""
    if ROW_TOKENS not in inputs:
        return inputs, inputs.get("attention_mask")
    inputs = dict(inputs)
    rows = inputs.pop(ROW_TOKENS)
    return {**inputs, "use_cache": False}, rows


class PackedMasks:
    """For a decoder whose forward builds its masks without ``position_ids`` but accepts them
    ready-made (a dict by layer type): the masks of a packed batch, built with the restarts."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.config = decoder.config
        self.handle = decoder.register_forward_pre_hook(self._masks, with_kwargs=True)

    @staticmethod
    def applies(decoder: nn.Module) -> bool:
        kinds = set(getattr(decoder.config, "layer_types", None) or ())
        return bool(kinds) and kinds <= set(MASK_BUILDERS)

    def _masks(self, module, args, kwargs):
        positions = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is not None or positions is None or kwargs.get("past_key_values") is not None:
            return None
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch, length = (embeds if embeds is not None else ids).shape[:2]
        dtype = embeds.dtype if embeds is not None else self.decoder.get_input_embeddings().weight.dtype
        shape = torch.empty((batch, length, 1), dtype=dtype, device=positions.device)  # read for its shape only
        kwargs["attention_mask"] = {kind: MASK_BUILDERS[kind](config=self.config, inputs_embeds=shape,
                                                              attention_mask=None, cache=None, position_ids=positions)
                                    for kind in set(self.config.layer_types)}
        return args, kwargs

    def remove(self) -> None:
        self.handle.remove()


def probe_lengths(config) -> tuple[int, ...]:
    """The probe's row lengths. A sparse-attention indexer (DSA) picks ``index_topk`` keys per
    token, so it can pick another row's keys only where a row has more than that many before
    it and its own: each row is that much longer."""
    topk = getattr(text_config(config), "index_topk", None) or 0
    return tuple(n + topk for n in PROBE_LENGTHS)


def _difference(model: nn.Module, collate, vocab: int) -> float:
    """Largest |packed - apart| over the probe rows' logits, relative to the largest logit."""
    generator = torch.Generator().manual_seed(0)  # the run's random state is left as it is
    lengths = probe_lengths(unwrapped(model).config)
    rows = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    device = next(model.parameters()).device
    # two packed sequences of two rows each, as the trainer's collator lays packed sequences out
    pairs = [{"input_ids": torch.cat(rows[i:i + 2]).tolist(), "seq_lengths": list(lengths[i:i + 2])} for i in (0, 2)]
    batch, tokens = model_inputs(collate(pairs))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**batch).logits[tokens.bool().to(device)].float()  # (the rows' tokens, V), in order
        apart = torch.cat([model(input_ids=r[None].to(device), use_cache=False).logits[0].float() for r in rows])
    return ((packed - apart).abs().max() / apart.abs().max()).item()


def check_isolation(model: nn.Module, collate, family: str) -> PackedMasks | None:
    """Rows packed by ``collate`` (the trainer's) must give each row's logits as the row alone
    does; where they do not and the family takes ready-made masks, with those; else one line.
    Returns the hook that builds the masks, where one was needed."""
    inner = unwrapped(model)
    vocab = inner.get_input_embeddings().weight.shape[0]
    dtype = next(p.dtype for p in inner.parameters() if p.is_floating_point())
    tolerance = TOLERANCE.get(dtype, HALF_TOLERANCE)
    training = model.training
    model.eval()
    masks = None
    try:
        difference = _probe(model, collate, vocab)
        if difference > tolerance and PackedMasks.applies(inner.get_decoder()):
            masks = PackedMasks(inner.get_decoder())
            difference = _probe(model, collate, vocab)
    finally:
        model.train(training)
    if difference > tolerance:
        if masks is not None:
            masks.remove()
        raise MoeTuneError(f"sft.packing: {family} lets packed rows see each other here (a row's logits packed differ "
                           f"from the row alone by {difference:.2g} of their scale; at most {tolerance:g} allowed); "
                           "train without sft.packing and sft.padding_free")
    return masks


def _probe(model, collate, vocab) -> float:
    try:
        return _difference(model, collate, vocab)
    except (ValueError, RuntimeError, TypeError) as e:  # transformers refusing to keep rows apart, e.g.
        raise MoeTuneError(f"sft.packing: the model cannot run packed rows apart here ({str(e).splitlines()[0]}); "
                           "train without sft.packing and sft.padding_free") from None

