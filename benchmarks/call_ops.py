"""The ATen ops one recorded call runs on the torch-op path (the path a GPU takes), per module
output and per output gradient, counted with a dispatch mode; views are left out (they launch
no kernel). tests/test_sync.py bounds them; benchmarks/overhead.py prints them.

    python benchmarks/call_ops.py
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradscope as gs
from gradscope.recorder.stats import backends, fused, native


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops run under it that are not views, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def torch_ops_counted() -> Iterator[dict[str, list[Counter[str]]]]:
    """The eager torch-op path forced (as GRADSCOPE_NATIVE=0 GRADSCOPE_FUSED=0 do), each
    TorchBackend call's ops counted: {"output": [...], "grad": [...]}, one Counter per call.
    (The fused statistics are one compiled call, which a dispatch mode cannot see into.)"""
    calls: dict[str, list[Counter[str]]] = {"output": [], "grad": []}
    patched = {"moments": "output", "grad": "grad"}
    originals = {name: getattr(backends.TorchBackend, name) for name in patched}
    takes, fused_devices = native.takes, fused.devices_from_env

    def counted(name: str) -> Any:
        def call(self: Any, *args: Any) -> None:
            with OpCounter() as counter:
                originals[name](self, *args)
            calls[patched[name]].append(counter.ops)

        return call

    native.takes = lambda t: False  # type: ignore[assignment]
    fused.devices_from_env = lambda: frozenset()
    for name in patched:
        setattr(backends.TorchBackend, name, counted(name))
    try:
        yield calls
    finally:
        native.takes = takes  # type: ignore[assignment]
        fused.devices_from_env = fused_devices
        for name, original in originals.items():
            setattr(backends.TorchBackend, name, original)


def ops_per_call(model: nn.Module, inputs: torch.Tensor, steps: int = 2) -> dict[str, int]:
    """The most ops any output call and any gradient call ran in `steps` recorded steps after
    the first (which makes the work buffers)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torch_ops_counted() as calls, gs.watch(model, optimizer=opt, every=1):
        for step in range(steps + 1):
            if step == 1:
                calls["output"].clear()
                calls["grad"].clear()
            opt.zero_grad(set_to_none=True)
            model(inputs).float().pow(2).mean().backward()
            opt.step()
    return {kind: max((sum(c.values()) for c in found), default=0) for kind, found in calls.items()}


def print_ops_per_call() -> str:
    """Prints (and returns) the ops a recorded call runs on the torch-op path, on the CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    counts = ops_per_call(model, torch.randn(32, 784))
    devices = fused.devices_from_env()
    where = "every device" if devices is None else ", ".join(sorted(devices)) or "no device"
    line = (
        f"torch-op path: {counts['output']} aten ops per module output (eager), "
        f"{counts['grad']} per output gradient (views left out; counted on the CPU); "
        f"fused into one compiled call per module output on {where} (GRADSCOPE_FUSED)"
    )
    print(line, flush=True)
    return line


if __name__ == "__main__":
    print_ops_per_call()
