"""Children for the fault tests (and benchmarks/survival.py): a training job that saves or
spills and kills itself with SIGKILL at a chosen point.

    python tests/faults.py save OUT POINT     # POINT: frame, exchange, swapped, report, none
    python tests/faults.py spill DIR POINT    # POINT: step (a kill between parts), part
                                              # (a kill inside a part's write), none
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def train(
    rec_steps: int, model: nn.Module, opt: torch.optim.Optimizer, pause: float = 0.0, on_step=None
) -> None:
    for step in range(rec_steps):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        if on_step is not None:
            on_step(step)
        if pause:
            time.sleep(pause)


def save(out: Path, point: str) -> None:
    import gradscope as gs
    from gradscope import files, runs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gs.watch(model, optimizer=opt)
    train(5, model, opt)
    rec.save(out)  # the old run: steps 0-4
    train(5, model, opt)  # the new one would hold steps 0-9
    if point == "frame":
        real_frame = runs._write_frame

        def frame_then_die(*a, **k):
            real_frame(*a, **k)
            die()

        runs._write_frame = frame_then_die
    elif point == "exchange":
        runs.replace_dir = lambda *a: die()
    elif point == "swapped":
        real_exchange = files._exchange

        def swap_then_die(a, b):
            real_exchange(a, b)
            die()

        files._exchange = swap_then_die
    elif point == "report":
        import gradscope.report.run as report

        report.render_run_report = lambda run: die()
    rec.save(out)
    print("saved", flush=True)


def spill(folder: Path, point: str) -> None:
    import pandas as pd

    import gradscope as gs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gs.watch(model, optimizer=opt, every=10, spill_to=folder, spill_seconds=0.3)
    if point == "part":
        real = pd.DataFrame.to_parquet
        calls = {"n": 0}

        def write_then_die(self, path, *a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # the third part: half written, never renamed
                Path(path).write_bytes(b"PAR1" + b"\0" * 100)
                die()
            return real(self, path, *a, **k)

        pd.DataFrame.to_parquet = write_then_die

    def on_step(step: int) -> None:
        print(step, flush=True)
        if point == "step" and step == 300:
            die()

    train(400, model, opt, pause=0.005, on_step=on_step)
    rec.detach()


if __name__ == "__main__":
    {"save": save, "spill": spill}[sys.argv[1]](Path(sys.argv[2]), sys.argv[3])
