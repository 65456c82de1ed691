"""The router terms of one batch of 8 rows that ``world`` ranks share, each rank's share in
``accumulation`` micro-batches. Under torch.distributed.run (tests/test_router_losses.py), rank 0
writes them to the file in argv[1]; ``router_terms(1, 1)`` is the one-process reference.

- ``micro``: every term with the default scope, one micro-batch per rank (the terms over every
  rank's tokens, as one process computes them on the whole batch);
- ``global``: the load-balancing term of the whole step with ``balance_scope: global_batch``."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from families import tiny_config
from moe_tune.model.arch import describe
from moe_tune.moe.router_losses import RouterRegularizer


def router_terms(rank: int, world: int, accumulation: int) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).train()
    arch = describe(model)
    micro_reg = RouterRegularizer(model, arch, aux=1.0, z=1.0, kl=1.0)  # its base: the routers as built
    with torch.no_grad():  # routers off the base, so that the KL term is not zero
        for layer in arch.layers:
            model.get_parameter(layer.router_weight).mul_(1.5)
    ids = torch.randint(3, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(1))
    mine = ids.chunk(world)[rank]  # this rank's share of the batch

    def terms(reg, rows):
        with reg, torch.no_grad():
            model(input_ids=rows)
        return reg.terms()

    micro = terms(micro_reg, mine)
    reg = RouterRegularizer(model, arch, aux=1.0, z=0.0, kl=0.0, balance_scope="global_batch")
    for rows in mine.chunk(accumulation):
        terms(reg, rows)
    return {"micro": {name: value.item() for name, value in micro.items()}, "global": reg.end_step()}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    result = router_terms(dist.get_rank(), dist.get_world_size(), int(sys.argv[2]))
    if dist.get_rank() == 0:
        torch.save(result, sys.argv[1])
    dist.destroy_process_group()
