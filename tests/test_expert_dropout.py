"""Expert dropout: on in training, absent (bit-identical) in eval, on several families."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_tune.model.arch import describe
from moe_tune.moe.expert_dropout import ExpertDropout, drop_selected

from families import tiny_config

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "gpt_oss", "granitemoe"]


def test_drop_selected_keeps_one_and_the_total():
    torch.manual_seed(0)
    weights = torch.rand(2000, 4)
    dropped = drop_selected(weights, 0.5)
    assert ((dropped > 0).sum(-1) >= 1).all()
    torch.testing.assert_close(dropped.sum(-1), weights.sum(-1))
    rate = (dropped == 0).float().mean().item()
    assert rate == pytest.approx(0.5 * 3 / 4, abs=0.03)  # the largest of the 4 is never dropped
    assert torch.equal(drop_selected(weights, 0.0), weights)


def outputs(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", [{"dropout": 0.5}, {"drop_expert_prob": 0.5}, {"dropout": 0.5, "shared_dropout": True}])
def test_active_in_training_absent_in_eval(family, kind):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    x = torch.randint(3, 100, (2, 12))
    model.eval()
    eval_before = outputs(model, x)
    model.train()
    torch.manual_seed(1)
    train_before = outputs(model, x)
    hooks = ExpertDropout(model, describe(model), **kind).attach()
    model.eval()
    assert torch.equal(outputs(model, x), eval_before)  # bit-identical in eval mode
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(outputs(model, x), train_before)
    hooks.detach()
    torch.manual_seed(1)
    assert torch.equal(outputs(model, x), train_before)
