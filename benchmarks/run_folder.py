"""What keeping the run folder current while training costs (the trainer callbacks'
`save_every`, gradscope.integrations.folder).

The same 2000-step loop (the 784-128-10 MLP, batch 64, SGD, every step recorded) three ways:
  A  rows kept in memory, the folder written once at the end (rec.save);
  B  the callbacks' option: rows spilled into the folder every 100 recorded steps, then
     rec.save at the end (the recorder options are the ones the callbacks pass);
  C  for reference, once: the naive way, the whole run saved (data only, no report) every
     100 recorded steps, which grows as steps^2.
A and B alternate A B A B ... (--pairs); each prints the CPU time of the loop and of the
final save (time.process_time: this machine is shared and loaded, so wall time drifts far
more than CPU time), and the median of the B/A ratios of neighbouring pairs.

    python benchmarks/run_folder.py [--steps 2000] [--pairs 3] [--every-save 100]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import gradscope as gs
from gradscope.integrations.folder import folder_options
from gradscope.runs import save_run


def _loop(steps: int, rec_kwargs: dict, out: Path, on_step: Callable | None = None) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    start = time.process_time()
    with gs.watch(model, optimizer=opt, **rec_kwargs) as rec:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            rec.log_scalar("loss", loss)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(rec, step)
    loop = time.process_time() - start
    start = time.process_time()
    rec.save(out)
    final = time.process_time() - start
    parts = len(list(out.glob("part-*.parquet")))
    return loop, final, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--every-save", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="gradscope-run-folder-"))
    n = args.every_save
    try:
        _loop(50, {}, root / "warm")  # imports and first-use compilation out of the timings
        ratios_loop, ratios_total = [], []
        for pair in range(args.pairs):
            a_out, b_out = root / f"a{pair}", root / f"b{pair}"
            a = _loop(args.steps, {}, a_out)
            b = _loop(args.steps, folder_options(b_out, n, {}), b_out)
            ratios_loop.append(b[0] / a[0])
            ratios_total.append((b[0] + b[1]) / (a[0] + a[1]))
            print(
                f"pair {pair}: A loop {a[0]:.2f} s + save {a[1]:.2f} s | "
                f"B loop {b[0]:.2f} s + save {b[1]:.2f} s ({b[2]} parts) | "
                f"B/A loop {ratios_loop[-1]:.3f}, loop+save {ratios_total[-1]:.3f}"
            )
        print(
            f"median B/A (CPU time): loop {statistics.median(ratios_loop):.3f}, "
            f"loop + final save {statistics.median(ratios_total):.3f}"
        )

        def naive(rec: gs.Recorder, step: int) -> None:
            if (step + 1) % n == 0:
                save_run(rec, root / "c")

        c = _loop(args.steps, {}, root / "c", naive)
        print(
            f"C (full save every {n} recorded steps, once): loop {c[0]:.2f} s + save {c[1]:.2f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
