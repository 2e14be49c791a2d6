"""CPU time per step of a bare loop and of the recorder every step and every 10th, on two trees
alternated (A B A B ...): each round runs each tree in its own process, one thread, blocks
of 20 steps of the three loops in turn, and reports median CPU time (time.process_time), which
a busy machine disturbs far less than wall time.

    python tools/cpu_time_ab.py /tmp/base-tree . [--rounds 3] [--blocks 10] [--models mlp,relu32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import copy, json, statistics, sys, time
import torch
from torch import nn
import gradscope as gs
from gradscope.lab.models import build_model, build_named
torch.set_num_threads(1)
name, blocks = sys.argv[1], int(sys.argv[2])
make, batch = {"mlp": (lambda: build_named("digit"), 64),
               "relu32": (lambda: build_model("plain", 32, width=128), 256)}[name]
torch.manual_seed(0)
base = make()
x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
def loop(every):
    m = copy.deepcopy(base)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    rec = gs.watch(m, optimizer=opt, every=every) if every else None
    def run(n=20):
        t = time.process_time()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        return (time.process_time() - t) / n
    return run, rec
loops = {"bare": loop(0), "every1": loop(1), "every10": loop(10)}
for run, _ in loops.values():
    run(); run()
times = {k: [] for k in loops}
for _ in range(blocks):
    for k, (run, _) in loops.items():
        times[k].append(run())
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def run(tree: str, model: str, blocks: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(blocks)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--models", default="mlp,relu32")
    args = parser.parse_args()
    models = args.models.split(",")
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for side in ("a", "b"):
            for model in models:
                times = run(getattr(args, side), model, args.blocks)
                got.setdefault((side, model), []).append(times)
                print(f"round {r + 1} {side} {model}: {times}", flush=True)
    print(f"\nA = {args.a}, B = {args.b}; CPU time, medians over {args.rounds} rounds")
    print(f"{'model':<8} {'loop':<8} {'A / bare':>8} {'B / bare':>8} {'B/A':>6}")
    for model in models:
        for loop in ("every1", "every10"):
            a, b = (
                statistics.median(t[loop] / t["bare"] for t in got[(side, model)])
                for side in ("a", "b")
            )
            print(f"{model:<8} {loop:<8} {a:>8.3f} {b:>8.3f} {b / a:>6.3f}")


if __name__ == "__main__":
    main()
