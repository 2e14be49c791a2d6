"""What `on_verdict` (the online diagnosis) adds to a recorded step of the 784-128-10 MLP.

Blocks of steps alternate: recorded without on_verdict (A), recorded with it (B), A, B, ...;
each B block's time is divided by the mean of the A blocks on either side of it and the
median ratio is printed (this machine's speed drifts by 20%). Batch 64, SGD with momentum,
every step recorded, the loss logged; each block's time includes making its frame
(`to_frame()`), since without on_verdict the recorder makes rows later, in batches. The same
ratio is printed for the blocks' CPU time (time.process_time): on a machine shared with other
work, wall time mostly measures the others, and even CPU time drifts 20% from block to block.
So it also prints the CPU time spent inside the online diagnosis itself (its per-step checks
and the whole-run checks with the frame they read), counted around
OnlineDiagnosis.update_numbers, against the CPU time of a step recorded without it.

    python benchmarks/online_overhead.py [--repeats 15] [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradscope as gs
from gradscope.analysis import online as online_module

INSIDE = {"cpu": 0.0, "calls": 0}


def _counted(method):  # type: ignore[no-untyped-def]
    """The CPU time spent in the online diagnosis (what on_verdict adds to a step)."""

    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            INSIDE["cpu"] += time.process_time() - start
            INSIDE["calls"] += 1

    return run


def block(
    model: nn.Module, opt: torch.optim.Optimizer, data, online: bool, steps: int
) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    fired = []
    kwargs = {"on_verdict": fired.append} if online else {}
    x, y = data
    with gs.watch(model, optimizer=opt, every=1, **kwargs) as rec:
        for _ in range(3):  # warm-up: the first steps build the recorder's buffers
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.log_scalar("loss", loss)
            opt.step()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.log_scalar("loss", loss)
            opt.step()
    rec.to_frame()  # rows made later (without on_verdict) count too
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if fired:
        print(f"  (on_verdict fired on a healthy run: {[v.id for v in fired]})")
    return elapsed, cpu


def _ratios(a: list[float], b: list[float]) -> list[float]:
    """Each B block against the mean of the A blocks on either side of it."""
    return [y / ((a0 + a1) / 2) for y, a0, a1 in zip(b, a, a[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    online_module.OnlineDiagnosis.update_numbers = _counted(  # type: ignore[method-assign]
        online_module.OnlineDiagnosis.update_numbers
    )
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = (torch.randn(64, 784), torch.randint(0, 10, (64,)))
    runs_a, runs_b = [block(model, opt, data, False, args.steps)], []
    for _ in range(args.repeats):
        runs_b.append(block(model, opt, data, True, args.steps))
        runs_a.append(block(model, opt, data, False, args.steps))
    for what, i in (("wall", 0), ("CPU", 1)):
        times_a, times_b = [r[i] for r in runs_a], [r[i] for r in runs_b]
        ratios = _ratios(times_a, times_b)
        per_step_a = statistics.median(times_a) / args.steps * 1e3
        per_step_b = statistics.median(times_b) / args.steps * 1e3
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"{what}: recorded step without on_verdict {per_step_a:.3f} ms, with "
            f"{per_step_b:.3f} ms; median ratio {statistics.median(ratios):.3f} (middle half "
            f"{q[0]:.3f} to {q[2]:.3f}; {args.repeats} alternating blocks of {args.steps} steps)"
        )
    inside = INSIDE["cpu"] / max(1, INSIDE["calls"]) * 1e3
    base = statistics.median(r[1] for r in runs_a) / args.steps * 1e3
    print(
        f"inside the online diagnosis: {inside:.3f} ms CPU a recorded step ({INSIDE['calls']} "
        f"steps), {inside / base:.1%} of a step recorded without it ({base:.3f} ms CPU)"
    )


if __name__ == "__main__":
    main()
