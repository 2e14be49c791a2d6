"""The CPU overhead benchmark on two trees, alternated (A B A B ...): each run measures the
recorder's ratios to the bare loop in its own process, and the trees' ratios are compared
round by round, so that the machine's drift cancels.

    python tools/overhead_ab.py /tmp/base-tree . [--rounds 3] [--repeats 10] [--models mlp]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
LINE = re.compile(r"^(everything, every (?:1|10))\s+([\d.]+)\s+([\d.]+)")


def run(tree: str, repeats: int, models: str) -> dict[tuple[str, str], float]:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    out = subprocess.run(
        [sys.executable, str(BENCH), "--targets-only", "--repeats", str(repeats)]
        + ["--models", models],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ratios, model = {}, ""
    for line in out.splitlines():
        if line and not line.startswith(" ") and "(batch" in line:
            model = line.split(" ")[0]
        match = LINE.match(line)
        if match:
            ratios[(model, match.group(1))] = float(match.group(3))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default="mlp,relu32,preln32")
    args = parser.parse_args()
    results: dict[str, list[dict[tuple[str, str], float]]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b"):
            results[side].append(run(getattr(args, side), args.repeats, args.models))
            print(f"round {r + 1} {side}: {results[side][-1]}", flush=True)
    print(f"\nA = {args.a}, B = {args.b}; median over {args.rounds} alternated rounds")
    print(f"{'model':<8} {'loop':<22} {'A ratio':>8} {'B ratio':>8} {'B/A':>6}")
    for key in results["a"][0]:
        a = statistics.median(r[key] for r in results["a"])
        b = statistics.median(r[key] for r in results["b"])
        print(f"{key[0]:<8} {key[1]:<22} {a:>8.3f} {b:>8.3f} {b / a:>6.3f}")


if __name__ == "__main__":
    main()
