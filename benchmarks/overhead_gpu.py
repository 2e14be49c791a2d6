"""The GPU suite of benchmarks/overhead.py (`--device cuda`): a Pre-LN transformer of width
1024 and a ResNet-style CNN under bf16 autocast, bare and recorded blocks alternated."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradscope as gs
from benchmarks.call_ops import print_ops_per_call

STEPS = 10  # steps per timed block


class Transformer(nn.Module):
    """A Pre-LN language model: embedding, `depth` encoder blocks, head."""

    def __init__(self, width: int, depth: int, heads: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.down(x))


class ResNet(nn.Module):
    """ResNet-18's shape: a stem, four stages of two basic blocks, pooling, a linear head."""

    def __init__(self, width: int, classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        chans = [width, 2 * width, 4 * width, 8 * width]
        blocks, cin = [], width
        for i, c in enumerate(chans):
            for j in range(2):
                blocks.append(BasicBlock(cin, c, 2 if i and not j else 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def gpu_suite_models(tiny: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable]]:  # type: ignore[type-arg]
    """name: (model, batch maker(device) -> (inputs, targets))."""
    width, depth, seq, batch, vocab = (64, 2, 32, 2, 256) if tiny else (1024, 24, 512, 8, 8192)
    cnn_width, side, cnn_batch = (8, 16, 4) if tiny else (64, 64, 128)

    def tokens(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
        return x[:, :-1], x[:, 1:]

    def images(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(cnn_batch, 3, side, side, generator=gen).to(device)
        return x, torch.randint(0, 100, (cnn_batch,), generator=gen).to(device)

    return {
        f"transformer (width {width}, {depth} layers, seq {seq}, batch {batch})": (
            lambda: Transformer(width, depth, heads=max(1, width // 64), vocab=vocab),
            tokens,
        ),
        f"resnet (width {cnn_width}, {side}x{side}, batch {cnn_batch})": (
            lambda: ResNet(cnn_width),
            images,
        ),
    }


GPU_LOOPS: dict[str, Callable[[nn.Module, torch.optim.Optimizer], object]] = {
    "bare": lambda m, o: None,
    "everything, every 1": lambda m, o: gs.watch(m, optimizer=o, every=1),
    "everything, every 10": lambda m, o: gs.watch(m, optimizer=o, every=10),
}


def gpu_loop(
    make: Callable[[], nn.Module],
    data: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]],
    setup: Callable[[nn.Module, torch.optim.Optimizer], object],
    device: torch.device,
    compiled: bool,
):  # type: ignore[no-untyped-def]
    """Timed blocks of STEPS steps under bf16 autocast, synchronized at the block's end only.
    `run.host` keeps each block's time to the sync a step (the host's time to queue the
    step; near the whole time where the host, not the device, bounds it, or where the
    device's queue is full)."""
    torch.manual_seed(0)
    model = make().to(device)
    call = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = data(device)
    keep = setup(call, opt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = call(x)
                loss = nn.functional.cross_entropy(out.flatten(0, -2).float(), y.flatten())
            loss.backward()
            opt.step()
        run.host.append((time.perf_counter() - start) / STEPS)  # type: ignore[attr-defined]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / STEPS

    run.keep = keep  # type: ignore[attr-defined]
    run.host = []  # type: ignore[attr-defined]
    return run


def measure_gpu(
    device: torch.device, repeats: int, tiny: bool, modes: tuple[bool, ...] = (False, True)
) -> list[str]:
    """The GPU suite, eager (False) and compiled (True) as `modes` says; returns the printed
    lines."""
    lines = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines.append(f"device: {name}; torch {torch.__version__}; {STEPS} steps a block")
    print(lines[0], flush=True)
    lines.append(print_ops_per_call())
    for model_name, (make, data) in gpu_suite_models(tiny).items():
        for compiled in modes:
            loops = {
                loop: gpu_loop(make, data, setup, device, compiled)
                for loop, setup in GPU_LOOPS.items()
            }
            first = {loop: run() * STEPS for loop, run in loops.items()}  # compiles
            for run in loops.values():
                run()  # warm-up
                run.host.clear()  # type: ignore[attr-defined]
            ratios: dict[str, list[float]] = {loop: [] for loop in loops if loop != "bare"}
            bare_times: list[float] = []
            bare = loops["bare"]
            for _ in range(repeats):
                before = bare()
                bare_times.append(before)
                for loop in ratios:
                    took, after = loops[loop](), bare()
                    ratios[loop].append(took / ((before + after) / 2))
                    bare_times.append(after)
                    before = after
            mode = "torch.compile" if compiled else "eager"
            host = {loop: statistics.median(run.host) for loop, run in loops.items()}  # type: ignore[attr-defined]
            lines.append(
                f"\n{model_name}, {mode}: bare {statistics.median(bare_times) * 1e3:.2f} ms/step "
                f"(host {host['bare'] * 1e3:.2f} ms/step to the block's sync); first block "
                + ", ".join(f"{loop} {took:.1f} s" for loop, took in first.items())
            )
            targets = {"everything, every 1": 1.05, "everything, every 10": 1.01}
            for loop, values in ratios.items():
                q1, _, q3 = (
                    statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
                )
                ratio = statistics.median(values)
                target = targets[loop] if model_name.startswith("transformer") else None
                verdict = (
                    ""
                    if target is None
                    else f"  target <= {target}: {'ok' if ratio <= target else 'MISSED'}"
                )
                lines.append(
                    f"  {loop:<22} median ratio {ratio:.3f} (middle half {q1:.3f}-{q3:.3f}); "
                    f"host {host[loop] * 1e3:.2f} ms/step{verdict}"
                )
            for loop, run in loops.items():
                keep = run.keep  # type: ignore[attr-defined]
                if isinstance(keep, gs.Recorder):  # each recorder recorded what it was asked to
                    kinds = set(keep.to_frame()["kind"])
                    assert {"activation", "activation_grad", "param_grad"} <= kinds, (loop, kinds)
            for line in lines[-(len(ratios) + 1) :]:
                print(line, flush=True)
    return lines
