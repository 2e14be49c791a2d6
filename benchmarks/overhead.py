"""Recorder overhead: step time of a bare loop against the same loop under the recorder.

Three models, CPU, SGD with momentum: the 784-128-10 classifier (batch 64), 32 Linear+ReLU
layers of width 128 (batch 256) and 32 Pre-LN blocks of width 128 (batch 256). For each, the
loops alternate with the bare loop (bare, A, bare, B, bare, ...) over many repeats; each
block's ratio is to the mean of the bare blocks on either side of it, and the median ratio
is printed, which cancels this machine's drift.

Reference rows put the recorder's cost in context:
- "hook floor": the same loop with a do-nothing forward hook on every leaf module and a
  do-nothing gradient hook on every module output: what calling Python at each point where
  the recorder must look costs, before any statistic is computed.
- "parameters only": the recorder with activations=False, activation_grads=False.
- "leaves only": everything but the blocks' outputs (the residual stream), which the default
  selection adds: the difference to "everything, every 1" is what the stream costs.
- "no geometry": everything but the update's cosine with the gradient, its step size and
  the optimizer's second-moment norm.

With --compiled, the same models under torch.compile (default mode, inductor): the compiled
model's bare step, with parameter statistics only, and with everything recorded every step
and every 10th (statistics computed inside the compiled graphs), each as a ratio to the
compiled bare step, beside the eager model's ratios to its own bare step.

    python benchmarks/overhead.py [--repeats 30] [--models mlp,relu32,preln32] [--compiled]
                                  [--targets-only]

With --device cuda, the GPU suite instead (the statistics on the torch-op path, no host
sync inside a step): a Pre-LN transformer of width 1024 (24 layers, sequence 512, bf16
autocast, AdamW) and a ResNet-style CNN (bf16 autocast, SGD), each bare, with everything
recorded every step and every 10th step, eager and torch.compile'd, bare and recorded blocks
alternated; it prints the card's name and each loop's median ratio to the bare blocks beside
it. Targets on the transformer: every step <= 1.05x, every 10th <= 1.01x. Without CUDA it
exits with code 2. `--device cpu --tiny` runs the same suite, shrunk, on the CPU (a check
that it runs, not a measurement).

    python benchmarks/overhead.py --device cuda [--repeats 20] [--no-compile | --compile-only]

Beside each median ratio, the range of the middle half of the blocks' ratios: this machine
drifts, and that range says how far one run's median can be trusted.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# benchmarks.* when run as a script (appended: the gradscope of PYTHONPATH stays first, so
# tools/overhead_ab.py measures the tree it names)
sys.path.append(str(Path(__file__).resolve().parents[1]))

import gradscope as gs  # noqa: E402
from gradscope.lab.models import build_model, build_named  # noqa: E402

STEPS = 10  # steps per timed block


def hook_floor(model: nn.Module) -> None:
    """Do-nothing hooks where the recorder has them: each leaf's output and its gradient."""

    def on_grads(grads: tuple[torch.Tensor | None, ...]) -> None:
        return None

    def on_forward(module: nn.Module, args: object, out: torch.Tensor) -> None:
        if out.grad_fn is not None:  # as the recorder does: a pre-hook on the output's node
            out.grad_fn.register_prehook(on_grads)

    for module in model.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(on_forward)


def _leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def make_loop(
    model: nn.Module,
    batch: int,
    setup: Callable[[nn.Module, torch.optim.Optimizer], object],
    call: nn.Module | None = None,
):  # type: ignore[no-untyped-def]
    """Timed steps of `call` (the model, or its compiled wrapper), set up by `setup`."""
    call = model if call is None else call
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    keep = setup(call, opt)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(call(x), y).backward()
            opt.step()
        return (time.perf_counter() - start) / STEPS

    run.keep = keep  # type: ignore[attr-defined]
    return run


