"""Tiny configs for the Mixture-of-Experts causal-LM families of the installed transformers.

``tiny_config(model_type)`` gives a config that builds and runs a train step plus a short generate
in ~0.1 s on CPU (the first model of a process also pays ~2 s of one-off transformers imports):
hidden 64, 2 layers (3 where the family keeps its first layer dense, 4 blocks for nemotron_h),
4 heads, 4 routed experts (8 where grouped routing needs them), top-2 (zaya: top-1, all it allows),
shared experts where the family has them, vocab 128, 128 positions, pad/bos/eos = 0/1/2.
``FAMILIES`` lists every model type it is verified for; ``UNSUPPORTED`` names the MoE families left
out, and why. (gemma4_assistant is in the causal-LM mapping but forbids MoE, so it is not listed.)

How the list was made (transformers 5.24; ergo, kolibri1_1, minicpm5_moe and param2moe at 5.25; torch 2.13 CPU):
  1. For every model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, build the default config and
     keep those whose config (or nested text/ffn config) has an expert count (``num_local_experts``,
     ``num_experts``, ``n_routed_experts``, ``moe_num_experts``); cross-checked by grepping each
     ``modeling_*.py`` for ``*Experts``/``*Router``/``*Moe`` classes.
  2. For each, ``AutoModelForCausalLM.from_config(tiny_config(mt))`` in float32, a train-mode
     forward on a (2, 16) batch with ``labels`` and ``output_router_logits=True`` (where the config
     has it) plus ``.backward()``, then an eval-mode ``generate(max_new_tokens=3)`` on a left-padded
     batch of 2 with ``attention_mask`` and ``output_router_logits=False``. We also checked that at
     least one layer really holds an Experts module (and shared experts where the family has them)
     and that left padding leaves the padded row's logits unchanged.

How to extend: add ``"model_type": {overrides}`` to ``_OVERRIDES``. ``_BASE`` is applied first, but
only for keys the family's default config really has, so list just what is family-specific (extra
layers when the first layers are dense, attention-variant dims, layer-type lists). Composite
(vision+text) types name their text family as a string in ``text_config``. Beware: configs accept
unknown keyword arguments silently, so check that each override key appears in
``AutoConfig.for_model(mt).to_dict()``; and check that the model really builds an MoE layer (for
several families the first 2-3 layers are dense by default, which leaves no MoE at 2 layers).

Surprises found while verifying (upstream behaviour, not bugs in this file):
  * ``generate(..., output_router_logits=True)`` raises in the first cached decoding step (shape
    mismatch in ``load_balancing_loss_func``: the mask covers the whole sequence, the router logits
    only the new token) for every family that computes an aux loss (mixtral, qwen*, olmoe, gpt_oss,
    granitemoe*, phimoe, jetmoe, dbrx, ernie4_5_moe, minimax, jamba, mellum, minimax_m2, laguna,
    lara_mini, flex_olmo, flint, deepseek_v4, minimax_m3_vl_text, qwen4_exp*, doge); always pass
    ``output_router_logits=False`` to ``generate``.
  * With ``output_router_logits=True`` but no routed layer (e.g. flint at 2 layers: default
    ``mlp_only_layers=[0, 1]``; deepseek_v4 at <=3 layers: all ``hash_moe``), the forward raises
    IndexError on the empty router-logit tuple. beam at <=3 layers silently has no MoE at all.
  * Router logits come back but no ``aux_loss`` for deepseek_v2/v3/v32, glm4_moe*, llama4,
    hunyuan_v1_moe, exaone_moe, cohere2_moe, afmoe, solar_open, dots1, kimi_linear, lfm2_moe,
    bailing_hybrid, axk*, beam, glm_moe_dsa, hy_v*, kolibri1, longcat_flash, mimo_v2_flash,
    nemotron_h, sarvam_*, zaya, dots3_note*, kolibri1_1, minicpm5_moe, param2moe. aria_text,
    gemma4*, inkling*, ergo have no ``output_router_logits`` at all. jetmoe returns 2 router-logit
    tensors per layer (attention heads are experts too).
  * Left padding changes the padded row's logits for deepseek_v4 (max |diff| ~0.05-0.15: its
    compressed attention pools over pad positions; exact again when no compression happens).
  * Expert weights not stored as fused 3-D ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``:
    gpt_oss, llama4(_text), aria_text keep them transposed (``gate_up_proj [E, H, 2I]``,
    ``down_proj [E, I, H]``; gpt_oss also interleaves gate/up columns and has ``*_bias``);
    dbrx uses 2-D ``w1``/``v1``/``w2`` of shape [E*I, H]; jetmoe uses ``JetMoeParallelExperts.weight``
    (``input_linear [E, 2I, H]``, ``output_linear [E, H, I]``, plus per-head attention experts);
    nemotron_h has no gate (``up_proj [E, I, H]``, relu2); ergo has no gate either and is
    transposed (``up_proj [E, H, I]``, ``down_proj [E, I, H]``, relu2), with a per-expert RMSNorm
    after each expert (``post_expert_norm.weight [E, H]``); longcat_flash's ``gate_up_proj`` has
    E + zero_expert_num rows while ``down_proj`` has E; inkling_text's shared experts are 3-D
    ``gate_proj``/``up_proj``/``down_proj`` stacks.
  * Indexer weights of the sparse-attention families (deepseek_v32, glm_moe_dsa, hy_v4, axk2,
    dots3_note*, qwen4_exp*, deepseek_v4) get no gradient from the LM loss (nor does
    inkling2_loop_text's ``message_input.query``), so "every parameter has a grad" checks fail.
  * dbrx cannot build from a default ``attn_config``: the attention reads ``attn_config.rope_theta``
    (not a field) and ``clamp``s with ``clip_qkv=None``; both are set below.
  * Composite configs (qwen3_5_moe, llama4, gemma4, ...) have no top-level ``pad_token_id``
    (AttributeError); use ``config.get_text_config()``.
  * At the time of writing, ``moe_tune.model.arch.moe_shape`` reads top-k 1 for aria_text (``moe_topk``)
    and gemma4 (``top_k_experts``), and calls a default dense Doge (``is_moe=False``,
    ``num_experts=16384``) an MoE.
"""

