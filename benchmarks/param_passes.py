"""The fused parameter passes of one recorded step (recorder/stats/flat.py: copy before the
update, statistics after it), with every tensor through the flat buffers against large ones
read where they are (flat.ALONE, the default), over the parameters of one block of the GPU
benchmark's transformer (width 1024: 12.6M float32 values, 3 of its 12 tensors read
alone). Alternated A B A B, medians and the median ratio.

    python benchmarks/param_passes.py [--device cuda] [--rounds 9]

On the CPU this runs the compiled C++ of torch.compile (GRADSCOPE_FUSED=1, set here), where
the passes are memory-bound too; on a GPU, the Triton kernels the recorder runs there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["GRADSCOPE_FUSED"] = "1"  # the fused passes on every device (the CPU included)

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

from gradscope.recorder.stats import flat  # noqa: E402

WIDTH = 1024
SHAPES = [
    (3 * WIDTH, WIDTH),  # attention in-projection
    (3 * WIDTH,),
    (WIDTH, WIDTH),  # attention out-projection
    (WIDTH,),
    (4 * WIDTH, WIDTH),  # MLP
    (4 * WIDTH,),
    (WIDTH, 4 * WIDTH),
    (WIDTH,),
    *[(WIDTH,)] * 4,  # two LayerNorms
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="recorded steps a timed block")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/param_passes.py --device cuda: no CUDA device on this machine "
            "(torch.cuda.is_available() is False); nothing measured."
        )
        sys.exit(2)
    if device.type == "cpu":
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    present = list(range(len(params)))
    threshold = flat.ALONE
    made = {}
    for name, alone in (("flat buffers", 2**62), ("read alone", threshold)):
        flat.ALONE = alone
        made[name] = flat.FlatStats(params)
    flat.ALONE = threshold
    assert all(stats.fused for stats in made.values())

    def block(stats: flat.FlatStats) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            stats.snapshot(present, grads, params)
            stats.after(params, True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.steps

    for stats in made.values():  # compiles
        block(stats)
    times: dict[str, list[float]] = {name: [] for name in made}
    for _ in range(args.rounds):
        for name, stats in made.items():
            times[name].append(block(stats))
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    count = sum(p.numel() for p in params)
    print(f"parameter passes of a recorded step, {count / 1e6:.1f}M parameters, {name_of}")
    for name, values in times.items():
        print(f"  {name:<13} {statistics.median(values) * 1e3:8.2f} ms")
    ratios = [a / b for a, b in zip(times["read alone"], times["flat buffers"], strict=True)]
    print(f"  read alone / flat buffers: {statistics.median(ratios):.2f} (median of {len(ratios)})")


if __name__ == "__main__":
    main()
