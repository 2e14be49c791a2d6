"""A small labelled set of short training runs for measuring repairs: healthy controls and runs
with one injected fault each, labelled by what was injected (never by what a tool says).

Each case builds its model and optimizer, its step and its batches; `control` names the
healthy run of the same architecture whose final loss a repair is measured against.
Used by benchmarks/repair.py when the fault benchmark's registry (benchmarks/faults/) is not
there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.lab.data import Dataset, load_dataset, subset, synthetic
from gradscope.lab.models import build_model, build_named

BATCH = 64


@dataclass
class Case:
    """One labelled run: `fault` is the injected cause ("healthy" for a control)."""

    name: str
    fault: str
    make: Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
    step: Callable[[nn.Module, torch.optim.Optimizer, Any], Any]
    batches: list[Any] = field(repr=False, default_factory=list)
    control: str | None = None
    steps: int = 200


def _data() -> Dataset:
    try:
        return subset(load_dataset("mnist"), 8192)
    except Exception:  # no MNIST here: the synthetic digits keep the set runnable
        return synthetic(n_train=8192)


def _batches(data: Dataset, n: int = 100, scale: float = 1.0, seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i = torch.randint(0, len(data.y_train), (BATCH,), generator=g)
        out.append((data.x_train[i] * scale, data.y_train[i]))
    return out


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
    """The usual step: zero, forward, backward, update."""
    opt.zero_grad(set_to_none=True)
    loss = _loss(model, batch)
    loss.backward()
    opt.step()
    return loss


def forgetful_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
    """The fault: no zero_grad, so gradients add up over steps."""
    loss = _loss(model, batch)
    loss.backward()
    opt.step()
    return loss


def accumulating_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
    """Intentional accumulation: two micro-batches, one update."""
    opt.zero_grad(set_to_none=True)
    x, y = batch
    half = len(y) // 2
    total = torch.zeros(())
    for part in (slice(0, half), slice(half, None)):
        loss = nn.functional.cross_entropy(model(x[part]), y[part]) / 2
        loss.backward()
        total = total + loss.detach()
    opt.step()
    return total


def _jumping_step() -> Callable[[nn.Module, torch.optim.Optimizer, Any], Any]:
    """The learning rate multiplied by 30 at step 100 (a bad schedule edit)."""

    def jumping(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
        # counted on the optimizer: each run steps its own copy (or its replacement)
        taken = opt.__dict__.setdefault("_case_steps", 0)
        opt.__dict__["_case_steps"] = taken + 1
        if taken == 100:
            for group in opt.param_groups:
                group["lr"] *= 30
        return step(model, opt, batch)

    return jumping


def _sgd(lr: float, momentum: float = 0.9) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)


def _pair(
    model: Callable[[], nn.Module], opt: Callable[[nn.Module], torch.optim.Optimizer]
) -> Callable[[], tuple[nn.Module, torch.optim.Optimizer]]:
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = model()
        return m, opt(m)

    return make


def _scaled(model: Callable[[], nn.Module], gain: float) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = model()
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 2:
                    p.mul_(gain)
        return m

    return build


def _dead_bias(model: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Hidden biases at -4 (a bad custom init): most ReLU units never fire."""

    def build() -> nn.Module:
        m = model()
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith("blocks") and name.endswith("bias"):
                    p.fill_(-4.0)
        return m

    return build


def _frozen_head_training(m: nn.Module) -> torch.optim.Optimizer:
    """Intentional freezing: the first layer is a fixed feature extractor."""
    for p in m.blocks[0].parameters():  # type: ignore[index]
        p.requires_grad_(False)
    return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def _head_only(m: nn.Module) -> torch.optim.Optimizer:
    """The fault: the optimizer was built over the head alone, the hidden layer forgotten."""
    return torch.optim.SGD(m.head.parameters(), lr=0.05, momentum=0.9)  # type: ignore[union-attr]


def cases() -> list[Case]:
    """The labelled runs, controls first."""
    data = _data()
    digits = _batches(data)
    raw = _batches(data, scale=255.0)  # unnormalized pixels (0-255)
    mlp = lambda: build_named("digit")  # noqa: E731
    tanh8 = lambda: build_model("plain", 8, 128, "tanh", "xavier")  # noqa: E731
    deep = lambda: build_model("plain", 24, 64, "relu", "kaiming")  # noqa: E731
    deep_sigmoid = lambda: build_model("plain", 24, 64, "sigmoid")  # noqa: E731
    adam = lambda lr: lambda m: torch.optim.Adam(m.parameters(), lr=lr)  # noqa: E731
    return [
        Case("mlp sgd", "healthy", _pair(mlp, _sgd(0.05)), step, digits),
        Case("mlp adam", "healthy", _pair(mlp, adam(1e-3)), step, digits),
        Case("tanh x8 xavier", "healthy", _pair(tanh8, _sgd(0.02)), step, digits),
        Case("relu x24 kaiming", "healthy", _pair(deep, _sgd(0.003)), step, digits),
        Case(
            "mlp frozen layer (intended)",
            "healthy",
            _pair(mlp, _frozen_head_training),
            step,
            digits,
        ),  # fmt: skip
        Case(
            "mlp accumulation (intended)",
            "healthy",
            _pair(mlp, _sgd(0.05)),
            accumulating_step,
            digits,
        ),  # fmt: skip
        Case("mlp lr 2.0", "lr_too_high", _pair(mlp, _sgd(2.0)), step, digits, "mlp sgd"),
        Case("mlp adam lr 0.1", "lr_too_high", _pair(mlp, adam(0.1)), step, digits, "mlp adam"),
        Case(
            "mlp lr x30 at 100",
            "lr_jump",
            _pair(mlp, _sgd(0.05)),
            _jumping_step(),
            digits,
            "mlp sgd",
        ),  # fmt: skip
        Case(
            "mlp no zero_grad",
            "not_zeroed",
            _pair(mlp, _sgd(0.05)),
            forgetful_step,
            digits,
            "mlp sgd",
        ),  # fmt: skip
        Case("mlp lr 0", "lr_zero", _pair(mlp, _sgd(0.0)), step, digits, "mlp sgd"),
        Case(
            "mlp hidden layer not in optimizer",
            "not_in_optimizer",
            _pair(mlp, _head_only),
            step,
            digits,
            "mlp sgd",
        ),  # fmt: skip
        Case(
            "mlp dead biases",
            "dead_relu",
            _pair(_dead_bias(mlp), _sgd(0.05)),
            step,
            digits,
            "mlp sgd",
        ),  # fmt: skip
        Case(
            "tanh x8 gain x3",
            "exploding_init",
            _pair(_scaled(tanh8, 3.0), _sgd(0.02)),
            step,
            digits,
            "tanh x8 xavier",
        ),  # fmt: skip
        Case(
            "tanh x8 raw pixels",
            "unnormalized_inputs",
            _pair(tanh8, _sgd(0.02)),
            step,
            raw,
            "tanh x8 xavier",
        ),  # fmt: skip
        Case(
            "relu x24 init x0.5",
            "vanishing",
            _pair(_scaled(deep, 0.5), _sgd(0.003)),
            step,
            digits,
            "relu x24 kaiming",
        ),  # fmt: skip
        Case(
            "sigmoid x24 default init",
            "vanishing",
            _pair(deep_sigmoid, _sgd(0.003)),
            step,
            digits,
            "relu x24 kaiming",
        ),  # fmt: skip
    ]
