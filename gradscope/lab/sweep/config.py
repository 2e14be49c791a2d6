"""A depth sweep's options, validated once (SweepConfig), and the runs they plan (RunSpec:
variant x depth x seed, each named by its run id)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradscope.lab.models import Variant, build_model
from gradscope.lab.train import TrainConfig

DEFAULT_VARIANTS = ("plain", "residual", "preln", "postln", "rmsnorm")
DEFAULT_DEPTH_COUNT = 6


class SweepError(ValueError):
    """A sweep configuration or output folder that cannot be used; the message says why."""


def default_depths(lo: int, hi: int, count: int = DEFAULT_DEPTH_COUNT) -> list[int]:
    """Log-spaced integer depths from lo to hi, both ends included.

    Example:
        >>> default_depths(2, 100)
        [2, 4, 10, 21, 46, 100]
    """
    if lo < 1 or hi < 1:
        raise SweepError(f"depths must be >= 1, got --min {lo} --max {hi}")
    if lo > hi:
        raise SweepError(f"--min ({lo}) is above --max ({hi})")
    points = np.geomspace(lo, hi, num=min(count, hi - lo + 1))
    return sorted({lo, hi, *(int(round(p)) for p in points)})


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep; saved as config.json so it can be rerun exactly."""

    depths: tuple[int, ...]
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    width: int = 128
    activation: str = "relu"
    init: str = "default"
    optimizer: str = "sgd"
    lr: float | None = None
    steps: int | None = 500
    epochs: int = 1
    batch_size: int = 128
    seeds: tuple[int, ...] = (0,)
    dataset: str = "mnist"
    every: int = 20
    eval_train_size: int = 2000

    def __post_init__(self) -> None:
        self.validate()  # a SweepConfig that exists is a usable one

    def validate(self) -> None:
        """Raises SweepError naming the first option that cannot be used."""
        if not self.depths or min(self.depths) < 1:
            raise SweepError(f"depths must be integers >= 1, got {list(self.depths)}")
        if not self.variants:
            raise SweepError("no variants given")
        for v in self.variants:
            if v not in {x.value for x in Variant}:
                choices = ", ".join(x.value for x in Variant)
                raise SweepError(f"unknown variant {v!r}; choose from {choices}")
        if self.every < 1:
            raise SweepError(f"every must be >= 1, got {self.every}")
        if not self.seeds:
            raise SweepError("no seeds given")
        if self.width < 1:
            raise SweepError(f"width must be >= 1, got {self.width}")
        try:
            self.train_config(0).validate()
            build_model(self.variants[0], 1, 1, self.activation, self.init)
        except ValueError as e:
            raise SweepError(str(e)) from None

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            optimizer=self.optimizer,
            lr=self.lr,
            epochs=self.epochs,
            steps=self.steps,
            batch_size=self.batch_size,
            seed=seed,
            eval_train_size=self.eval_train_size,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepConfig:
        data = dict(data)
        for key in ("depths", "variants", "seeds"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep; `run_id` names its files and its row everywhere."""

    variant: str
    depth: int
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.variant}-d{self.depth}-s{self.seed}"

    @classmethod
    def of(cls, row: Any) -> RunSpec:
        """The run of a row: a mapping (a run's JSON row) or a record (`itertuples()`)."""
        if isinstance(row, dict):
            return cls(str(row["variant"]), int(row["depth"]), int(row["seed"]))
        return cls(str(row.variant), int(row.depth), int(row.seed))


def plan_runs(config: SweepConfig) -> list[RunSpec]:
    """All runs, deepest first so that the long ones start early and the workers end together."""
    runs = [RunSpec(v, d, s) for v in config.variants for d in config.depths for s in config.seeds]
    return sorted(runs, key=lambda r: (-r.depth, config.variants.index(r.variant), r.seed))
