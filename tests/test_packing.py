"""moe_tune/training/packing.py: packed rows see only themselves; a packed batch's loss, gradients
and router terms are those of the same rows padded; families that leak are refused."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from moe_tune.errors import MoeTuneError
from moe_tune.model.arch import describe
from moe_tune.moe.bias_balance import BiasBalancer
from moe_tune.moe.router_losses import RouterRegularizer
from moe_tune.training.packing import RowTokens, check_isolation, check_packable, model_inputs

from conftest import ROOT, SHIPPED_MODEL
from families import FAMILIES, tiny_config

# the attention variants the families use: plain (mixtral), sliding window and sinks (gpt_oss),
# MLA (deepseek_v2, deepseek_v3), q/k norm (qwen3_moe, olmoe)
VARIANTS = ["mixtral", "gpt_oss", "deepseek_v2", "deepseek_v3", "qwen3_moe", "olmoe"]
LENGTHS = (11, 4, 17, 9, 6)

# measured (docs/packing.md): families whose layers carry state along the sequence (a causal Conv1d),
# refused before loading, and those whose rows still see each other once loaded, refused by the probe
RECURRENT = {"bailing_hybrid", "granitemoehybrid", "inkling_text", "inkling2_text", "inkling2_loop_text", "jamba",
             "kimi_linear", "lara_mini", "lfm2_moe", "nemotron_h", "qwen3_5_moe_text", "qwen3_next",
             "qwen4_exp_text", "zaya", "qwen3_5_moe", "qwen4_exp"}
# lightning attention, compressed attention, and sparse attention whose indexer picks keys in other rows
LEAKING = {"minimax", "deepseek_v4", "axk2", "deepseek_v32", "dots3_note", "dots3_note_text", "glm_moe_dsa", "hy_v4"}


def tiny(family, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    for p in model.parameters():  # beyond init scale, so that every term and gradient is far from zero
        p.data.normal_(0, 0.05)
    return model.train()


def rows(vocab, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths]


def collators(pad_to=None, apart=False):
    """(padded, packed) as TRL's SFTTrainer makes them (the packed one wrapped as moe_tune's trainer wraps it)."""
    return (DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=pad_to),
            RowTokens(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=pad_to),
                      sequences_apart=apart))


def packed_sequences(examples, cut=3):
    """The rows as two packed sequences, as TRL's packing makes them (with their lengths)."""
    return [{"input_ids": sum((e["input_ids"] for e in part), []), "seq_lengths": [len(e["input_ids"]) for e in part]}
            for part in (examples[:cut], examples[cut:])]


def loss_terms_grads(model, reg, batch):
    """The trainer's loss on ``batch`` (cross-entropy plus the weighted router terms), the terms, and every gradient."""
    model.zero_grad()
    inputs, tokens = model_inputs(batch)
    with reg:
        out = model(**inputs)
    terms = reg.terms(tokens)
    loss = out.loss + reg.weighted(terms)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, grads


