"""What the live view costs a training loop at its default interval (5 s).

The same recorded loop (SGD with momentum, recorded every 10th step) with and without
`live=`, in blocks of --seconds each, alternating A B A B so that this machine's drift
cancels; the median of the B/A ratios of neighbouring blocks is printed. Beside it, the
direct measure, sharper on a drifting machine: the median time of one update (the clock is
read at every recorded step; an update runs when `interval` has passed), and that time over
the interval, which is the share of the loop it takes once training runs longer than one
interval. The first update of a process also imports IPython's display (once, about a
second); it is timed apart, before the pairs, and printed as "first". Each block also has one update at its first recorded step and one at detach (the
final state, after the loop), so a block holds about seconds / interval + 2 updates.

Two models: the 784-128-10 classifier (batch 64) and a 32-layer plain ReLU stack of width
128 (batch 256). Two views: the notebook panel (drawn and PNG-encoded exactly as in Jupyter;
only IPython's display call, an asynchronous send to the frontend, is replaced by a stub so
that it runs outside a kernel) and the terminal line.

    python benchmarks/live_view.py [--seconds 12] [--pairs 4] [--interval 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import gradscope as gs
from gradscope.integrations import live as live_module


class _Handle:
    def update(self, obj: Any) -> None:
        pass


def _stub_display(obj: Any, display_id: bool = False) -> _Handle:
    return _Handle()


def _models() -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    return {"mlp 784-128-10": (mlp, 64), "plain relu32": (gs.build_model("plain", 32), 256)}


class _Timed(live_module.LiveView):
    """A LiveView that keeps the time each of its updates took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []

    def update(self, recorder: Any) -> None:
        start = time.perf_counter()
        super().update(recorder)
        self.times.append(time.perf_counter() - start)


def _block(model: nn.Module, batch: int, seconds: float, view: _Timed | None) -> float:
    """Steps per second of the recorded loop over `seconds`, with the view or without."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    steps = 0
    with gs.watch(model, every=10, live=view if view is not None else False) as rec:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            loss = nn.functional.cross_entropy(model(x), y)
            rec.log_scalar("loss", loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        elapsed = time.perf_counter() - start
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--interval", type=float, default=live_module.DEFAULT_INTERVAL)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import IPython.display

    IPython.display.display = _stub_display  # the panel is drawn, only not sent anywhere
    sink = io.StringIO()
    print(f"interval {args.interval} s, blocks of {args.seconds} s, {args.pairs} A/B pairs")
    print(
        f"{'model':<16} {'view':<9} {'median B/A slowdown':>20} {'ms/update':>10} "
        f"{'share at interval':>18} {'updates':>8} {'first (ms)':>10}"
    )
    for name, (model, batch) in _models().items():
        for notebook in (True, False):
            ratios, times = [], []
            _block(model, batch, 1.0, None)  # warm up
            # the first update in a process imports IPython.display and the notebook module
            # (about a second, once): timed here, outside the pairs that measure the rate
            first = _Timed(args.interval, notebook=notebook, write=sink.write)
            _block(model, batch, 1.0, first)
            for _ in range(args.pairs):
                view = _Timed(args.interval, notebook=notebook, write=sink.write)
                bare = _block(model, batch, args.seconds, None)
                live = _block(model, batch, args.seconds, view)
                ratios.append(bare / live)  # > 1: the live loop is slower
                times += view.times
            slow = statistics.median(ratios) - 1
            each = statistics.median(times)
            kind = "notebook" if notebook else "terminal"
            print(
                f"{name:<16} {kind:<9} {slow:>19.2%} {each * 1e3:>10.1f} "
                f"{each / args.interval:>17.2%} {len(times):>8} {first.times[0] * 1e3:>10.0f}"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
