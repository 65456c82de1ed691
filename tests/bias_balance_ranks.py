"""Run by tests/test_bias_balance.py under torch.distributed.run: each rank counts half of one
batch, then one balancing step; rank 0 writes the biases to the file in argv[1]."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from families import tiny_config
from moe_tune.model.arch import describe
from moe_tune.moe.bias_balance import BiasBalancer

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
balancer = BiasBalancer(model, describe(model), rate=0.01)
ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
rows = ids.chunk(world)[rank]  # this rank's share of the batch
with torch.no_grad():
    model(input_ids=rows)
balancer.take()
balancer.step()
if rank == 0:
    torch.save({b: t.detach().clone() for b, t in balancer.bias.items()}, sys.argv[1])
dist.destroy_process_group()
