"""Reference frames of representative recordings on every statistics path, and the check that
a later tree records exactly the same frames ("behaviour unchanged" for refactors).

    python tools/stats_reference.py write /tmp/stats-ref      # on the tree before a change
    python tools/stats_reference.py check /tmp/stats-ref      # on the tree after it
    python tools/stats_reference.py paths /tmp/stats-ref      # each path against the kernels

Each run is recorded in child processes: with the C kernels, with eager torch ops
(GRADSCOPE_NATIVE=0 GRADSCOPE_FUSED=0) and with the compiled torch ops GPUs use
(GRADSCOPE_NATIVE=0 GRADSCOPE_FUSED=1), through the flat buffers and with every parameter read
alone (as GPUs read large ones). `check` compares every frame with the stored one: the
same rows in the same order and exactly equal values (NaN equal to NaN); a path the reference
lacks is reported and skipped. Rows of statistics a tree adds (stats not in the reference)
are reported and left out of the comparison, so that a new statistic does not hide a change
in the old ones. `paths` prints how far each path's values lie from the kernels' (exact in
float64).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

ALONE_SETTING = "STATS_REFERENCE_ALONE"  # this tool's: flat.ALONE in the child
PATHS = {
    "kernels": {"GRADSCOPE_NATIVE": "1"},
    "torch": {"GRADSCOPE_NATIVE": "0", "GRADSCOPE_FUSED": "0"},
    "fused": {"GRADSCOPE_NATIVE": "0", "GRADSCOPE_FUSED": "1"},
    # every parameter read alone, as the fused path reads large ones (flat.ALONE)
    "fused-alone": {"GRADSCOPE_NATIVE": "0", "GRADSCOPE_FUSED": "1", ALONE_SETTING: "0"},
}


def _mlp() -> tuple[nn.Module, torch.optim.Optimizer, int]:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.Tanh(),
        nn.Linear(64, 10),
    )  # fmt: skip
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), 32


def _deep_plain() -> tuple[nn.Module, torch.optim.Optimizer, int]:
    from gradscope.lab.models import build_model

    model = build_model("plain", depth=100, width=64)  # default init: subnormal gradients
    return model, torch.optim.SGD(model.parameters(), lr=0.1), 16


def _preln() -> tuple[nn.Module, torch.optim.Optimizer, int]:
    from gradscope.lab.models import build_model

    model = build_model("preln", depth=6, width=64)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), 16


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.seq = nn.Conv1d(16, 4, 3, padding=1)  # a 1-d convolution over the flattened rows
        self.relu3 = nn.ReLU()
        self.head = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.seq(x.flatten(2)))
        return self.head(x.flatten(1))


def _cnn() -> tuple[nn.Module, torch.optim.Optimizer, int]:
    model = _CNN()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 16


def _compiled() -> tuple[nn.Module, torch.optim.Optimizer, int]:
    model = nn.Sequential(
        nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return torch.compile(model, backend="aot_eager"), opt, 32  # type: ignore[return-value]


RUNS = {
    "mlp": _mlp,
    "deep_plain": _deep_plain,
    "preln": _preln,
    "cnn": _cnn,
    "compiled": _compiled,
}
STEPS = 3


def record(name: str) -> pd.DataFrame:
    """The frame of run `name`: STEPS recorded steps, the last with two micro-batches."""
    import gradscope as gs

    torch.manual_seed(0)
    model, opt, batch = RUNS[name]()
    gen = torch.Generator().manual_seed(1)
    with gs.watch(model, optimizer=opt, every=1) as rec:
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            for _ in range(2 if step == STEPS - 1 else 1):
                x = torch.randn(batch, 784, generator=gen)
                y = torch.randint(0, 10, (batch,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                rec.log_scalar("loss", loss)
            opt.step()
    return rec.to_frame()


def _child(out: Path) -> None:
    if ALONE_SETTING in os.environ:
        from gradscope.recorder.stats import flat

        flat.ALONE = int(os.environ[ALONE_SETTING])
    out.mkdir(parents=True, exist_ok=True)
    for name in RUNS:
        record(name).to_parquet(out / f"{name}.parquet")


def _run_children(out: Path) -> None:
    for path, flags in PATHS.items():
        env = {**os.environ, **flags}
        subprocess.run([sys.executable, __file__, "child", str(out / path)], env=env, check=True)


def _compare(ref: pd.DataFrame, new: pd.DataFrame) -> str | None:
    added = sorted(set(new["stat"]) - set(ref["stat"]))
    if added:
        new = new[~new["stat"].isin(added)].reset_index(drop=True)
    if len(ref) != len(new):
        return f"{len(new)} rows, reference {len(ref)}"
    for col in ("step", "layer", "kind", "stat"):
        if not (ref[col].astype(str).to_numpy() == new[col].astype(str).to_numpy()).all():
            return f"column {col} differs"
    a, b = ref["value"].to_numpy(), new["value"].to_numpy()
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if not same.all():
        i = int(np.argmax(~same))
        row = ref.iloc[i]
        return (
            f"{int((~same).sum())} values differ, first {row['layer']} {row['kind']} "
            f"{row['stat']} step {row['step']}: {a[i]!r} vs {b[i]!r}"
        )
    return None


def _paths(folder: Path) -> None:
    """Each path's values against the kernels': how many differ, by how much (relative)."""
    print(f"{'run':11} {'path':11} {'rows':>6} {'differ':>7} {'median':>8} {'max':>8}")
    for name in RUNS:
        kernels = pd.read_parquet(folder / "kernels" / f"{name}.parquet")["value"].to_numpy()
        for path in PATHS:
            if path == "kernels" or not (folder / path).exists():
                continue
            values = pd.read_parquet(folder / path / f"{name}.parquet")["value"].to_numpy()
            if len(values) != len(kernels):
                print(f"{name:11} {path:11} {len(values)} rows, the kernels {len(kernels)}")
                continue
            both = ~(np.isnan(kernels) & np.isnan(values))
            a, b = kernels[both], values[both]
            rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-300)
            differ = rel[rel > 0]
            median = float(np.median(differ)) if len(differ) else 0.0
            print(
                f"{name:11} {path:11} {len(kernels):6} {len(differ):7} {median:8.1e} "
                f"{float(rel.max()) if len(rel) else 0.0:8.1e}"
            )


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check", "child", "paths"):
        print(__doc__)
        return 2
    what, folder = argv[0], Path(argv[1])
    if what == "child":
        _child(folder)
        return 0
    if what == "paths":
        _paths(folder)
        return 0
    if what == "write":
        _run_children(folder)
        print(f"references written to {folder}")
        return 0
    fresh = folder.with_name(folder.name + "-new")
    _run_children(fresh)
    failures = 0
    for path in PATHS:
        if not (folder / path).exists():
            print(f"{path:8} no reference (written by an older tree): skipped")
            continue
        for name in RUNS:
            ref = pd.read_parquet(folder / path / f"{name}.parquet")
            new = pd.read_parquet(fresh / path / f"{name}.parquet")
            added = sorted(set(new["stat"]) - set(ref["stat"]))
            problem = _compare(ref, new)
            failures += problem is not None
            extra = f" (new stats left out: {', '.join(added)})" if added else ""
            print(f"{path:8} {name:11} {len(ref):5} rows: {problem or 'identical'}{extra}")
    print("all frames identical" if not failures else f"{failures} frames differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
