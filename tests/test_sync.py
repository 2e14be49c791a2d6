"""A recorded step on the torch-op path (the path a GPU takes) never waits for the device: every
operation that would synchronize with one is counted while recorded steps run, and there is
none beyond the step's one non-blocking transfer. On a machine with CUDA the same steps run
under torch.cuda.set_sync_debug_mode("error")."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import gradscope as gs
from benchmarks.call_ops import ops_per_call
from gradscope.lab.models import build_model
from gradscope.recorder.stats import flat, fused, native, transfer

# Tensor methods and functions that read a device's values on the host (or whose result's size
# depends on them), and so wait for the device to catch up
SYNC_FUNCTIONS = {
    "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "is_nonzero",
    "cpu", "bincount", "repeat_interleave", "equal", "allclose",
}  # fmt: skip
SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "_unique2", "unique_dim",
    "equal", "bincount", "repeat_interleave", "item",
}  # fmt: skip


def _to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A blocking copy to the host: .to("cpu") / .copy_(into a CPU tensor) without
    non_blocking, from a tensor that is not on the CPU."""
    name = getattr(func, "__name__", "")
    if name not in ("to", "copy_") or not args or not isinstance(args[0], torch.Tensor):
        return False
    if kwargs.get("non_blocking"):
        return False
    if name == "copy_":
        src = args[1] if len(args) > 1 else kwargs.get("src")
        return isinstance(src, torch.Tensor) and not src.is_cpu and args[0].is_cpu
    target = [a for a in args[1:] if isinstance(a, str | torch.device)] + [kwargs.get("device")]
    return not args[0].is_cpu and any(
        t is not None and torch.device(t).type == "cpu" for t in target
    )


PACKAGE = str(Path(gs.__file__).parent)


def _from_gradscope() -> bool:
    """Whether gradscope's code is on the stack (the loop's own optimizer, e.g. Adam reading
    its step counters with .item() on the CPU, is not what is measured)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class SyncCounter(TorchFunctionMode):
    """Counts synchronizing calls at the Python level (item, tolist, numpy, bool(), ...):
    `seen` those made by gradscope, `loop` those of the training loop itself."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()
        self.loop: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNC_FUNCTIONS or _to_host(func, args, kwargs):
            (self.seen if _from_gradscope() else self.loop)[name] += 1
        return func(*args, **kwargs)


class SyncOpCounter(TorchDispatchMode):
    """Counts the ATen operations that read a value on the host (below the Python level:
    what C++ code of torch itself would call)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()
        self.loop: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            (self.seen if _from_gradscope() else self.loop)[name] += 1
        return func(*args, **(kwargs or {}))


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x.view(-1, 1, 28, 28))).flatten(1))


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10)),
    "deep_plain": lambda: build_model("plain", depth=30, width=16),
    "preln": lambda: build_model("preln", depth=2, width=16),
    "cnn": Conv,
}


def _steps(model: nn.Module, opt: torch.optim.Optimizer, device: str, steps: int) -> Any:
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 784, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(steps)
    ]
    return [(x.to(device), y.to(device)) for x, y in batches]


def _train(rec: Any, model: nn.Module, opt: torch.optim.Optimizer, batches: Any) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        rec.log_scalar("loss", loss)
        opt.step()


@pytest.fixture
def torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "takes", lambda t: False)


def _count_syncs(name: str, optimizer: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Four recorded steps; the syncs inside the last three counted (asserted: none). The
    recorder, and the parameter statistics it used."""
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    batches = _steps(model, opt, "cpu", 4)
    transfers = []
    start = transfer.StepTransfer.start

    def counted(self, parts):  # type: ignore[no-untyped-def]
        transfers.append(len(parts))
        return start(self, parts)

    monkeypatch.setattr(transfer.StepTransfer, "start", counted)
    with gs.watch(model, optimizer=opt, every=1) as rec:
        _train(rec, model, opt, batches[:1])  # the first step makes the buffers
        functions, ops = SyncCounter(), SyncOpCounter()
        with functions, ops:
            _train(rec, model, opt, batches[1:])
        param_stats = rec._params._stats
    assert dict(functions.seen) == {} and dict(ops.seen) == {}, (functions.seen, ops.seen)
    if optimizer == "adam":  # the detector sees the loop's own (Adam's step counters)
        assert ops.loop["_local_scalar_dense"] > 0
    assert len(transfers) == 4  # one transfer a step, started inside it
    frame = rec.to_frame()  # the values read after the steps
    assert set(frame.step) == {0, 1, 2, 3}
    assert {"activation", "activation_grad", "param_grad", "update"} <= set(frame.kind)
    return rec, param_stats


@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_recorded_steps_do_not_synchronize(name, optimizer, monkeypatch):
    _count_syncs(name, optimizer, monkeypatch)


