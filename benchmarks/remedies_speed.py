"""How long a trial of remedies takes: 6 remedies x 200 steps of the 784-128-10 MLP on an MNIST
subset (the target: under a minute), run three ways, alternated A B C A B C: serially with
torch's threads as they are, serially on one thread (the default), and in forked one-thread workers.

    python benchmarks/remedies_speed.py [--repeats 2] [--workers 2] [--default-only]

Reports wall and CPU seconds (this machine is shared: CPU time drifts less under load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradscope as gs
from gradscope.lab.data import load_dataset, subset
from gradscope.lab.models import build_named

REMEDIES = ["lr_x0.3", "lr_x0.1", "warmup", "clip_1.0", "reinit_matched", "sgd_to_adamw"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--default-only", action="store_true", help="only the default way")
    args = parser.parse_args()
    data = subset(load_dataset("mnist"), 8192)
    g = torch.Generator().manual_seed(0)
    batches = [
        (data.x_train[i], data.y_train[i])
        for i in (torch.randint(0, len(data.y_train), (64,), generator=g) for _ in range(100))
    ]

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_named("digit")
        return model, torch.optim.SGD(model.parameters(), lr=1.0)  # too high: worth fixing

    def step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        return loss

    ways = {
        f"serial, {torch.get_num_threads()} threads": {"threads": None},
        "serial, threads=1 (default)": {},
        f"workers={args.workers}": {"workers": args.workers},
    }
    if args.default_only:
        ways = {"serial, threads=1 (default)": {}}
    times: dict[str, list[float]] = {label: [] for label in ways}
    cpu: dict[str, list[float]] = {label: [] for label in ways}
    trial = None
    for _ in range(args.repeats):
        for label, options in ways.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            trial = gs.try_remedies(
                make,
                step,
                batches,
                steps=args.steps,
                remedies=REMEDIES,
                **options,  # type: ignore[arg-type]
            )
            times[label].append(time.perf_counter() - began)
            cpu[label].append(time.process_time() - began_cpu)
            print(
                f"{label}: {times[label][-1]:.1f} s ({cpu[label][-1]:.1f} s CPU here)", flush=True
            )
    assert trial is not None
    print(trial.table().drop(columns=["code"]).to_string(index=False))
    print(f"baseline + {len(REMEDIES)} remedies x {args.steps} steps (target < 60 s), medians:")
    first = statistics.median(next(iter(times.values())))
    for label, values in times.items():
        median = statistics.median(values)
        print(
            f"  {label}: {median:.1f} s, {statistics.median(cpu[label]):.1f} s CPU in this process "
            f"(ratio to the first: {median / first:.2f})"
        )


if __name__ == "__main__":
    main()
