"""Each of ``world`` ranks counts its share of one batch, then one balancing step. Under
torch.distributed.run (tests/test_bias_balance.py), rank 0 writes the biases to the file in
argv[1]; ``balanced_biases(0, 1)`` is the one-process reference."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from families import tiny_config
from moe_tune.model.arch import describe
from moe_tune.moe.bias_balance import BiasBalancer


def balanced_biases(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    balancer = BiasBalancer(model, describe(model), rate=0.01)
    ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids.chunk(world)[rank])  # this rank's share of the batch
    balancer.take()
    balancer.step()
    return {b: t.detach().clone() for b, t in balancer.bias.items()}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    biases = balanced_biases(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(biases, sys.argv[1])
    dist.destroy_process_group()