@pytest.mark.parametrize("apart", [False, True], ids=["flattened", "sequences_apart"])
@pytest.mark.parametrize("family", VARIANTS)
def test_a_packed_batch_trains_as_the_same_rows_padded(family, apart):
    """Flattened into one row (TRL's layout, for flash attention's varlen kernels) or each packed
    sequence a row of its own (moe_tune's, for every other attention)."""
    model = tiny(family)
    arch = describe(model)
    padded, packed = collators(apart=apart)
    check_isolation(model, packed, family)  # gpt_oss: its masks built from the restarting positions
    reg = RouterRegularizer(model, arch, aux=0.5, z=0.1, kl=1.0)
    with torch.no_grad():  # routers off the base, so that the KL term is not zero
        for layer in arch.layers:
            model.get_parameter(layer.router_weight).mul_(1.5)
    examples = rows(model.config.get_text_config().vocab_size)
    a = loss_terms_grads(model, reg, padded(examples))
    batch = packed(packed_sequences(examples))
    assert batch["input_ids"].shape[0] == (2 if apart else 1)
    b = loss_terms_grads(model, reg, batch)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
    assert set(a[1]) == {"aux_loss", "z_loss", "router_kl"} and a[1]["router_kl"] > 0
    for name in a[1]:
        torch.testing.assert_close(b[1][name], a[1][name], rtol=1e-5, atol=1e-7, msg=name)
    assert set(b[2]) == set(a[2])
    scale = max(g.abs().max() for g in a[2].values())
    for name, grad in a[2].items():  # every parameter's gradient, within 1e-5 of the largest
        torch.testing.assert_close(b[2][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_padding_after_packed_rows_is_left_out_of_the_router_terms():
    """sft.pad_to_multiple_of pads the flattened rows at the end: the terms and the bias
    balancer's counts are those of the rows alone."""
    model = tiny("deepseek_v3").eval()
    arch = describe(model)
    reg = RouterRegularizer(model, arch, aux=1.0, z=1.0, kl=0.0)
    examples = rows(model.config.vocab_size)
    (padded, _), (_, packed) = collators(), collators(pad_to=64)
    batch = packed(examples)
    assert batch["input_ids"].shape[1] == 64 > sum(LENGTHS)
    results = []
    for b in (padded(examples), batch):
        balancer = BiasBalancer(model, arch, rate=1e-3)
        inputs, tokens = model_inputs(b)
        with reg, torch.no_grad():
            model(**inputs)
        balancer.take(tokens)
        results.append((reg.terms(tokens), torch.stack(list(balancer.counts.values()))))
    (terms_a, counts_a), (terms_b, counts_b) = results
    assert counts_a.sum() == counts_b.sum() == sum(LENGTHS) * arch.layers[0].top_k * len(arch.layers)
    torch.testing.assert_close(counts_b, counts_a)
    for name in terms_a:
        torch.testing.assert_close(terms_b[name], terms_a[name], rtol=1e-5, atol=1e-7)


def test_packed_rows_are_kept_apart_only_without_a_cache():
    """The shipped model on 8 training rows: packed as the trainer runs them (no cache, no 2D
    mask), every row scores as it does alone; with the cache on, transformers drops the packed
    mask and the rows see each other (what once made moe_tune refuse packing)."""
    from moe_tune.model import templates
    from moe_tune.model.loading import load_model

    model, tokenizer = load_model(str(SHIPPED_MODEL))
    model.eval()
    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()[:8]
    how = templates.masking(tokenizer)
    encoded = [templates.tokenize_row(tokenizer, json.loads(line)["messages"], how) for line in lines]
    labelled = [{"input_ids": ids, "labels": [i if m else -100 for i, m in zip(ids, mask)]} for ids, mask in encoded]
    padded, packed = collators()
    with torch.no_grad():
        apart = model(**padded(labelled)).loss
        batch, _ = model_inputs(packed(labelled))
        assert batch["use_cache"] is False and "attention_mask" not in batch
        kept_apart = model(**batch).loss
        cached = model(**{**batch, "use_cache": True}).loss
    assert kept_apart.item() == pytest.approx(apart.item(), rel=1e-5)
    assert abs(cached.item() - apart.item()) > 0.1 * apart.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_families_that_leak_across_packed_rows_are_refused(family):
    """Every family either keeps packed rows apart (measured) or is refused in one line: before
    loading where its layers carry state along the sequence, or by the probe once loaded."""
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config(family))
    if family in RECURRENT:
        with pytest.raises(MoeTuneError, match=f"sft.packing: {family} has layers that carry state"):
            check_packable(meta, family)
        return
    check_packable(meta, family)
    model = tiny(family).eval()
    _, packed = collators()
    if family in LEAKING:
        with pytest.raises(MoeTuneError, match=f"sft.packing: {family} lets packed rows see each other"):
            check_isolation(model, packed, family)
        return
    masks = check_isolation(model, packed, family)  # measured packed against apart: within 1e-4, or it raises
    assert (masks is not None) == (family in {"gpt_oss", "afmoe"})  # their forward builds masks without positions


def test_the_mask_preview_shows_the_row_boundaries():
    from moe_tune.model import templates
    from moe_tune.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(SHIPPED_MODEL))
    rows = [json.loads(line) for line in (ROOT / "data" / "train.jsonl").read_text().splitlines()[:64]]
    how = templates.masking(tokenizer)
    text = templates.packing_preview(tokenizer, rows, how, 128)
    head, body = text.split("\n", 1)
    lengths = [int(n) for n in head.split("(")[1].split(" of ")[0].split("+")]
    assert sum(lengths) <= 128 and len(lengths) > templates.PREVIEW_SHOWN
    assert body.count("‖") == templates.PREVIEW_SHOWN + 1 and body.count("<|bos|>") == templates.PREVIEW_SHOWN
    assert f"({len(lengths) - templates.PREVIEW_SHOWN} rows more)" in body


def test_a_packed_run_trains_on_packed_rows_and_evaluates_on_whole_rows(tmp_path):
    """moe-tune train's own trainer with sft.packing: its training batches are packed sequences
    of sft.max_length tokens (their row tokens marked), its evaluation batches the padded rows
    an unpacked run evaluates, to the same eval_loss and router terms."""
    from moe_tune.model.loading import load_model
    from moe_tune.recipe import load_recipe
    from moe_tune.training.packing import ROW_TOKENS
    from moe_tune.training.pipeline import plan_run, trainer_for

    def trainer(name, *overrides):
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
            f"output_dir={tmp_path / name}", "sft.max_steps=2", "data.max_train_rows=256", "eval.files=[]",
            "sft.per_device_train_batch_size=4", "router.z_loss_coef=0.01", *overrides])
        return trainer_for(plan_run(recipe), *load_model(recipe.model.path))[0]

    packed, padded = trainer("packed", "sft.packing=true"), trainer("padded")
    batch = next(iter(packed.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 128  # each sequence its own row (sdpa)
    assert batch[ROW_TOKENS].float().mean() > 0.9  # packed full, bar the end of a shorter sequence
    assert int(((batch["position_ids"] == 0) & batch[ROW_TOKENS].bool()).sum()) > 4  # more rows than sequences
    a, b = padded.evaluate(), packed.evaluate()
    for key in ("eval_loss", "eval_ce_loss", "eval_aux_loss", "eval_z_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    packed.train()
    logged = [h for h in packed.state.log_history if "loss" in h]
    assert logged and all(h["loss"] == pytest.approx(h["ce_loss"] + h["router_loss"], rel=1e-4) for h in logged)
    # TRL counts a flattened row's positions; the 4 rows of each step count (what --resume goes on from)
    assert logged[-1]["num_tokens"] > 3 * 2 * 128
