"""The model zoo: deep stacks for 28x28 digits by variant and depth, and the classic classifiers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from gradscope.lab.choices import Activation, Classic, Init, Variant

IN_FEATURES = 28 * 28
NUM_CLASSES = 10


def _parse(enum: type[StrEnum], value: str, what: str) -> StrEnum:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise ValueError(f"unknown {what} {value!r}; choose one of {choices}") from None


def parse_variant(value: str) -> Variant:
    return Variant(_parse(Variant, value, "variant"))


_ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.TANH: nn.Tanh,
    Activation.SIGMOID: nn.Sigmoid,
    Activation.GELU: nn.GELU,
}
_GAIN_NAME: dict[Activation, Any] = {
    Activation.RELU: "relu",
    Activation.GELU: "relu",
    Activation.TANH: "tanh",
    Activation.SIGMOID: "sigmoid",
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a zoo model; `build_model(**asdict(cfg))` rebuilds it."""

    variant: str
    depth: int
    width: int = 128
    activation: str = "relu"
    init: str = "default"
    dropout: float = 0.0


class PlainLayer(nn.Module):
    """Linear -> activation (-> dropout)."""

    def __init__(self, d_in: int, d_out: int, act: type[nn.Module], dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.act = act()
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc(x))
        return self.drop(x) if self.drop is not None else x


class ResidualBlock(nn.Module):
    """The transformer feed-forward branch added to the stream, with optional pre/post norm."""

    def __init__(
        self,
        width: int,
        act: type[nn.Module],
        norm: nn.Module | None,
        post_norm: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.post_norm = post_norm
        self.fc1 = nn.Linear(width, width)
        self.act = act()
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.norm is None or self.post_norm else self.norm(x)
        h = self.fc2(self.act(self.fc1(h)))
        if self.drop is not None:
            h = self.drop(h)
        x = x + h
        return self.norm(x) if self.norm is not None and self.post_norm else x


class ZooModel(nn.Module):
    """input projection (`embed`) -> `blocks` -> optional final `norm` -> `head`."""

    def __init__(
        self,
        embed: nn.Module | None,
        blocks: nn.ModuleList,
        norm: nn.Module | None,
        head: nn.Linear,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = blocks
        self.norm = norm
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x)


def _make_norm(variant: Variant, width: int) -> nn.Module | None:
    if variant in (Variant.PRELN, Variant.POSTLN):
        return nn.LayerNorm(width)
    if variant == Variant.RMSNORM:
        return nn.RMSNorm(width)
    if variant == Variant.BATCHNORM:
        return nn.BatchNorm1d(width)
    return None


def init_weights(model: nn.Module, init: str, activation: str = "relu") -> None:
    """Re-initializes every nn.Linear (norm layers keep their ones and zeros)."""
    how = Init(_parse(Init, init, "init"))
    if how == Init.DEFAULT:
        return
    gain_name = _GAIN_NAME[Activation(_parse(Activation, activation, "activation"))]
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue
        if how == Init.KAIMING:
            nn.init.kaiming_normal_(m.weight, nonlinearity=gain_name)
        elif how == Init.XAVIER:
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain(gain_name))
        else:
            nn.init.orthogonal_(m.weight, gain=nn.init.calculate_gain(gain_name))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(
    variant: str,
    depth: int,
    width: int = 128,
    activation: str = "relu",
    init: str = "default",
    dropout: float = 0.0,
) -> nn.Module:
    """Builds a zoo classifier for 28x28 inputs and 10 classes.

    Depth counts hidden layers for `plain` and residual blocks for the others. Residual blocks
    carry the transformer feed-forward branch (fc1 -> activation -> fc2, width -> width).
    Module names are stable: `blocks.17.fc1`, `blocks.17.norm`, `embed`, `norm`, `head`.

    Example:
        >>> model = build_model("preln", depth=4)
        >>> model(torch.zeros(2, 784)).shape
        torch.Size([2, 10])
    """
    kind = parse_variant(variant)
    act = _ACTIVATIONS[Activation(_parse(Activation, activation, "activation"))]
    _parse(Init, init, "init")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    if not 0.0 <= dropout < 1.0 or math.isnan(dropout):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    if kind == Variant.PLAIN:
        layers = [
            PlainLayer(IN_FEATURES if i == 0 else width, width, act, dropout) for i in range(depth)
        ]
        model = ZooModel(None, nn.ModuleList(layers), None, nn.Linear(width, NUM_CLASSES))
    else:
        post = kind == Variant.POSTLN
        blocks = [
            ResidualBlock(width, act, _make_norm(kind, width), post, dropout) for _ in range(depth)
        ]
        final = None if kind in (Variant.RESIDUAL, Variant.POSTLN) else _make_norm(kind, width)
        model = ZooModel(
            nn.Linear(IN_FEATURES, width),
            nn.ModuleList(blocks),
            final,
            nn.Linear(width, NUM_CLASSES),
        )
    init_weights(model, init, activation)
    return model


class DeepDigitBlock(nn.Module):
    """The teaching text's Pre-LN block: x + Dropout(ReLU(Linear(LayerNorm(x))))."""

    def __init__(self, width: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.act(self.fc(self.norm(x))))


def build_classic(name: str) -> nn.Module:
    """Builds one of the teaching text's classifiers: digit, digit-dropout, deep-digit."""
    which = Classic(_parse(Classic, name, "model"))
    if which == Classic.DEEP_DIGIT:
        blocks = nn.ModuleList([DeepDigitBlock(128, 0.1) for _ in range(2)])
        return ZooModel(nn.Linear(IN_FEATURES, 128), blocks, None, nn.Linear(128, NUM_CLASSES))
    dropout = 0.2 if which == Classic.DIGIT_DROPOUT else 0.0
    layer = PlainLayer(IN_FEATURES, 128, nn.ReLU, dropout)
    return ZooModel(None, nn.ModuleList([layer]), None, nn.Linear(128, NUM_CLASSES))


def model_names() -> list[str]:
    """Every name `build_named` accepts: the classic classifiers, then the zoo variants."""
    return [c.value for c in Classic] + [v.value for v in Variant]


def build_named(
    name: str,
    depth: int = 8,
    width: int = 128,
    activation: str = "relu",
    init: str = "default",
    dropout: float = 0.0,
) -> nn.Module:
    """A classic classifier by name, or a zoo variant with the given shape."""
    if name in {c.value for c in Classic}:
        return build_classic(name)
    if name in {v.value for v in Variant}:
        return build_model(name, depth, width, activation, init, dropout)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")


def recorded_example(
    variant: str = "plain", depth: int = 4, width: int = 16, steps: int = 1, seed: int = 0
) -> Any:
    """A small zoo model watched for `steps` steps of random 784-wide inputs (each a backward
    of the outputs' sum, no update): a recording to try gradscope.plot's figures and the
    notebook summaries on. Returns the gradscope.Recorder, detached. The caller's random
    state is left as it was (the model and inputs come from `seed`).

    Example:
        >>> rec = recorded_example("preln", steps=2)
        >>> sorted(rec.to_frame()["step"].unique().tolist())
        [0, 1]
    """
    from gradscope.recorder import watch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(variant, depth, width=width)
        with watch(model) as rec:
            for _ in range(steps):
                model(torch.randn(8, 784)).sum().backward()
                rec.step()
    return rec
