"""How much memory a recorded step reads and writes on the torch-op path (the path a GPU
takes), eager and fused (recorder/stats/fused.py): a floor on its cost where memory bandwidth
bounds it, measured without a GPU.

Bytes are counted op by op with a dispatch mode on the CPU (each op's tensor inputs read and
outputs written, and the float64 copy torch.linalg.vector_norm(dtype=float64) makes of its
input; other temporaries an op makes inside itself are not seen, so this is a floor). A
compiled call counts as one pass over the tensors it is given (read, or written where it
copies into one): each function in fused.py is one reduction over its inputs (on the CPU,
TORCH_LOGS=output_code shows one generated kernel per call). Then the totals for the GPU
benchmark's transformer (benchmarks/overhead_gpu.py), whose recorded tensors are sized on the
meta device, and the time they take at a bandwidth (an H100's 3.35 TB/s by default).

    python benchmarks/traffic.py [--bandwidth 3.35e12]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

import gradscope as gs  # noqa: E402
from benchmarks.overhead_gpu import gpu_suite_models  # noqa: E402
from gradscope.recorder.stats import flat, fused  # noqa: E402
from gradscope.recorder.stats.backends import TorchBackend  # noqa: E402


def _nbytes(value: Any) -> int:
    leaves = torch.utils._pytree.tree_leaves(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class ByteCounter(TorchDispatchMode):
    """Bytes each op reads and writes: its tensor inputs read, its outputs written; an
    argument it changes in place is read and written (only written by copies and `out=`)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        copies = func.overloadpacket.__name__ in ("copy_", "_foreach_copy_")
        given = dict(zip((a.name for a in func._schema.arguments), args, strict=False))
        given.update(kwargs)
        changed = 0
        for arg in func._schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write and arg.name in given:
                changed += 1
                size = _nbytes(given.pop(arg.name))
                self.bytes += size if copies or arg.name == "out" else 2 * size
        self.bytes += _nbytes(given) + (0 if changed else _nbytes(out))
        dtype = kwargs.get("dtype")
        x = args[0] if args else None
        if func.overloadpacket.__name__ == "linalg_vector_norm" and dtype not in (None, x.dtype):
            # it casts its input to `dtype` first (a copy written and read): its documented
            # behaviour, in make_reduction, on every device
            self.bytes += 2 * x.numel() * torch.empty((), dtype=dtype).element_size()
        return out


