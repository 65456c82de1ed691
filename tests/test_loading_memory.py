"""Loading returns its temporaries to the system (loading.returning_freed_memory).

glibc keeps freed blocks below its mmap threshold for reuse and raises the threshold whenever
a larger block is freed. Loading a bf16 checkpoint into fp32 frees a temporary per expert, so
after any earlier free of a few MB (the plan's bf16 matmul check does one) those temporaries
stayed resident: about as much again as the model's expert weights. Each load runs in a fresh
process, since the allocator's state is the process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

from moe_tune.model.loading import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None or not Path("/proc/self/status").is_file(),
                                reason="glibc's allocator on Linux")

LOAD = """
import json, sys, torch
from moe_tune.model.loading import load_model

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

import transformers.models.qwen3_moe.modeling_qwen3_moe  # its import is not loading
a = torch.randn(512, 1536)  # 3 MB allocated and freed, as the plan's bf16 check does first
del a
before = anon()
model, _ = load_model(sys.argv[1], "float32")
print(json.dumps({"grew": anon() - before, "weights": sum(p.numel() * 4 for p in model.parameters())}))
"""


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, root):
    """One Qwen3-MoE layer of 64 experts of 512 (1-2 MB each in fp32), saved in bf16 as
    published checkpoints are."""
    tokenizer = AutoTokenizer.from_pretrained(root / "data" / "tiny-moe")
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024,
                            moe_intermediate_size=512, num_hidden_layers=1, num_experts=64, num_experts_per_tok=8,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("bf16-moe")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_loading_keeps_no_more_than_the_weights(bf16_checkpoint):
    out = subprocess.run([sys.executable, "-c", LOAD, str(bf16_checkpoint)], capture_output=True, text=True,
                         check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # the fp32 weights, plus what torch and transformers keep (a few MB); the temporaries'
    # residue was about the expert weights again (1.9x in all) before
    assert found["grew"] < 1.25 * found["weights"], found
