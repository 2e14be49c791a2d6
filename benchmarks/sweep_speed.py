"""Depth-sweep speed: how much the recorder adds to the sweep's runs, and the sweep's wall time.

Part 1 alternates each run of the default sweep (every variant at every default depth, the
default --every, 20) with and without the recorder (A B A B ...), and prints the median
ratio of the summed run times. Part 2 times the default `gradscope depth-sweep --max 100`
end to end (with --full).

    python benchmarks/sweep_speed.py [--repeats 3] [--steps 100] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradscope.lab.data import load_dataset
from gradscope.lab.sweep import DEFAULT_VARIANTS, RunSpec, SweepConfig, default_depths, run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--full", action="store_true", help="also time the whole default sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in the sweep's two worker processes
    data = load_dataset("mnist", args.data_root)
    config = SweepConfig(depths=tuple(default_depths(2, 100)), steps=args.steps)
    specs = [RunSpec(v, d, 0) for v in DEFAULT_VARIANTS for d in config.depths]
    totals = {True: [0.0] * args.repeats, False: [0.0] * args.repeats}
    for rep in range(args.repeats):
        for spec in specs:
            for record in (False, True):
                start = time.perf_counter()
                run_one(spec, config, data, record=record)
                totals[record][rep] += time.perf_counter() - start
    ratios = [r / b for r, b in zip(totals[True], totals[False], strict=True)]
    print(f"{len(specs)} runs x {args.steps} steps, every {config.every}, 1 thread")
    print(
        f"bare sweep runs:     {statistics.median(totals[False]):.1f}s (median of {args.repeats})"
    )
    print(f"recorded sweep runs: {statistics.median(totals[True]):.1f}s")
    print(f"recorder overhead: median ratio {statistics.median(ratios):.3f} (target <= 1.10)")
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "gradscope",
                "depth-sweep",
                "--max",
                "100",
                "--out",
                str(Path(tmp) / "sweep"),
            ]
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - start
        print(f"default depth-sweep --max 100 end to end: {wall:.0f}s (target <= 300s)")


if __name__ == "__main__":
    main()
