"""One instrumented, deterministic training run on in-memory tensors."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gradscope.lab.choices import OptimizerName, Schedule
from gradscope.lab.data import Dataset, iterate_batches, subset
from gradscope.recorder import Recorder

EVAL_BATCH = 5000


DEFAULT_LR = {OptimizerName.SGD: 0.05, OptimizerName.ADAM: 1e-3, OptimizerName.ADAMW: 1e-3}
ADAMW_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimizer and its settings, regularization, length, batch size, seed.

    `lr` defaults per optimizer (sgd 0.05, adam/adamw 1e-3); `weight_decay` defaults to
    0.01 for adamw and 0 otherwise. `steps`, when given, overrides `epochs`.
    """

    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    l1: float = 0.0
    # "penalty": l1 * sum|w| added to the loss (weights hover around zero, rarely exactly 0);
    # "proximal": after each update, soft-threshold weight matrices by lr * l1 (decoupled,
    # like AdamW's decay), which sets weights exactly to zero
    l1_mode: str = "penalty"
    schedule: str = "constant"
    clip: float | None = None
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 64
    train_size: int | None = None
    seed: int = 0
    eval_train_size: int = 10000  # train accuracy is measured on this many examples at most

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        for enum, value, what in (
            (OptimizerName, self.optimizer, "optimizer"),
            (Schedule, self.schedule, "schedule"),
        ):
            if value not in {e.value for e in enum}:
                choices = ", ".join(e.value for e in enum)
                raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")
        checks = [
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.l1 >= 0, f"l1 must be >= 0, got {self.l1}"),
            (
                self.l1_mode in ("penalty", "proximal"),
                f"l1 mode must be penalty or proximal, got {self.l1_mode!r}",
            ),
            (self.clip is None or self.clip > 0, f"clip must be > 0, got {self.clip}"),
            (
                self.train_size is None or self.train_size >= 1,
                f"train size must be >= 1, got {self.train_size}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[OptimizerName(self.optimizer)]

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return ADAMW_WEIGHT_DECAY if self.optimizer == OptimizerName.ADAMW else 0.0


@dataclass
class TrainResult:
    """What one run measured."""

    losses: list[float] = field(default_factory=list)  # per step, training batch loss
    preclip_norms: list[float] = field(default_factory=list)  # per step, when clipping
    train_acc: float = math.nan
    test_acc: float = math.nan
    train_loss: float = math.nan
    test_loss: float = math.nan
    steps: int = 0
    seconds: float = 0.0
    diverged: bool = False  # the loss became non-finite; training stopped there


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    name, lr, wd = OptimizerName(config.optimizer), config.resolved_lr, config.resolved_weight_decay
    if name == OptimizerName.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    if name == OptimizerName.ADAM:
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


@torch.no_grad()
def soft_threshold(weights: Sequence[torch.Tensor], amount: float) -> None:
    """The L1 proximal step: w <- sign(w) * max(|w| - amount, 0), in place."""
    for w in weights:
        w.copy_(w.sign() * (w.abs() - amount).clamp_(min=0.0))


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode: bool = False
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the model in eval mode (or, with `train_mode`, with
    dropout active, as a training loop sees it)."""
    was_training = model.training
    model.train(train_mode)
    correct, loss = 0, 0.0
    for start in range(0, len(y), EVAL_BATCH):
        logits = model(x[start : start + EVAL_BATCH])
        target = y[start : start + EVAL_BATCH]
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return correct / max(len(y), 1), loss / max(len(y), 1)


def _loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    if config.l1 > 0 and config.l1_mode == "penalty":
        loss = loss + config.l1 * sum(w.abs().sum() for w in weights)
    return loss


def total_steps(config: TrainConfig, n_train: int) -> int:
    return config.steps or config.epochs * math.ceil(n_train / config.batch_size)


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    recorder: Recorder | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Trains `model` on `data` with cross-entropy; bit-identical for a given seed on a CPU
    with one thread (``torch.set_num_threads(1)``, as each sweep run has). With more threads,
    torch's parallel reductions may round differently from run to run (~1e-7 relative).

    A recorder, if given, is attached to the model and optimizer for the run and detached at
    the end; the loss (and the pre-clip total norm) is logged into it. `progress(step, total,
    loss)` is called after every step.

    Example:
        >>> from gradscope.lab.data import synthetic
        >>> from gradscope.lab.models import build_model
        >>> r = train(build_model("preln", 2), synthetic(256, 64), TrainConfig(steps=5))
        >>> r.steps
        5
    """
    config.validate()
    start = time.perf_counter()
    torch.manual_seed(config.seed)  # dropout masks
    data = subset(data, config.train_size, config.seed)
    optimizer = make_optimizer(model, config)
    n_steps = total_steps(config, len(data.y_train))
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)
        if config.schedule == Schedule.COSINE
        else None
    )
    weights = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    if recorder is not None:
        recorder.attach(model, optimizer)
    model.train()
    try:
        step = 0
        while step < n_steps and not result.diverged:
            for x, y in iterate_batches(data.x_train, data.y_train, config.batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                loss = _loss(model, x, y, config, weights)
                value = float(loss.detach())
                if not math.isfinite(value) and recorder is not None and not recorder.recording:
                    # the step where training breaks is always recorded: rerun its forward
                    # (the weights have not moved) with the hooks armed, to locate the origin
                    recorder.record_now()
                    loss = _loss(model, x, y, config, weights)
                loss.backward()
                if recorder is not None:
                    recorder.log_scalar("loss", loss)
                if config.clip is not None:
                    norm = nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                    result.preclip_norms.append(float(norm))
                    if recorder is not None:
                        recorder.log_scalar("preclip_norm", norm)
                optimizer.step()
                if config.l1 > 0 and config.l1_mode == "proximal":
                    soft_threshold(weights, optimizer.param_groups[0]["lr"] * config.l1)
                if scheduler is not None:
                    scheduler.step()
                result.losses.append(value)
                step += 1
                if progress is not None:
                    progress(step, n_steps, value)
                if not math.isfinite(value):
                    result.diverged = True
                if step >= n_steps or result.diverged:
                    break
    finally:
        if recorder is not None:
            recorder.detach()
    result.steps = step
    n_eval = min(len(data.y_train), config.eval_train_size)
    result.train_acc, result.train_loss = evaluate(
        model, data.x_train[:n_eval], data.y_train[:n_eval]
    )
    result.test_acc, result.test_loss = evaluate(model, data.x_test, data.y_test)
    result.seconds = time.perf_counter() - start
    return result
