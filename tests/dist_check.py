"""Run under torchrun (2 ranks, gloo): records a DDP and an FSDP2 step and, on rank 0, the
same step in one process on the global batch; writes the three frames for test_distributed."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradscope as gs
from gradscope.lab.models import build_model


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> gs.Recorder:  # type: ignore[no-untyped-def]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gs.watch(model, optimizer=opt, **kwargs) as rec:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return rec


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = build_model("preln", 3, width=16, activation="tanh")
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    if rank == 0:
        one_step(copy.deepcopy(base), x, y).to_frame().to_parquet(out / "single.parquet")

    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    rec = one_step(ddp, x[part], y[part])
    frame = rec.to_frame()
    if rank == 0:
        frame.to_parquet(out / "ddp.parquet")
    else:
        assert frame.empty, "only rank 0 keeps rows"

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    sharded = copy.deepcopy(base)
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    rec = one_step(sharded, x[part], y[part])
    if rank == 0:
        rec.to_frame().to_parquet(out / "fsdp.parquet")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # about one exit in 20 aborts in a static destructor ("terminate called without an active
    # exception") after DDP/FSDP on gloo, when everything has been written: skip them
    sys.stdout.flush()
    os._exit(0)