VARIANTS: dict[str, tuple[Callable[[nn.Module, torch.optim.Optimizer], object], float | None]] = {
    "bare": (lambda m, o: None, None),
    "hook floor (no statistics)": (lambda m, o: hook_floor(m), None),
    "parameters only, every 1": (
        lambda m, o: gs.watch(m, optimizer=o, activations=False, activation_grads=False),
        None,
    ),
    "+ activations, every 1": (
        lambda m, o: gs.watch(m, optimizer=o, activation_grads=False),
        None,
    ),
    "+ output gradients, every 1": (
        lambda m, o: gs.watch(m, optimizer=o, activations=False),
        None,
    ),
    "everything, leaves only": (
        lambda m, o: gs.watch(m, optimizer=o, include=lambda fqn, mod: _leaf(mod)),
        None,
    ),
    "everything, no geometry": (lambda m, o: gs.watch(m, optimizer=o, geometry=False), None),
    "everything, every 1": (lambda m, o: gs.watch(m, optimizer=o, every=1), None),
    "everything, every 10": (lambda m, o: gs.watch(m, optimizer=o, every=10), None),
}


# name: (model, batch, target every step, target every 10th)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, float, float]] = {
    "mlp": (lambda: build_named("digit"), 64, 1.25, 1.02),
    "relu32": (lambda: build_model("plain", 32, width=128), 256, 1.10, 1.02),
    "preln32": (lambda: build_model("preln", 32, width=128), 256, 1.15, 1.02),
}


TARGETED = ("bare", "hook floor (no statistics)", "everything, every 1", "everything, every 10")


def measure(name: str, repeats: int, only_targets: bool = False) -> None:
    make, batch, target_1, target_10 = MODELS[name]
    torch.manual_seed(0)
    base = make()
    targets = {"everything, every 1": target_1, "everything, every 10": target_10}
    variants = {k: v for k, v in VARIANTS.items() if k in TARGETED or not only_targets}
    loops = {
        loop: make_loop(copy.deepcopy(base), batch, setup) for loop, (setup, _) in variants.items()
    }
    for run in loops.values():
        run()  # warm-up
    # each recorded block between two bare blocks, its ratio to their mean: this machine's
    # speed drifts within a round, so a bare block run several blocks earlier is a poor
    # reference
    times: dict[str, list[float]] = {loop: [] for loop in loops}
    ratios: dict[str, list[float]] = {loop: [] for loop in loops}
    bare_run = loops["bare"]
    for _ in range(repeats):
        before = bare_run()
        times["bare"].append(before)
        ratios["bare"].append(1.0)
        for loop, run in loops.items():
            if loop == "bare":
                continue
            took, after = run(), bare_run()
            times[loop].append(took)
            ratios[loop].append(took / ((before + after) / 2))
            times["bare"].append(after)
            before = after
    print(f"\n{name} (batch {batch})")
    print(f"{'loop':<28}  {'ms/step':>8}  {'median ratio':>12}  {'middle half':>13}  target")
    for loop in variants:
        ratio = statistics.median(ratios[loop])
        # where the middle half of the blocks' ratios fell
        q1, _, q3 = statistics.quantiles(ratios[loop], n=4)
        target = targets.get(loop)
        verdict = "" if target is None else f"<= {target} {'ok' if ratio <= target else 'MISSED'}"
        ms = statistics.median(times[loop]) * 1e3
        print(f"{loop:<28}  {ms:>8.3f}  {ratio:>12.3f}  {q1:>6.3f}-{q3:<6.3f}  {verdict}")
    for loop, run in loops.items():
        if isinstance(run.keep, gs.Recorder):  # type: ignore[attr-defined]
            assert len(run.keep.to_frame()) > 0, loop  # type: ignore[attr-defined]


COMPILED: dict[str, Callable[[nn.Module, torch.optim.Optimizer], object]] = {
    "parameters only, every 1": VARIANTS["parameters only, every 1"][0],
    "everything, every 1": VARIANTS["everything, every 1"][0],
    "everything, every 10": VARIANTS["everything, every 10"][0],
}


