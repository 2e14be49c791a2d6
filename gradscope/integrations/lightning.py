"""A Lightning Callback: records the LightningModule's network during `trainer.fit`, logs the
loss and the headline scalars of each recorded step (at that step) to the trainer's
loggers, and keeps the run folder current while it trains (every `save_every` recorded
steps, whole at the end).

Example:
    >>> from gradscope.integrations.lightning import GradscopeCallback
    >>> cb = GradscopeCallback("runs/fit-1", every=10)  # Trainer(callbacks=[cb])
    >>> # while it trains: gradscope report runs/fit-1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from gradscope.integrations.folder import DEFAULT_SAVE_EVERY, clear_earlier_run, folder_options
from gradscope.integrations.headline import NewHeadlines
from gradscope.recorder import Recorder


def network_of(pl_module: nn.Module) -> nn.Module:
    """The module to watch: the one direct child holding every trainable parameter (the
    network a LightningModule wraps as `self.model`), so layers are named as in a plain
    loop (`0.weight`, not `model.0.weight`); else the LightningModule itself."""
    params = {id(p) for p in pl_module.parameters() if p.requires_grad}
    if not params:
        return pl_module
    holders = [
        child
        for child in pl_module.children()
        if params <= {id(p) for p in child.parameters() if p.requires_grad}
    ]
    return holders[0] if len(holders) == 1 else pl_module


class GradscopeCallback(pl.Callback):
    """Attaches a Recorder at fit start (the optimizer Lightning builds is found by its
    step hooks), logs the loss of each recorded step as the scalar "loss" and its headlines
    at that step, detaches and saves at fit end.

    Args:
        out: the run folder to save (frame.parquet, run.json, report.html); None saves none.
        every, **recorder_kwargs: as for gradscope.Recorder.
        save_every: while training, the rows recorded so far are added to `out` as a Parquet
            part every this many recorded steps (and at least every minute), so `gradscope
            report out` and `gradscope.load_run` read the run while it trains or after it was
            killed (see gradscope.integrations.folder); None writes `out` only at fit end.
        unwrap: watch the network the LightningModule wraps (see `network_of`) rather than
            the LightningModule, so its layer names match the same network's in a plain loop.
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | None = None,
        every: int = 1,
        unwrap: bool = True,
        save_every: int | None = DEFAULT_SAVE_EVERY,
        **recorder_kwargs: Any,
    ) -> None:
        self.out = Path(out) if out is not None else None
        self.unwrap = unwrap
        kwargs = folder_options(self.out, save_every, recorder_kwargs)
        self.recorder = Recorder(every=every, **kwargs)
        self._new_headlines = NewHeadlines()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.recorder.attached:
            if trainer.is_global_zero:
                clear_earlier_run(self.recorder)
            self.recorder.attach(network_of(pl_module) if self.unwrap else pl_module)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # before the optimizer closes the step, so the loss lands on the step it belongs to
        # (a tensor kept on the device: no sync here)
        self.recorder.log_scalar("loss", loss)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        metrics = self._new_headlines(self.recorder)
        if metrics is None:
            return
        # the recorded step, not trainer.global_step (already one further after the update)
        step = self._new_headlines.step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.detach()
        if self.out is not None and trainer.is_global_zero:
            self.recorder.save(self.out)
