"""Rows made later, for many steps at once (recorder/deferred.py), equal rows made as each
step closes: same rows, same order, bit-identical values."""

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.recorder import deferred
from gradscope.recorder.reduce import Reducer


class Net(nn.Module):
    """A cell applied three times (calls merged per layer), tanh (saturation rows), blocks
    (block_index rows) and a head whose bias goes without a gradient on one step."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.cell(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _run(geometry: bool, steps: int = 30, nan_at: int = 24) -> tuple[gs.Recorder, list]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = gs.watch(model, optimizer=opt, geometry=geometry)
    counts = []  # (rows_held as reported, rows actually held) at a few steps
    for step in range(steps):
        opt.zero_grad()
        for _ in range(2):  # two micro-batches, smaller on some steps (same calls, other
            x = torch.randn(5 if step % 4 else 3, 8)  # element and sample counts)
            if step == nan_at:
                x[0, 0] = float("nan")
            loss = model(x).pow(2).mean()
            loss.backward()
        rec.log_scalar("loss", loss)
        if step == 11:
            model.head.bias.grad = None  # a step that makes other rows
        opt.step()
        if step in (7, 19):
            counts.append((rec.rows_held, len(rec.held_frame())))
    rec.detach()
    return rec, counts


@pytest.fixture
def batches(monkeypatch) -> list[int]:
    """The size of each batch of steps reduced together, as the recorder reduces them."""
    sizes: list[int] = []
    reduce = Reducer.reduce

    def counted(self, batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        return reduce(self, batch, *args, **kwargs)

    monkeypatch.setattr(Reducer, "reduce", counted)
    return sizes


@pytest.mark.parametrize("geometry", [True, False])
def test_rows_made_later_equal_rows_made_at_each_step(monkeypatch, batches, geometry):
    later, counts = _run(geometry)
    assert max(batches) > 1 and len(batches) < 30  # steps were reduced together
    assert sum(batches) == 30
    monkeypatch.setattr(deferred, "MAX_HELD", 1)  # each step reduced as it closes
    batches.clear()
    now, _ = _run(geometry)
    assert batches == [1] * 30
    frame = later.to_frame()
    pd.testing.assert_frame_equal(frame, now.to_frame(), check_exact=True)
    assert later.nonfinite == now.nonfinite and later.nonfinite[0].step == 24
    assert set(frame.step) == set(range(30))
    assert frame.kind.isin(["nonfinite_origin"]).any()
    assert {"saturated_frac", "block_index", "loss"} <= set(frame.stat)
    assert ("exp_avg_sq_norm" in set(frame.stat)) == geometry
    # the step without the head's bias gradient has its own rows
    bias_rows = frame[(frame.layer == "head.bias") & (frame.kind == "param_grad")]
    assert 11 not in set(bias_rows.step) and {10, 12} <= set(bias_rows.step)
    for reported, held in counts:  # steps not reduced yet are counted
        assert reported == held > 0


def test_last_step_frame_and_held_rows_while_steps_wait():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gs.watch(model, optimizer=opt, geometry=False)
    lasts = []
    for step in range(6):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        if step == 3:
            model.head.bias.grad = None
        opt.step()
        lasts.append(rec.last_step_frame())
    frame = rec.to_frame()
    rec.detach()
    for step, last in enumerate(lasts):
        assert set(last.step) == {step}
        expected = frame[frame.step == step].reset_index(drop=True)
        pd.testing.assert_frame_equal(last, expected, check_exact=True)


@pytest.mark.parametrize("spill_rows", [1, 500, 5000])
def test_spilling_with_steps_held(tmp_path, spill_rows, monkeypatch, batches):
    monkeypatch.setattr(deferred, "MAX_HELD", 1000)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gs.watch(model, optimizer=opt, spill_to=tmp_path / "rows", spill_rows=spill_rows)
    per_step = 0
    for step in range(20):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        if step == 0:  # the first step is reduced at once: asking for it holds nothing back
            per_step = len(rec.last_step_frame())
        # spilled on time, steps held included (rows_held itself reduces nothing)
        assert rec.rows_held < spill_rows + per_step
    reduced_before_the_frame = list(batches)
    frame = rec.to_frame()
    assert sum(batches) == 20
    if spill_rows > 2 * per_step:  # steps waited, and were reduced together
        assert max(reduced_before_the_frame + batches) > 1
    else:  # every step reaches the threshold: none can wait
        assert batches == [1] * 20
    rec.detach()
    on_disk = pd.concat(
        [pd.read_parquet(p) for p in sorted((tmp_path / "rows").glob("part-*.parquet"))],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(on_disk, frame, check_exact=True)
    assert set(frame.step) == set(range(20))


def test_held_steps_keep_few_python_objects(monkeypatch):
    """A held step keeps its numbers, not one Python object per call: otherwise the garbage
    collector promotes them all and runs full collections (~0.15 s each in a process with
    torch and pandas loaded) every few hundred steps."""
    import gc

    model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(10)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    with gs.watch(model, optimizer=opt) as rec:
        calls = 0
        for step in range(60):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if step == 9:  # the first steps settled; later ones are held
                held = len(rec._rows._held)
                gc.collect()
                before = len(gc.get_objects())
        gc.collect()
        grown = len(gc.get_objects()) - before
        calls = len(rec._rows._held[0].outputs) + len(rec._rows._held[0].grads)
        assert len(rec._rows._held) - held == 50  # all 50 later steps are held
    assert calls >= 60  # 30 watched modules: an output and a gradient each
    assert grown / 50 < 12, grown  # tracked objects per held step, against 60+ calls
