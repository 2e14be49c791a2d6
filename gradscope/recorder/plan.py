"""What a recorder watches in a model, decided once at attach: the recorded parameters and
their layout, the modules whose outputs are recorded, the blocks of the stream, and whether
statistics are merged over ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from gradscope.recorder import distributed, hooks
from gradscope.recorder.reduce import ParamLayout
from gradscope.recorder.stats import units


@dataclass(frozen=True)
class ModelPlan:
    params: list[tuple[str, nn.Parameter]]
    layout: ParamLayout
    sync: bool
    dtensors: bool  # FSDP2 parameters: statistics of each rank's local shard
    modules: list[tuple[str, nn.Module]]  # (label, module) whose outputs are recorded
    block_index: dict[str, float]  # each watched block's position in the stream
    channel_first: frozenset[str]  # modules whose 3-d outputs have units on dim 1 (units.py)
    frozen: dict[str, Any]  # the parameters not recorded for requires_grad=False (frozen_of)


def frozen_of(model: nn.Module) -> dict[str, Any]:
    """The model's frozen parameters (requires_grad=False) by name, with their positions in
    parameter order and the number of parameters: the diagnosis tells a frozen prefix (an
    embedding, a backbone) from a layer frozen between layers that train."""
    names = [unwrapped_name(n) for n, _ in model.named_parameters()]
    frozen = [i for i, (_, p) in enumerate(model.named_parameters()) if not p.requires_grad]
    return {"names": [names[i] for i in frozen], "positions": frozen, "of": len(names)}


def unwrapped_name(fqn: str) -> str:
    """A name without the `_orig_mod` of compiled submodules: blocks.0._orig_mod.fc1 is
    recorded as blocks.0.fc1, as in the eager model."""
    return ".".join(part for part in fqn.split(".") if part != "_orig_mod")


def plan_model(
    model: nn.Module,
    kind: str,
    include: hooks.Selector,
    exclude: hooks.Selector,
    sync: bool | None,
) -> ModelPlan:
    """The plan for `model` (unwrapped; `kind` is what wrapped it: eager, ddp, compiled)."""
    params = [
        (unwrapped_name(name), p)
        for name, p in model.named_parameters()
        if p.requires_grad
        and hooks.param_selected(include, exclude, name.rpartition(".")[0], model)
    ]
    sharded = np.array([distributed.is_sharded(p) for _, p in params], dtype=bool)
    merged = (
        sync
        if sync is not None
        else distributed.world_size() > 1 and (kind == "ddp" or bool(sharded.any()))
    )
    layout = ParamLayout(
        [name for name, _ in params],
        np.array([float(p.dim()) for _, p in params]),
        sharded & merged,
    )
    blocks = [unwrapped_name(b) for b in hooks.block_fqns(model)]
    modules = [
        (unwrapped_name(fqn) or type(module).__name__, module)
        for fqn, module in model.named_modules()
        if type(module).__name__ != "OptimizedModule"  # its _orig_mod is watched instead
        and hooks.watched(include, exclude, unwrapped_name(fqn), module, set(blocks))
    ]
    watched = {label for label, _ in modules}
    block_index = {b: float(i) for i, b in enumerate(x for x in blocks if x in watched)}
    return ModelPlan(
        params,
        layout,
        merged,
        any(distributed.local(p) is not p for _, p in params),
        modules,
        block_index,
        units.channel_first(modules),
        frozen_of(model),
    )
