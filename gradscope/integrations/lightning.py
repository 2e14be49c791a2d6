"""A Lightning Callback: records the LightningModule during `trainer.fit`, logs the headline
scalars of each recorded step to the trainer's loggers, and saves the run folder at the end.

Example:
    >>> from gradscope.integrations.lightning import GradscopeCallback
    >>> cb = GradscopeCallback("runs/fit-1", every=10)  # Trainer(callbacks=[cb])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from gradscope.integrations.headline import NewHeadlines
from gradscope.recorder import Recorder


class GradscopeCallback(pl.Callback):
    """Attaches a Recorder at fit start (the optimizer Lightning builds is found by its
    step hooks), logs headlines after each recorded step, detaches and saves at fit end.

    Args:
        out: the run folder to save (frame.parquet, run.json, report.html); None saves none.
        every, **recorder_kwargs: as for gradscope.Recorder.
    """

    def __init__(
        self, out: str | os.PathLike[str] | None = None, every: int = 1, **recorder_kwargs: Any
    ) -> None:
        self.out = Path(out) if out is not None else None
        self.recorder = Recorder(every=every, **recorder_kwargs)
        self._new_headlines = NewHeadlines()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.recorder.attached:
            self.recorder.attach(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        metrics = self._new_headlines(self.recorder)
        if metrics is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.detach()
        if self.out is not None and trainer.is_global_zero:
            self.recorder.save(self.out)
