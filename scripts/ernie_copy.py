"""The shipped tiny Mixtral, written as an Ernie-4.5-MoE checkpoint that computes the same logits.

    python scripts/ernie_copy.py            # -> data/tiny-moe-ernie (a few seconds; not committed)

Why: ``router.bias_balance_rate`` (aux-loss-free balancing) moves a router's selection bias, and
a Mixtral checkpoint has no place for one. Ernie-4.5-MoE routes exactly as Mixtral does (softmax,
top-k, the chosen probabilities renormalised) except that it picks the top-k by probability plus
a per-expert bias (``moe_statics.e_score_correction_bias``), which is zero here. Its attention,
norms and experts are Mixtral's, with one difference: its rotary embedding pairs dimensions
(2i, 2i+1) where Mixtral's pairs (i, i + d/2), so each query and key head's rows are permuted to
match. The same weights in that family give the same model, which recipes/compare/regularizers.yaml
tunes with and without bias balancing. tests/test_bias_balance.py checks the logits.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def interleave_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * d, H) projection rows: per head, half-split order (i, i + d/2) -> pairs (2i, 2i+1)."""
    d = weight.shape[0] // heads
    order = torch.arange(d).reshape(2, d // 2).T.reshape(-1)  # new position 2i <- i, 2i+1 <- i + d/2
    return weight.reshape(heads, d, -1)[:, order].reshape(weight.shape)


def ernie_copy(source: Path, dest: Path) -> Path:
    mixtral = AutoModelForCausalLM.from_pretrained(source)
    c = mixtral.config
    config = Ernie4_5_MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=dict(c.rope_parameters), use_bias=False,
        moe_intermediate_size=c.intermediate_size, moe_k=c.num_experts_per_tok, moe_num_experts=c.num_local_experts,
        moe_num_shared_experts=0, moe_layer_start_index=0, moe_layer_end_index=c.num_hidden_layers - 1,
        moe_layer_interval=1, router_aux_loss_coef=c.router_aux_loss_coef,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    ernie = Ernie4_5_MoeForCausalLM(config)
    state = dict(mixtral.state_dict())
    for name, tensor in list(state.items()):
        if name.endswith("self_attn.q_proj.weight"):
            state[name] = interleave_rows(tensor, c.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            state[name] = interleave_rows(tensor, c.num_key_value_heads)
    own = ernie.state_dict()
    for name in own:
        if name.endswith("e_score_correction_bias"):
            state[name] = torch.zeros_like(own[name])
    ernie.load_state_dict(state, strict=True)
    ernie.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, dest / name)
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "data" / "tiny-moe")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "tiny-moe-ernie")
    args = parser.parse_args()
    print(f"written to {ernie_copy(args.source, args.out)}")