from __future__ import annotations

from transformers import AutoConfig

# Applied to every family, but only for keys its default config has: families spell the same
# thing differently, and setting a name a family lacks would just add a dead attribute.
# Sizes are pairwise distinct (H=64, I=96, moe I=24) so a test can tell [E, 2I, H] from [E, H, 2I].
_BASE = {
    "vocab_size": 128,
    "max_position_embeddings": 128,
    "model_max_length": 128,  # kimi_linear / bailing_hybrid's name for max_position_embeddings
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    # Some families default to 0/None shared experts; one exercises the shared path everywhere.
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Multi-head latent attention (DeepSeek-style): k/v come from a low-rank latent, so kv heads must
# equal query heads, and head_dim is the rope part of the query/key head.
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16, "v_head_dim": 16, "head_dim": 8}

# Grouped routing needs >= 2 experts per group, so these families get 8 experts in 2 groups.
_GROUPED = {"n_routed_experts": 8, "n_group": 2, "topk_group": 1}

# Sparse-attention indexers (DSA-style), sized to pick a few of the 16 test tokens.
_INDEXER = {"index_topk": 8, "index_head_dim": 16, "index_n_heads": 2}

# Gated-DeltaNet linear attention (Qwen3-Next style hybrids).
_DELTANET = {"linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
             "linear_num_value_heads": 4}

