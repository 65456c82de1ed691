"""moe_tune/moe/bias_balance.py: aux-loss-free load balancing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, tiny_checkpoint
from families import tiny_config
from moe_tune.model.arch import describe
from moe_tune.moe.bias_balance import BiasBalancer
from moe_tune.evaluation.routing_stats import imbalance


def _unbalanced(family: str = "deepseek_v3"):
    """A tiny model whose routers favour experts 0 and 1 for every token: their router rows
    lean on the direction every router input shares."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).train()
    arch = describe(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in arch.layers:
            params[layer.router_weight][:2] += 0.5  # (E, H): rows 0, 1 larger along the all-ones direction
    return model, arch


def _batch(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _load(balancer: BiasBalancer) -> torch.Tensor:
    return torch.stack([c / c.sum() for c in balancer.counts.values()])  # (layers, E)


def test_balancing_evens_out_a_deliberately_unbalanced_router():
    model, arch = _unbalanced()
    balancer = BiasBalancer(model, arch, rate=1e-3)
    cvs = []
    for step in range(300):
        with torch.no_grad():
            model(**_batch(model, step % 20))
        balancer.take()
        cvs.append(float(sum(imbalance(load)["cv"] for load in _load(balancer)) / len(arch.layers)))
        balancer.step()
    first, last = sum(cvs[:10]) / 10, sum(cvs[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert balancer.bias_abs_max() > 0
    # the favoured experts were pushed down, in every layer
    assert all(bias[:2].max() < bias[2:].min() for bias in balancer.bias.values())


def test_the_loss_gradient_is_untouched_and_the_bias_gets_none():
    grads = []
    for balanced in (False, True):
        model, arch = _unbalanced()
        balancer = BiasBalancer(model, arch, rate=1e-2) if balanced else None
        batch = _batch(model, 0)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if balancer:
            balancer.take(batch["attention_mask"])
            assert all(not b.requires_grad and b.grad is None for b in balancer.bias.values())
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_a_run_balances_logs_and_saves_the_bias(tmp_path):
    from moe_tune.cli import main
    from safetensors.torch import load_file

    model_dir = tiny_checkpoint("deepseek_v3", tmp_path / "model")
    run = tmp_path / "run"
    code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), f"model.path={model_dir}", f"output_dir={run}",
                 "router.bias_balance_rate=0.01", "sft.max_steps=4", "sft.logging_steps=2", "sft.save_strategy=steps",
                 "sft.save_steps=2", "sft.eval_strategy=no", "data.max_train_rows=64", "eval.files=[]",
                 "eval.retention_file=null", "eval.compare_base=false"])
    assert code == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    bias_max = {m["step"]: m["routing/bias_abs_max"] for m in logged if "routing/bias_abs_max" in m}
    assert sorted(bias_max) == [2, 4] and 0 < bias_max[4] <= 0.04 + 1e-6
    saved = load_file(run / "model" / "model.safetensors")
    biases = {k: v for k, v in saved.items() if k.endswith("e_score_correction_bias")}
    assert len(biases) == 2  # the two MoE layers
    assert max(float(v.abs().max()) for v in biases.values()) == pytest.approx(bias_max[4])
    # steps of 0.01 each: every bias is a whole number of steps
    assert all(torch.allclose(v * 100, (v * 100).round(), atol=1e-4) for v in biases.values())
    # the checkpoint --resume continues from holds the bias of its step
    ckpt = load_file(run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert max(float(ckpt[k].abs().max()) for k in biases) == pytest.approx(bias_max[2])


@pytest.mark.parametrize("overrides, expected", [
    (["router.bias_balance_rate=-0.1"], "router.bias_balance_rate"),
    (["router.bias_balance_rate=0.001"], "mixtral routers have no selection"),
    (["router.bias_balance_rate=0.001", "trainable.router=lora"], "the router is LoRA-adapted"),
])
def test_bias_balancing_refusals(overrides, expected, tmp_path, capsys):
    from moe_tune.cli import main

    code = main(["plan", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path / 'r'}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_every_family_with_a_selection_bias_balances_and_the_others_are_refused():
    from families import FAMILIES

    from moe_tune.moe.bias_balance import check_bias_balance
    from moe_tune.errors import MoeTuneError
    from moe_tune.recipe import RouterSection
    from moe_tune.moe.routing import router_bias

    section = RouterSection(bias_balance_rate=0.1)
    modes = {"router": "train"}
    has, lacks = [], []
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family)).train()
        try:
            arch = describe(model)
        except MoeTuneError:  # not detected at this size (tests/test_families.py)
            continue
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        if router_bias(tensors, arch.layers[0], correction=True) is None:
            lacks.append(family)
            with pytest.raises(MoeTuneError, match="no selection"):
                check_bias_balance(section, arch, modes, False, tensors)
            continue
        has.append(family)
        check_bias_balance(section, arch, modes, False, tensors)
        balancer = BiasBalancer(model, arch, rate=0.1)
        with torch.no_grad():
            model(**_batch(model, 0))
        balancer.take()
        assert all(c.sum() > 0 for c in balancer.counts.values()), family  # every MoE layer counted
        balancer.step()
        assert balancer.bias_abs_max() == pytest.approx(0.1), family
    assert {"deepseek_v3", "glm4_moe", "ernie4_5_moe"} <= set(has) and {"mixtral", "qwen3_moe", "gpt_oss"} <= set(lacks)


def test_the_ernie_copy_of_the_shipped_model_has_its_logits_and_a_bias_to_balance(ernie_copy):
    """scripts/ernie_copy.py: the regularizers spec's bias_balance variant trains this copy."""
    from moe_tune.model.loading import load_model
    from moe_tune.moe.routing import router_bias

    shipped, tokenizer = load_model(str(ROOT / "data" / "tiny-moe"))
    copy, _ = load_model(str(ernie_copy))
    enc = tokenizer(["The capital of Velm is", "Q: what is 3 plus 4? A:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = shipped.eval()(**enc).logits, copy.eval()(**enc).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)  # rotary pairs computed in another order
    arch = describe(copy)
    tensors = dict(copy.named_parameters()) | dict(copy.named_buffers())
    assert arch.family == "ernie4_5_moe" and all(router_bias(tensors, layer, correction=True) is not None
                                                  for layer in arch.layers)
    balancer = BiasBalancer(copy.train(), arch, rate=1e-3)  # its bias is a (1, E) parameter
    with torch.no_grad():
        copy(**enc)
    balancer.take(enc["attention_mask"])
    balancer.step()
    assert balancer.bias_abs_max() == pytest.approx(1e-3)
    assert all(not b.requires_grad for b in balancer.bias.values())


@pytest.mark.slow
def test_ranks_balance_by_the_load_of_the_whole_batch(tmp_path):
    """Two processes, each with half of a batch, move the bias as one process with all of it."""
    import os
    import subprocess
    import sys

    from bias_balance_ranks import balanced_biases

    script = ROOT / "tests" / "bias_balance_ranks.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                    str(tmp_path / "2.pt")], check=True, env=env, capture_output=True)
    one, two = balanced_biases(0, 1), torch.load(tmp_path / "2.pt")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[b], two[b]) for b in one)
    assert any(bias.abs().max() > 0 for bias in one.values())
