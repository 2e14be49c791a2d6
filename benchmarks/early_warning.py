"""Early warning: scripted training failures, recorded every step, and when each verdict
fires against when the loss breaks.

For each scenario (fixed seeds) it prints the step each warning/error verdict first fires,
the step the loss first goes non-finite or jumps 10x above its trailing median (the "loss
event"), the step the top-ranked root cause says the trouble began and its lead over the
loss event, and the cause with the layer it names. The instability rules must stay quiet on
the plain deep stack (vanishing from the start, no spike) and the healthy run.

    python benchmarks/early_warning.py [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import gradscope as gs
from gradscope.lab.data import DataError, load_dataset, synthetic
from gradscope.lab.models import build_model, build_named

STEPS = 120
EVENT_AT = 60  # the step where a scripted failure starts


@dataclass
class Scenario:
    name: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    lr_jump: bool = False  # lr x50 from EVENT_AT on
    corrupt: bool = False  # inputs x1e4 on the batch of EVENT_AT
    sequence: bool = False  # the transformer's token task instead of digits


class _TinyTransformer(nn.Module):
    """Embedding -> nn.TransformerEncoder (Post-LN layers) -> classifier of the first token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(64, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids))[:, 0])


def _scenarios() -> list[Scenario]:
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)  # noqa: E731
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)  # noqa: E731
    adam3 = lambda m: torch.optim.Adam(m.parameters(), lr=3e-3)  # noqa: E731
    return [
        Scenario("Pre-LN x10, lr x50 at 60", lambda: build_model("preln", 10), sgd, lr_jump=True),
        Scenario("transformer, lr x50 at 60", _TinyTransformer, adam, lr_jump=True, sequence=True),
        # (a Pre-LN stack does not mind: its LayerNorms undo any input scale)
        Scenario("digit MLP, batch x1e4 at 60", lambda: build_named("digit"), sgd, corrupt=True),
        Scenario("Post-LN x50, Adam 3e-3, no warm-up", lambda: build_model("postln", 50), adam3),
        Scenario("plain x30 (vanishing, no spike)", lambda: build_model("plain", 30), sgd),
        Scenario("Pre-LN x10 (healthy)", lambda: build_model("preln", 10), sgd),
    ]


def _batches(data, sequence: bool, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        if sequence:  # the class of a sequence: the sum of its tokens mod 16
            ids = torch.randint(0, 16, (64, 8), generator=g)
            yield ids, ids.sum(1) % 16
        else:
            i = torch.randint(0, len(data.y_train), (64,), generator=g)
            yield data.x_train[i], data.y_train[i]


def loss_event(losses: list[float]) -> int | None:
    """The first step whose loss is non-finite or 10x its trailing median (20 steps)."""
    for t, loss in enumerate(losses):
        if not math.isfinite(loss):
            return t
        if t >= 8 and loss > 10 * float(np.median(losses[max(0, t - 20) : t])):
            return t
    return None


def run(scenario: Scenario, data, seed: int = 0) -> dict[str, object]:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = scenario.model()
    opt = scenario.optimizer(model)
    losses = []
    with gs.watch(model, optimizer=opt, every=1) as rec:
        for t, (x, y) in enumerate(_batches(data, scenario.sequence, seed)):
            if scenario.lr_jump and t == EVENT_AT:
                for group in opt.param_groups:
                    group["lr"] *= 50
            if scenario.corrupt and t == EVENT_AT:
                x = x * 1e4
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            rec.log_scalar("loss", loss)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                break
            loss.backward()
            opt.step()
    verdicts = gs.diagnose(rec.to_frame())
    event = loss_event(losses)
    fired = {v.id: v.first_step for v in verdicts if v.severity in ("warning", "error")}
    # the root cause ranked first, and the step it says the trouble began
    top = next((v for v in verdicts if v.severity in ("warning", "error")), None)
    return {
        "fired": fired,
        "loss_event": event,
        "spike_step": top.first_step if top else None,
        "lead": (event - top.first_step)
        if top and top.first_step is not None and event is not None
        else None,
        "layer": top.layers[0] if top and top.layers else None,
        "statistic": str(top.id) if top else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    try:
        data = load_dataset("mnist", args.data_root)
        source = "MNIST"
    except DataError:
        data, source = synthetic(4096, 512), "synthetic digits (MNIST not found)"
    print(f"{STEPS} steps, batch 64, recorded every step; data: {source}\n")
    header = f"{'scenario':<34} {'loss event':>10} {'warned':>6} {'lead':>5}  root cause (layer)"
    print(header)
    rows = []
    for scenario in _scenarios():
        result = run(scenario, data)
        rows.append((scenario.name, result))
        layer = f"{result['statistic']} ({result['layer'] or '-'})" if result["statistic"] else "-"
        print(
            f"{scenario.name:<34} {_s(result['loss_event']):>10} {_s(result['spike_step']):>6} "
            f"{_s(result['lead']):>5}  {layer}"
        )
    print("\nverdicts (warning/error) and the step each first holds from:")
    for name, result in rows:
        fired = ", ".join(f"{k}@{v}" for k, v in result["fired"].items()) or "none"  # type: ignore[attr-defined]
        print(f"  {name}: {fired}")


def _s(value: object) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    main()