@pytest.mark.usefixtures("torch_ops", "inductor_cpu")
@pytest.mark.parametrize("alone", [flat.ALONE, 100], ids=["flat", "mixed"])
def test_the_fused_statistics_do_not_synchronize(alone, monkeypatch):
    """The fused statistics (fused.py, what a GPU runs), op by op: under the counters'
    dispatch mode each fused function runs as written (not compiled), so each of its ops is
    seen. With the parameters through the flat buffers, and with the larger ones read alone
    (their gradients' versions watched around the update)."""
    monkeypatch.setenv("GRADSCOPE_FUSED", "1")
    monkeypatch.setattr(fused, "_FAILED", set())
    reads_alone = alone < flat.ALONE
    monkeypatch.setattr(flat, "ALONE", alone)
    rec, param_stats = _count_syncs("cnn", "sgd", monkeypatch)
    assert rec._capture.backends.torch._fused.devices is None and param_stats.fused
    assert bool(param_stats._alone) == reads_alone
    assert not fused._FAILED  # nothing fell back to the eager ops


@pytest.mark.usefixtures("torch_ops")
def test_a_grad_scaler_adds_no_synchronization():
    """With a GradScaler the step's scale is read on the device with the step's transfer (the
    scaler's own .item() on found-inf is the loop's, and counted apart)."""
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = _steps(model, opt, "cpu", 4)
    with gs.watch(model, optimizer=opt, every=1, grad_scaler=scaler) as rec:
        for i, (x, y) in enumerate(batches):
            functions, ops = SyncCounter(), SyncOpCounter()
            with functions, ops:
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            if i:  # the first step makes the buffers
                assert dict(functions.seen) == {} and dict(ops.seen) == {}, (i, functions.seen)
    assert ops.loop["_local_scalar_dense"] > 0  # the scaler's found-inf check, seen
    frame = rec.to_frame()
    grads = frame[(frame.kind == "activation_grad") & (frame.stat == "norm")]
    assert len(grads) and set(grads.step) == {0, 1, 2, 3}
    # unscaled: the same loop without a scaler records the same output-gradient norms
    torch.manual_seed(0)
    twin = MODELS["mlp"]()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    with gs.watch(twin, optimizer=twin_opt, every=1) as plain:
        _train(plain, twin, twin_opt, batches)
    ref = plain.to_frame()
    ref = ref[(ref.kind == "activation_grad") & (ref.stat == "norm")]
    assert np.allclose(grads.value.to_numpy(), ref.value.to_numpy(), rtol=1e-5)


def test_the_counters_see_what_they_look_for():
    """The detector itself: each kind of synchronizing call is counted."""
    x = torch.arange(4.0)
    functions, ops = SyncCounter(), SyncOpCounter()
    with functions, ops:
        x.sum().item()
        x.tolist()
        bool(x.sum())
        x.nonzero()
        x[x > 1]
    assert {"item", "tolist", "__bool__", "nonzero"} <= set(functions.loop)
    assert {"_local_scalar_dense", "nonzero"} <= set(ops.loop)
    assert not functions.seen and not ops.seen  # none of them made by gradscope


# ATen ops (kernels, views left out) one call runs on the torch-op path: a module output's sum,
# float64 norm, one fill of the work buffer, a per-unit count and its two reductions, a NaN
# fill and one reduction for both extremes; an output gradient's per-sample float64 norms
OPS_PER_OUTPUT, OPS_PER_GRAD = 8, 1


@pytest.mark.parametrize("name", list(MODELS))
def test_each_recorded_call_runs_few_ops(name):
    torch.manual_seed(0)
    counts = ops_per_call(MODELS[name](), torch.randn(8, 784))
    assert 0 < counts["output"] <= OPS_PER_OUTPUT, counts
    assert 0 < counts["grad"] <= OPS_PER_GRAD, counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(MODELS))
def test_recorded_steps_on_cuda_raise_no_sync_error(name):
    torch.manual_seed(0)
    model = MODELS[name]().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = _steps(model, opt, "cuda", 4)
    with gs.watch(model, optimizer=opt, every=1) as rec:
        _train(rec, model, opt, batches[:1])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _train(rec, model, opt, batches[1:])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    frame = rec.to_frame()
    assert set(frame.step) == {0, 1, 2, 3}


def test_a_device_without_events_gets_a_blocking_copy():
    """Where the device's backend records no events (the CPU stands in for one here), the
    step's copy to the host is made blocking: its values are there when read, never stale."""
    host = torch.zeros(3, dtype=torch.float64)
    source = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert transfer.copy_to_host(host, source) is None
    assert host.tolist() == [1.0, 2.0, 3.0]
