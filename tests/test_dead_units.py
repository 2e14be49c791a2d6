"""Dead units per unit: the recorded count against the count computed directly in torch from
the module's own output, on every path (C kernels, torch ops, compiled graphs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.recorder.stats.units import channel_first, unit_axis


def _direct(x: torch.Tensor, dim: int | None) -> tuple[float, float]:
    """(dead units, units): units along `dim` that are 0 at every other index."""
    if dim is None:
        return float(bool((x == 0).all())), 1.0
    moved = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    return float((moved == 0).all(dim=1).sum()), float(x.shape[dim])


class Mixed(nn.Module):
    """Linear features (2-d and 3-d), conv channels (2-d and 1-d) and a ReLU after each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv1d = nn.Conv1d(6, 5, 3, padding=1)
        self.act1d = nn.ReLU()
        self.seq = nn.Linear(16, 7)
        self.act_seq = nn.ReLU()
        self.fc = nn.Linear(7 * 5, 9)
        self.act_fc = nn.ReLU()
        self.head = nn.Linear(9, 3)
        with torch.no_grad():  # units dead for every input: negative bias, zero weights
            for layer, units in ((self.conv1d, [0, 3]), (self.seq, [2]), (self.fc, [1, 4, 8])):
                layer.weight[units] = 0.0
                layer.bias[units] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act(self.bn(self.conv(x))))  # (N, 6, 4, 4)
        h = self.act1d(self.conv1d(h.flatten(2)))  # (N, 5, 16): channels on dim 1
        h = self.act_seq(self.seq(h))  # (N, 5, 7): features on the last dim
        h = self.act_fc(self.fc(h.flatten(1)))
        return self.head(h)


# the unit dim of each module's output, written out by hand
DIMS = {
    "conv": 1, "bn": 1, "act": 1, "pool": 1, "conv1d": 1, "act1d": 1,
    "seq": 2, "act_seq": 2, "fc": 1, "act_fc": 1, "head": 1,
}  # fmt: skip


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.detach()))
        for name, m in model.named_children()
    ]
    model(x)
    for h in handles:
        h.remove()
    return seen


def _recorded(frame, layer: str, step: int = 0) -> tuple[float, float]:
    rows = frame[(frame.layer == layer) & (frame.step == step) & (frame.kind == "activation")]
    values = rows.set_index("stat")["value"]
    return float(values["dead_units"]), float(values["units"])


def test_the_unit_axis_rule():
    model = Mixed()
    first = channel_first(list(model.named_children()))
    assert first == {"conv", "bn", "act", "pool", "conv1d", "act1d"}
    shapes = {name: out.shape for name, out in _outputs(model, torch.randn(4, 2, 8, 8)).items()}
    for name, dim in DIMS.items():
        assert unit_axis(len(shapes[name]), name in first) == dim, name
    assert unit_axis(1, False) is None and unit_axis(4, False) == 1
    # a block takes its last leaf's layout
    block = nn.Sequential(nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU()), nn.Linear(2, 2))
    assert channel_first(list(block.named_modules())[1:]) == {"0", "0.0", "0.1"}


@pytest.mark.usefixtures("stats_path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dead_units_match_a_direct_count(dtype):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    x = torch.randn(8, 2, 8, 8, dtype=dtype)
    outputs = _outputs(model, x)
    with gs.watch(model) as rec:
        model(x).sum().backward()
        rec.step()
    frame = rec.to_frame()
    dead_somewhere = 0.0
    for name, dim in DIMS.items():
        expected = _direct(outputs[name], dim)
        assert _recorded(frame, name) == expected, name
        dead_somewhere += expected[0]
    assert _recorded(frame, "act1d")[0] >= 2 and _recorded(frame, "act_fc")[0] >= 3
    assert dead_somewhere >= 6  # the test sees dead units, not only zeros


@pytest.mark.usefixtures("stats_path")
def test_edge_cases_nan_one_unit_and_rows_past_the_early_stop():
    class Pass(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 1.0

    model = nn.Sequential(Pass())
    x = torch.zeros(40, 6)
    x[37, 1] = 1.0  # seen only after the C kernel's first check of every unit
    x[3, 2] = float("nan")  # NaN is not zero: the unit is alive
    with gs.watch(model) as rec:
        model(x)
        rec.step()
        model(torch.zeros(5))  # one-dimensional: one unit
        rec.step()
        model(torch.zeros(0, 3))  # empty: no units
        rec.step()
    frame = rec.to_frame()
    assert _recorded(frame, "0", 0) == (4.0, 6.0)
    assert _recorded(frame, "0", 1) == (1.0, 1.0)
    assert _recorded(frame, "0", 2) == (0.0, 0.0)


@pytest.mark.usefixtures("stats_path")
def test_micro_batches_merge_by_the_smallest_count():
    """A unit is dead over a step only if dead in each micro-batch: with nested dead sets
    the merged count is exact (the intersection); here {0, 1, 2} then {1, 2}."""
    model = nn.Sequential(nn.Identity())
    a, b = torch.ones(4, 5), torch.ones(3, 5)
    a[:, :3] = 0.0
    b[:, 1:3] = 0.0
    with gs.watch(model) as rec:
        model(a.requires_grad_())
        model(b.requires_grad_())
        rec.step()
    intersection = float(((a == 0).all(0) & (b == 0).all(0)).sum())
    assert _recorded(rec.to_frame(), "0") == (intersection, 5.0) == (2.0, 5.0)


@pytest.mark.usefixtures("stats_path")
def test_compiled_graphs_count_dead_units_as_eager():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(8, 2, 8, 8)
    outputs = _outputs(model, x)
    compiled = torch.compile(model, backend="aot_eager")
    with gs.watch(compiled) as rec:
        compiled(x).sum().backward()
        rec.step()
    frame = rec.to_frame()
    for name, dim in DIMS.items():
        assert _recorded(frame, name) == _direct(outputs[name], dim), name
