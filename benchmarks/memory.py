"""Recorder memory over 10,000 recorded steps: held rows against rows spilled to Parquet.

Each mode trains a small MLP (plain, depth 4, width 32, batch 16) for --steps steps, every
step recorded, and reads this process's resident memory (/proc/self/statm) every 1,000
steps. With rows held in memory, growth should be the rows kept (bytes per row printed);
with spill_to, it should be flat. The modes run in separate processes so that one's
allocations do not hide the other's.

    python benchmarks/memory.py [--steps 10000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile

import torch
from torch import nn

import gradscope as gs
from gradscope.lab.models import build_model


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(mode: str, steps: int, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("plain", 4, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    with tempfile.TemporaryDirectory() as tmp:
        spill = os.path.join(tmp, "rows") if mode == "spill" else None
        rec = gs.watch(model, optimizer=opt, spill_to=spill, spill_rows=50_000)
        samples = []
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if step % 1000 == 0:
                samples.append((step, resident_mib(), rec.rows_held))
        rec.detach()
        total_rows = len(rec.to_frame())
    queue.put((samples, total_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print("mode   step    resident MiB  rows held")
    for mode in ("held", "spill"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run, args=(mode, args.steps, queue))
        proc.start()
        samples, total_rows = queue.get()
        proc.join()
        for step, mib, held in samples:
            print(f"{mode:<5}  {step:>6}  {mib:>12.1f}  {held:>9}")
        (s0, m0, h0), (s1, m1, h1) = samples[0], samples[-1]
        growth = m1 - m0
        per_row = growth * 2**20 / max(h1 - h0, 1)
        print(
            f"{mode}: {total_rows} rows recorded; resident growth step {s0} -> {s1}: "
            f"{growth:+.1f} MiB ({h1 - h0} more rows held"
            + (f", {per_row:.0f} bytes a row)" if h1 > h0 else ")")
        )


if __name__ == "__main__":
    main()
