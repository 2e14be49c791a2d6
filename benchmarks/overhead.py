"""Recorder overhead: step time of a bare loop against the same loop under the recorder.

32 Pre-LN blocks, width 128, batch 256, CPU; everything recorded every step, and every 10th
step. Loops alternate (bare, recorded, bare, ...) over many repeats; the median ratio is
printed, which cancels this machine's drift.

    python benchmarks/overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import gradscope as gs
from gradscope.models import build_model


def make_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return time.perf_counter() - start

    return opt, run


def measure(every: int, repeats: int, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    base = build_model("preln", 32, width=128)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    bare_model, watched_model = copy.deepcopy(base), copy.deepcopy(base)
    _, bare = make_loop(bare_model, x, y)
    opt, watched = make_loop(watched_model, x, y)
    rec = gs.watch(watched_model, optimizer=opt, every=every)
    bare(3), watched(3)  # warm-up
    ratios, t_bare, t_rec = [], [], []
    for _ in range(repeats):
        a = bare(steps)
        b = watched(steps)
        ratios.append(b / a)
        t_bare.append(a / steps)
        t_rec.append(b / steps)
    rec.detach()
    assert len(rec.to_frame()) > 0
    return statistics.median(ratios), statistics.median(t_bare), statistics.median(t_rec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("every  steps/block  bare ms/step  recorded ms/step  median ratio  target")
    for every, target in ((1, 1.05), (10, 1.01)):
        steps = max(every, 5)
        ratio, bare, recd = measure(every, args.repeats, steps)
        flag = "ok" if ratio <= target else "MISSED"
        print(
            f"{every:>5}  {steps:>11}  {bare * 1e3:>12.2f}  {recd * 1e3:>16.2f}  {ratio:>12.3f}  <= {target} {flag}"
        )


if __name__ == "__main__":
    main()