def measure_compiled(name: str, repeats: int) -> None:
    """Eager and compiled loops alternated; each recorded loop's ratio to its own bare loop."""
    make, batch, _, _ = MODELS[name]
    torch.manual_seed(0)
    base = make()
    loops = {}
    for mode in ("eager", "compiled"):
        for loop, setup in {"bare": VARIANTS["bare"][0], **COMPILED}.items():
            model = copy.deepcopy(base)
            if mode == "compiled":
                run = make_loop(model, batch, setup, torch.compile(model))
            else:
                run = make_loop(model, batch, setup)
            loops[(mode, loop)] = run
    start = time.perf_counter()
    for run in loops.values():
        run()  # warm-up (compiles)
        run()
    print(
        f"\n{name} (batch {batch}), eager and torch.compile; warm-up and compiling "
        f"{time.perf_counter() - start:.0f} s"
    )
    times: dict[tuple[str, str], list[float]] = {key: [] for key in loops}
    for _ in range(repeats):
        for key, run in loops.items():
            times[key].append(run())
    print(f"{'loop':<28}  {'eager ms':>8}  {'ratio':>6}  {'compiled ms':>11}  {'ratio':>6}")
    for loop in ("bare", *COMPILED):
        cells = []
        for mode in ("eager", "compiled"):
            bare = times[(mode, "bare")]
            ratio = statistics.median(t / b for t, b in zip(times[(mode, loop)], bare, strict=True))
            cells.append((statistics.median(times[(mode, loop)]) * 1e3, ratio))
        (em, er), (cm, cr) = cells
        print(f"{loop:<28}  {em:>8.3f}  {er:>6.3f}  {cm:>11.3f}  {cr:>6.3f}")
    for (mode, loop), run in loops.items():  # each recorder recorded what it was asked to
        keep = run.keep  # type: ignore[attr-defined]
        if isinstance(keep, gs.Recorder):
            kinds = set(keep.to_frame()["kind"])
            assert ("activation" in kinds) == loop.startswith("everything"), (mode, loop)
            assert "activation_grad" in kinds or not loop.startswith("everything"), (mode, loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--device", default="cpu", help="cpu (the CPU suite) or cuda (the GPU suite)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the GPU suite shrunk (to check it runs)"
    )
    parser.add_argument("--no-compile", action="store_true", help="GPU suite: eager only")
    parser.add_argument("--compile-only", action="store_true", help="GPU suite: torch.compile only")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--compiled", action="store_true", help="eager against torch.compile")
    parser.add_argument(
        "--targets-only",
        action="store_true",
        help="only the loops with targets, the bare loop and the hook floor (shorter rounds)",
    )
    args = parser.parse_args()
    if args.device != "cpu" or args.tiny:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(
                "benchmarks/overhead.py --device cuda: no CUDA device on this machine "
                "(torch.cuda.is_available() is False); nothing measured."
            )
            sys.exit(2)
        from benchmarks.overhead_gpu import measure_gpu  # the GPU suite

        torch._dynamo.config.cache_size_limit = 64
        modes = (True,) if args.compile_only else (False,) if args.no_compile else (False, True)
        measure_gpu(device, args.repeats, args.tiny, modes)
        return
    if args.compiled:
        torch._dynamo.config.cache_size_limit = 64  # one model per loop, compiled apart
        for name in args.models.split(","):
            measure_compiled(name, args.repeats)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {STEPS} steps a block")
    try:  # (an older gradscope under tools/overhead_ab.py has no torch-op backend to count)
        from benchmarks.call_ops import print_ops_per_call

        print_ops_per_call()
    except ImportError:
        pass
    for name in args.models.split(","):
        measure(name, args.repeats, args.targets_only)


if __name__ == "__main__":
    main()