@contextlib.contextmanager
def counted(on: bool) -> Iterator[ByteCounter]:
    """Counts the bytes under it; with the fused statistics `on`, each compiled call counts
    as one pass over the tensors it is given (its ops are run without being counted)."""
    counter = ByteCounter()
    original = fused.call

    def call(fn: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        tensors = [a for a in (x, *args) if isinstance(a, torch.Tensor)]
        counter.bytes += _nbytes(tensors)
        with torch.utils._python_dispatch._disable_current_modes():
            return fn(x, *args)

    if on:
        fused.call = call  # type: ignore[assignment]
    try:
        with counter:
            yield counter
    finally:
        fused.call = original  # type: ignore[assignment]


def per_output_value(on: bool) -> float:
    x = torch.randn(8, 512, 1024).bfloat16()
    backend = TorchBackend()
    backend._fused.devices = None if on else frozenset()
    shape = (8 * 512, 1024, 1)
    backend.moments(x, shape)  # the work buffers made
    backend.reset()
    with counted(on) as c:
        backend.moments(x, shape)
    return c.bytes / x.numel()


def per_grad_value(on: bool) -> float:
    g = torch.randn(8, 512, 1024).bfloat16()
    backend = TorchBackend()
    backend._fused.devices = None if on else frozenset()
    with counted(on) as c:
        backend.grad(g, 8)
    return c.bytes / g.numel()


@contextlib.contextmanager
def _made_as(on: bool, alone: bool) -> Iterator[None]:
    """FlatStats made under it: fused or not (as GRADSCOPE_FUSED=1 or 0 would have it), with
    every tensor read alone or as flat.ALONE has it."""
    setting, threshold = os.environ.get("GRADSCOPE_FUSED"), flat.ALONE
    os.environ["GRADSCOPE_FUSED"] = "1" if on else "0"
    flat.ALONE = 0 if alone else threshold
    try:
        yield
    finally:
        flat.ALONE = threshold
        if setting is None:
            del os.environ["GRADSCOPE_FUSED"]
        else:
            os.environ["GRADSCOPE_FUSED"] = setting


def per_parameter(on: bool, alone: bool = False) -> float:
    """A recorded step's parameter statistics (with the update and its dot with the
    gradient) over float32 parameters of a few sizes; with `alone`, the fused path's
    reading of large tensors where they are (flat.ALONE), used here for every size (its
    bytes per value do not depend on the size)."""
    torch.manual_seed(0)
    params = [torch.randn(512, 512) for _ in range(4)] + [torch.randn(512) for _ in range(8)]
    grads = [torch.randn_like(p) for p in params]
    with _made_as(on, alone):
        stats = flat.FlatStats(params)
    present = list(range(len(params)))
    stats.snapshot(present, grads, params)
    stats.after(params, True)
    with counted(on) as c:
        stats.snapshot(present, grads, params)
        stats.after(params, True)
    return c.bytes / sum(p.numel() for p in params)


def transformer_sizes() -> tuple[float, float, float, float]:
    """The GPU benchmark's transformer: output values and output-gradient values recorded
    in a step, parameters, and those of them in tensors the fused path reads alone
    (flat.ALONE); the recorded modules found by recording its small version."""
    (tiny_make, tiny_data), (make, _) = (
        next(iter(gpu_suite_models(t).values())) for t in (True, False)
    )
    model = tiny_make()
    x, y = tiny_data(torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    with gs.watch(model, optimizer=opt, every=1) as rec:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, -2), y.flatten()).backward()
        opt.step()
    frame = rec.to_frame()

    def pattern(name: str) -> str:
        return re.sub(r"blocks\.\d+", "blocks.N", name)

    outputs = {pattern(n) for n in frame[frame.kind == "activation"].layer}
    grads = {pattern(n) for n in frame[frame.kind == "activation_grad"].layer}
    with torch.device("meta"):
        big = make()
    names = {module: name for name, module in big.named_modules()}
    sizes: dict[str, int] = {}

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) else out
        sizes[names[module]] = sizes.get(names[module], 0) + t.numel()

    for module in names:
        module.register_forward_hook(hook)
    big(torch.zeros(8, 512, dtype=torch.long, device="meta"))
    out = sum(v for n, v in sizes.items() if pattern(n) in outputs)
    grad = sum(v for n, v in sizes.items() if pattern(n) in grads)
    sizes_of_params = [p.numel() for p in big.parameters()]
    alone = sum(n for n in sizes_of_params if n >= flat.ALONE)
    return out, grad, sum(sizes_of_params), alone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s")
    args = parser.parse_args()
    torch.set_num_threads(1)
    outputs, grads, params, alone = transformer_sizes()
    through_flat, read_alone = per_parameter(True), per_parameter(True, alone=True)
    fused_param = (alone * read_alone + (params - alone) * through_flat) / params
    rows = {
        False: (per_output_value(False), per_grad_value(False), per_parameter(False)),
        True: (per_output_value(True), per_grad_value(True), fused_param),
    }
    print(
        f"GPU benchmark transformer: {outputs / 1e9:.2f}G output values and "
        f"{grads / 1e9:.2f}G output-gradient values recorded a step, {params / 1e6:.0f}M "
        f"parameters ({alone / params:.0%} of them in tensors of {flat.ALONE:,} values or "
        "more, which the fused path reads alone)"
    )
    print(
        f"fused, bytes per parameter: {through_flat:.1f} through the flat buffers, "
        f"{read_alone:.1f} read alone"
    )
    print("(bytes per value of a bf16 output and output gradient, per float32 parameter)")
    print(f"{'path':<7} {'B/output value':>15} {'B/grad value':>13} {'B/parameter':>12} "
          f"{'GB a step':>10} {'ms at ' + format(args.bandwidth / 1e12, '.2f') + ' TB/s':>16}")  # fmt: skip
    for on, (per_out, per_grad, per_param) in rows.items():
        total = outputs * per_out + grads * per_grad + params * per_param
        print(
            f"{'fused' if on else 'eager':<7} {per_out:>15.1f} {per_grad:>13.1f} "
            f"{per_param:>12.1f} {total / 1e9:>10.1f} {total / args.bandwidth * 1e3:>16.1f}"
        )


if __name__ == "__main__":
    main()
