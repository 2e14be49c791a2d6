"""What the recorder needs to know about DDP, FSDP2 (DTensor) and compiled models."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module whose submodules and parameters carry the user's names, and its wrapper.

    Returns (module, kind), kind one of "eager", "ddp", "compiled".
    """
    kind = "eager"
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model, kind = model.module, "ddp"
        elif type(model).__name__ == "OptimizedModule":
            inner = model._orig_mod
            assert isinstance(inner, nn.Module)
            model, kind = inner, "compiled"
        else:
            return model, kind


def is_sharded(t: torch.Tensor) -> bool:
    """Whether t is a DTensor sharded over ranks (FSDP2), so its norm needs a reduction."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor, or t itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_array(values: np.ndarray, op: str) -> np.ndarray:
    """All-reduces a host float64 array over the default group: op "sum", "min" or "max"."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(_comm_device())
    dist.all_reduce(t, op=ops[op])
    return t.cpu().numpy()