_OVERRIDES: dict[str, dict] = {
    "mixtral": {},
    "qwen2_moe": {},
    "qwen3_moe": {},
    "olmoe": {},
    # 3 layers with first_k_dense_replace=1: layer 0 dense, layers 1-2 MoE, as in the real models.
    "deepseek_v2": {**_MLA, **_GROUPED, "num_hidden_layers": 3, "first_k_dense_replace": 1,
                    "topk_method": "group_limited_greedy"},
    "deepseek_v3": {**_MLA, **_GROUPED, "num_hidden_layers": 3, "first_k_dense_replace": 1},
    # Keep yarn rope (the family's own) but consistent with 128 positions; SWA on alternate layers.
    "gpt_oss": {"sliding_window": 8,
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 32,
                                    "rope_theta": 150000.0}},
    "granitemoe": {},
    "phimoe": {},
    # Mixture of attention heads: hidden = kv heads * kv_channels; query heads = kv heads * top-k.
    "jetmoe": {"num_key_value_heads": 4, "kv_channels": 16},
    # attn_config needs rope_theta and a numeric clip_qkv or the attention cannot build/run.
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"hidden_size": 64, "ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}},
    "glm4_moe": {"num_hidden_layers": 3, "first_k_dense_replace": 1},
    "ernie4_5_moe": {"num_hidden_layers": 3, "moe_layer_start_index": 1, "moe_layer_end_index": 2},
    # Every layer MoE; layer 1 is a NoPE full-attention layer, layer 0 chunked (chunk 8 < 16 tokens).
    "llama4_text": {"intermediate_size_mlp": 64, "interleave_moe_layer_step": 1, "no_rope_layer_interval": 2,
                    "attention_chunk_size": 8},
    "afmoe": {"num_hidden_layers": 3, "num_dense_layers": 1, "sliding_window": 8,
              "global_attn_every_n_layers": 2},
    "aria_text": {},
    "axk1": {**_MLA, **_GROUPED, "num_hidden_layers": 3},
    "axk2": {**_MLA, **_INDEXER, "num_hidden_layers": 3},
    "bailing_hybrid": {**_MLA, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_expert_group": 1,
                       "topk_group": 1, "linear_head_dim": 16, "linear_num_heads": 4, "layer_group_size": 2},
    # beam keeps its first 3 layers dense by default, which would leave no MoE layer.
    "beam": {"num_hidden_layers": 3, "mlp_layer_types": ["dense", "sparse", "sparse"], "num_experts": 8,
             "n_group": 2, "topk_group": 1, "sliding_window": 8},
    "cohere2_moe": {"sliding_window": 8},
    "deepseek_v32": {**_MLA, **_GROUPED, **_INDEXER, "num_hidden_layers": 3, "first_k_dense_replace": 1},
    # One hash-routed layer then two top-k layers; compression rates small enough to compress 16 tokens.
    "deepseek_v4": {"num_hidden_layers": 3, "mlp_layer_types": ["hash_moe", "moe", "moe"],
                    "layer_types": ["heavily_compressed_attention", "compressed_sparse_attention",
                                    "heavily_compressed_attention"],
                    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                    "q_lora_rank": 32, "qk_rope_head_dim": 8, "o_groups": 2, "o_lora_rank": 16,
                    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "sliding_window": 8},
    # Built but kept out of FAMILIES (see UNSUPPORTED); num_experts must be a square (product keys).
    "doge": {"is_moe": True, "num_experts": 16, "keep_window_size": 16},
    "dots1": {"num_hidden_layers": 3, "first_k_dense_replace": 1},
    # per_layer_config's defaults would give layer 2 the full-size 64 heads; SWA layers need
    # head_dim == qk_nope_head_dim + qk_rope_head_dim.
    "dots3_note_text": {**_MLA, **_INDEXER, "head_dim": 24, "num_hidden_layers": 3, "per_layer_config": {},
                        "sliding_window": 8, "shared_experts_intermediate_size": 32},
    # Layer 0 dense (its default width is 32768), layer 1 MoE with un-gated relu^2 experts.
    "ergo": {"first_dense_intermediate_size": 96, "sliding_window": 8,
             "layer_types": ["sliding_attention", "full_attention"]},
    "exaone_moe": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "sliding_window": 8},
    "flex_olmo": {},
    # flint's default mlp_only_layers=[0, 1] would leave 2 layers without MoE.
    "flint": {"num_hidden_layers": 3, "mlp_only_layers": [0], "sliding_window": 8},
    # MoE is off by default; per_layer_config's defaults would widen layers 5, 11, ...
    "gemma4_text": {"enable_moe_block": True, "per_layer_config": {}, "vocab_size_per_layer_input": 128,
                    "hidden_size_per_layer_input": 8, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "glm4_moe_lite": {**_MLA, "num_hidden_layers": 3},
    "glm_moe_dsa": {**_MLA, **_INDEXER, "num_hidden_layers": 3, "first_k_dense_replace": 1},
    "granitemoe_swa": {"sliding_window": 8},
    # Mamba2 layer runs through the pure-torch path (no mamba_ssm / causal_conv1d on CPU).
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 8, "mamba_d_head": 16,
                         "mamba_d_state": 16, "mamba_chunk_size": 16},
    "granitemoeshared": {},
    "hunyuan_v1_moe": {},
    "hy_v3": {"num_hidden_layers": 3},
    "hy_v4": {**_MLA, **_INDEXER, "num_hidden_layers": 3},
    "inkling_text": {"num_hidden_layers": 3, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                     "swa_head_dim": 16, "sliding_window_size": 8},
    # unpadded_vocab_size defaults to ~200k and indexes past the 128-row embedding.
    "inkling2_text": {"unpadded_vocab_size": 128, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                      "swa_head_dim": 16, "sliding_window_size": 8},
    "inkling2_loop_text": {"unpadded_vocab_size": 128, "swa_num_attention_heads": 4,
                           "swa_num_key_value_heads": 2, "swa_head_dim": 16, "sliding_window_size": 8},
    # Mamba layer 0 (dense, torch path), attention + MoE layer 1.
    "jamba": {"use_mamba_kernels": False, "mamba_dt_rank": 8, "mamba_d_state": 8, "attn_layer_period": 2,
              "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
    # Needs a full-attention layer: with only linear layers the cache has no sequence length.
    "kimi_linear": {**_MLA, "num_hidden_layers": 3,
                    "layer_types": ["linear_attention", "full_attention", "linear_attention"],
                    "linear_head_dim": 16, "linear_num_heads": 4},
    "kolibri1": {"sliding_window": 8},
    # One dense sliding layer, then an indexed (sparse-attention) MoE layer that is its own indexer.
    "kolibri1_1": {"sliding_window": 8, "layer_types": ["sliding_attention", "indexed_attention"],
                   "mlp_only_layers": [0], "mlp_only_intermediate_size": 96, "index_layers": [1],
                   "kv_source_layers": [0, 1], "index_num_heads": 2, "index_topk": 8, "index_pool_size": 16,
                   "index_compression": 4, "index_num_local_tokens": 4, "index_num_sink_tokens": 2},
    "laguna": {"num_hidden_layers": 3, "sliding_window": 8},
    "lara_mini": {**_DELTANET, "sliding_window": 8},
    # layer_types has no default: a short-conv layer around one attention layer.
    "lfm2_moe": {"num_hidden_layers": 3, "num_dense_layers": 1,
                 "layer_types": ["conv", "full_attention", "conv"]},
    # Two zero (identity) experts next to the 4 real ones, as the family does.
    "longcat_flash": {**_MLA, "num_layers": 2, "ffn_hidden_size": 96, "expert_ffn_hidden_size": 24,
                      "zero_expert_num": 2},
    "mellum": {"sliding_window": 8},
    "minicpm5_moe": {},
    "mimo_v2_flash": {"num_hidden_layers": 3, "v_head_dim": 16, "sliding_window": 8},
    # Lightning (linear) attention blocks of 16 tokens.
    "minimax": {"block_size": 16},
    "minimax_m2": {},
    "minimax_m3_vl_text": {"num_hidden_layers": 3, "dense_intermediate_size": 64, "rotary_dim": 8,
                           "index_n_heads": 2, "index_head_dim": 16, "index_block_size": 4,
                           "index_topk_blocks": 2},
    # MoE are separate blocks here, so 4 blocks cover mamba (torch path), MoE and attention.
    "nemotron_h": {"use_mamba_kernels": False, "layers_block_type": ["mamba", "moe", "attention", "moe"],
                   "ssm_state_size": 16, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 1,
                   "chunk_size": 16, "moe_shared_expert_intermediate_size": 32},
    "param2moe": {"num_hidden_layers": 3},
    "qwen3_5_moe_text": {**_DELTANET, "layer_types": ["linear_attention", "full_attention"]},
    "qwen3_next": {**_DELTANET, "layer_types": ["linear_attention", "full_attention"]},
    # An indexed (QSA) layer is needed for a sequence length in the cache; its fields are all-or-none.
    "qwen4_exp_text": {**_DELTANET, "layer_types": ["linear_attention", "indexed_attention"], "hc_lowrank": 8,
                       "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 8, "indexer_compress_ratio": 4},
    "sarvam_mla": {**_MLA, "num_hidden_layers": 3, "first_k_dense_replace": 1},
    "sarvam_moe": {"num_hidden_layers": 3, "first_k_dense_replace": 1},
    "solar_open": {},
    # The config validator allows top-1 only.
    "zaya": {"router_hidden_size": 16, "num_experts_per_tok": 1},
    # Composite (vision/audio + text) types: the text decoder comes from the named text family;
    # AutoModelForCausalLM builds only the text model for these configs.
    "dots3_note": {"text_config": "dots3_note_text", "vision_config": {"adapter_out_dim": 64},
                   "audio_config": {"adapter_out_dim": 64}},
    "gemma4": {"text_config": "gemma4_text"},
    "llama4": {"text_config": "llama4_text"},
    "qwen3_5_moe": {"text_config": "qwen3_5_moe_text"},
    "qwen4_exp": {"text_config": "qwen4_exp_text"},
}

UNSUPPORTED: dict[str, str] = {
    "doge": "exotic MoE: 'experts' are single-neuron nn.Embedding rows picked by product keys (no "
            "Experts module), MoE is off by default (is_moe=False), and its router reshapes logits "
            "across tokens and batch rows, so outputs depend on batch composition and left padding "
            "(padded-row logits differ by ~0.02-0.07); tiny_config('doge') still builds it",
}

FAMILIES: list[str] = [mt for mt in _OVERRIDES if mt not in UNSUPPORTED]


def tiny_config(model_type: str):
    """A tiny config of ``model_type`` (a key of ``_OVERRIDES``), ready for ``from_config``."""
    overrides = dict(_OVERRIDES[model_type])
    if isinstance(overrides.get("text_config"), str):
        overrides["text_config"] = tiny_config(overrides["text_config"]).to_dict()
    # to_dict() holds the real fields only, not attribute_map aliases: an alias such as
    # num_local_experts -> n_routed_experts would otherwise override the family's own value.
    fields = AutoConfig.for_model(model_type).to_dict()
    base = {k: v for k, v in _BASE.items() if k in fields}
    return AutoConfig.for_model(model_type, **{**base, **overrides})
