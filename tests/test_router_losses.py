"""Router terms: each against a direct reference, gradients only where they belong, and the
plain TRL loss when every term is off; on several families (softmax and sigmoid routers,
shared experts, router bias)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_tune.model.arch import describe
from moe_tune.moe.router_losses import RouterRegularizer, load_balancing_loss, router_kl, z_loss

from families import tiny_config

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "gpt_oss", "granitemoe"]


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    topk = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 0]])
    # slot 1 picks experts 0,1,0,2 and slot 2 picks 1,0,1,0; P = column means of probs
    f = [[2 / 4, 1 / 4, 1 / 4], [2 / 4, 2 / 4, 0]]
    p = [sum(r[e] for r in probs.tolist()) / 4 for e in range(3)]
    expected = 3 * sum(f[s][e] * p[e] for s in range(2) for e in range(3))
    assert load_balancing_loss(probs, topk, 3).item() == pytest.approx(expected)


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = (math.log(math.e + math.e ** 2 + math.e ** 3) ** 2 + math.log(3) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_router_kl_by_hand():
    now, base = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    p = [math.e / (1 + math.e), 1 / (1 + math.e)]
    q = [1 / (1 + math.e), math.e / (1 + math.e)]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert router_kl(now, base, "softmax").item() == pytest.approx(expected, rel=1e-5)
    s, t = torch.sigmoid(base), torch.sigmoid(now)  # Bernoulli per expert, averaged over experts
    bern = (s * (s / t).log() + (1 - s) * ((1 - s) / (1 - t)).log()).mean()
    assert router_kl(now, base, "sigmoid").item() == pytest.approx(bern.item(), rel=1e-5)
    assert router_kl(base, base, "softmax").item() == pytest.approx(0.0, abs=1e-7)


def tiny(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_terms_match_the_routers_own_logits(family):
    model = tiny(family).eval()
    arch = describe(model)
    reg = RouterRegularizer(model, arch, aux=1.0, z=1.0, kl=1.0)
    seen = {}
    hooks = [model.get_submodule(layer.router).register_forward_hook(
        lambda m, a, out, b=layer.block: seen.__setitem__(b, out[0] if isinstance(out, tuple) else out))
        for layer in arch.layers]
    x = torch.randint(3, 100, (2, 10))
    with reg, torch.no_grad():
        model(input_ids=x)
        terms = reg.terms()
    for h in hooks:
        h.remove()
    z_ref = torch.stack([z_loss(seen[layer.block].reshape(-1, layer.num_experts)) for layer in arch.layers]).mean()
    assert terms["z_loss"].item() == pytest.approx(z_ref.item(), rel=1e-5)
    assert terms["router_kl"].item() == pytest.approx(0.0, abs=1e-6)  # nothing has moved yet
    assert terms["aux_loss"].item() > 0
    # global-batch balancing of a step of one micro-batch is the micro-batch's term, for every family
    model.train()
    scoped = RouterRegularizer(model, arch, aux=1.0, z=0.0, kl=0.0, balance_scope="global_batch")
    with scoped, torch.no_grad():
        model(input_ids=x)
    assert scoped.terms()["aux_loss"].item() == pytest.approx(terms["aux_loss"].item(), rel=1e-5)
    assert scoped.end_step() == pytest.approx(terms["aux_loss"].item(), rel=1e-5)
    model.eval()
    if all(layer.scoring == "softmax" for layer in arch.layers):
        # transformers#45120: P is the softmax of the router's own logits, taken once (a second
        # softmax, of the probabilities, flattens it)
        def aux(probs_of):
            values = []
            for layer in arch.layers:
                probs = probs_of(seen[layer.block].reshape(-1, layer.num_experts).float())
                values.append(load_balancing_loss(probs, probs.topk(layer.top_k, -1).indices, layer.num_experts))
            return torch.stack(values).mean().item()

        assert terms["aux_loss"].item() == pytest.approx(aux(lambda x: x.softmax(-1)), rel=1e-5)
        assert terms["aux_loss"].item() != pytest.approx(aux(lambda x: x.softmax(-1).softmax(-1)), rel=1e-3)


def test_padding_positions_are_left_out_of_the_terms():
    """Terms with an attention mask equal the terms of the unpadded positions alone, value and
    router gradient, and differ from counting the padding."""
    model = tiny("mixtral").eval()
    arch = describe(model)
    reg = RouterRegularizer(model, arch, aux=1.0, z=1.0, kl=1.0)
    with torch.no_grad():  # move the routers off the base, so that the KL term is not zero
        for layer in arch.layers:
            model.get_parameter(layer.router_weight).mul_(1.5)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # (2, 8), row 1 right-padded
    with reg, torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 8)))
    captured = dict(reg._inputs)  # router inputs per MoE block, (2, 8, H) or (16, H)
    routers = [model.get_parameter(layer.router_weight) for layer in arch.layers]

    def terms_and_grads(inputs, attention_mask):
        model.zero_grad()
        reg._inputs.update(inputs)
        terms = reg.terms(attention_mask)
        reg.weighted(terms).backward()
        return torch.stack(list(terms.values())), torch.cat([r.grad.flatten() for r in routers])

    keep = mask.reshape(-1).bool()  # (16,), 13 tokens kept
    kept = {b: h.reshape(-1, h.shape[-1])[keep] for b, h in captured.items()}  # (13, H)
    masked, unpadded, counted = (terms_and_grads(captured, mask), terms_and_grads(kept, None),
                                 terms_and_grads(captured, None))
    torch.testing.assert_close(masked[0], unpadded[0])
    torch.testing.assert_close(masked[1], unpadded[1])
    assert not torch.allclose(masked[0], counted[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_router_terms_send_gradients_to_the_router_and_what_feeds_it_only(family):
    model = tiny(family).train()
    arch = describe(model)
    with torch.no_grad():  # move the routers so that the KL term has a gradient too
        for layer in arch.layers:
            model.get_parameter(layer.router_weight).mul_(1.5)
    reg = RouterRegularizer(model, arch, aux=1.0, z=1.0, kl=1.0)
    with torch.no_grad():
        for layer in arch.layers:
            reg.base[layer.block] /= 1.5
    with reg:
        model(input_ids=torch.randint(3, 100, (2, 10)))
        reg.weighted(reg.terms()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    moved = lambda n: grads[n] is not None and grads[n].abs().sum() > 0  # noqa: E731
    assert all(moved(layer.router_weight) for layer in arch.layers)
    assert any(moved(n) for n in arch.params_in("attention"))  # attention feeds the routers
    # a layer's experts run after its router: the last layer's experts feed no router at all,
    # and neither does anything after the last MoE block
    last = arch.layers[-1]
    assert not any(moved(n) for n in last.expert_params + last.expert_other)
    assert not any(moved(n) for n in arch.params_in("lm_head"))


@pytest.mark.slow
def test_all_terms_off_gives_trls_plain_loss(tmp_path):
    from trl import SFTTrainer

    from moe_tune.model.loading import load_model
    from moe_tune.recipe import load_recipe
    from moe_tune.training.pipeline import attach_regularizers, plan_run
    from moe_tune.training.sft_trainer import TrainerParts, build_trainer, load_data, sft_config

    from conftest import ROOT, SHIPPED_MODEL

    overrides = [f"output_dir={tmp_path}", "sft.max_steps=3", "sft.logging_steps=1", "sft.eval_strategy=no",
                 "data.max_train_rows=96", "eval.files=[]", "router.aux_loss_coef=0"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    model, tokenizer = load_model(str(SHIPPED_MODEL))
    setup, arch = plan_run(recipe), describe(model)
    reg, _ = attach_regularizers(setup, model, arch)
    ours = build_trainer(recipe, setup.sft_args, model, tokenizer, arch, TrainerParts(regularizer=reg))
    ours.train()
    model, tokenizer = load_model(str(SHIPPED_MODEL))
    train, _ = load_data(recipe, tmp_path / "b")  # the same rows, as chat messages: TRL tokenizes them itself
    plain = SFTTrainer(model=model, args=sft_config(recipe, tmp_path / "b"), train_dataset=train,
                       processing_class=tokenizer)
    plain.train()
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(ours) == pytest.approx(losses(plain), rel=1e-6)
    assert "aux_loss" not in ours.state.log_history[0]


def test_router_terms_with_router_lora_are_refused(capsys):
    from moe_tune.cli import main

    from conftest import ROOT

    code = main(["plan", str(ROOT / "recipes" / "quickstart.yaml"), "trainable.preset=lora_experts",
                 "trainable.router=lora", "router.z_loss_coef=0.001"])
    assert code == 2 and "router: the router terms are computed from the router weight" in capsys.readouterr().err


def test_global_batch_balancing_counts_the_whole_step_over_accumulation_and_ranks(tmp_path):
    """2 ranks x 2 accumulation steps give the load-balancing term of 1 process with the whole
    batch; with the default scope, each term of 2 ranks equals 1 process's on the same batch
    (no world-size factor: transformers#48690)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from router_terms_ranks import router_terms

    script = ROOT / "tests" / "router_terms_ranks.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                    str(tmp_path / "2.pt"), "2"], check=True, env=env, capture_output=True)
    one, two = router_terms(0, 1, 1), torch.load(tmp_path / "2.pt")
    assert two["global"] == pytest.approx(one["global"], rel=1e-6)
    assert one["global"] == pytest.approx(one["micro"]["aux_loss"], rel=1e-6)  # one micro-batch: the same term
    assert one["micro"]["router_kl"] > 0
    for name, value in one["micro"].items():
        assert two["micro"][name] == pytest.approx(value, rel=1e-5), name


def test_global_batch_gradients_use_the_choices_counted_so_far_in_the_step():
    """In one process with 2 accumulation steps: the first micro-batch's term counts its own
    choices, the second's those of both; the logged step term is the whole batch's."""
    model = tiny("mixtral").train()
    arch = describe(model)
    ids = torch.randint(3, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    whole = RouterRegularizer(model, arch, aux=1.0, z=0.0, kl=0.0)
    with whole, torch.no_grad():
        model(input_ids=ids)
    expected = whole.terms()["aux_loss"].item()
    reg = RouterRegularizer(model, arch, aux=1.0, z=0.0, kl=0.0, balance_scope="global_batch")
    local = RouterRegularizer(model, arch, aux=1.0, z=0.0, kl=0.0)
    values = []
    for rows in ids.chunk(2):
        for r in (reg, local):
            with r, torch.no_grad():
                model(input_ids=rows)
        values.append((reg.terms()["aux_loss"].item(), local.terms()["aux_loss"].item()))
    assert values[0][0] == pytest.approx(values[0][1], rel=1e-6)  # nothing else counted yet
    assert values[1][0] != pytest.approx(values[1][1], rel=1e-3)  # the first micro-batch's choices count too
    assert reg.end_step() == pytest.approx(expected, rel=1e-6)
    assert reg.end_step() is None  # counting starts afresh

