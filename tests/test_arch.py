"""The architecture layer reads experts and top-k whatever the family calls them."""

import pytest
from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

from moe_tune.model.arch import moe_shape, require_moe
from moe_tune.errors import MoeTuneError


@pytest.mark.parametrize("config, experts, top_k", [
    (MixtralConfig(num_local_experts=8, num_experts_per_tok=2), 8, 2),
    (Qwen3MoeConfig(num_experts=128, num_experts_per_tok=8), 128, 8),
    (OlmoeConfig(num_experts=64, num_experts_per_tok=8), 64, 8),
    (DeepseekV3Config(n_routed_experts=256, num_experts_per_tok=8), 256, 8),
])
def test_moe_shape_across_families(config, experts, top_k):
    shape = moe_shape(config)
    assert (shape.num_experts, shape.top_k) == (experts, top_k)
    assert require_moe(config, "x") == shape


def test_dense_model_is_refused():
    assert moe_shape(LlamaConfig()) is None
    with pytest.raises(MoeTuneError, match="some/path: model type 'llama' is not a Mixture-of-Experts"):
        require_moe(LlamaConfig(), "some/path")
