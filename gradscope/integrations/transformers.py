"""A transformers TrainerCallback: records the model during `Trainer.train()`, adds the
headline scalars of each recorded step to the Trainer's logs (and log history), and saves
the run folder at the end.

Example:
    >>> from gradscope.integrations.transformers import GradscopeTrainerCallback
    >>> cb = GradscopeTrainerCallback("runs/train-1", every=10)  # Trainer(callbacks=[cb])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gradscope.integrations.headline import NewHeadlines
from gradscope.recorder import Recorder


class GradscopeTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Attaches a Recorder at train begin (the optimizer the Trainer builds is found by its
    step hooks); headlines go into `state.log_history` at each recorded step and into the
    next logs the Trainer reports; detaches and saves the run folder at train end.

    Args:
        out: the run folder to save; None saves none.
        every, **recorder_kwargs: as for gradscope.Recorder.
    """

    def __init__(
        self, out: str | os.PathLike[str] | None = None, every: int = 1, **recorder_kwargs: Any
    ) -> None:
        self.out = Path(out) if out is not None else None
        self.recorder = Recorder(every=every, **recorder_kwargs)
        self._new_headlines = NewHeadlines()
        self._latest: dict[str, float] = {}

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        if model is not None and not self.recorder.attached:
            self.recorder.attach(model)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        metrics = self._new_headlines(self.recorder)
        if metrics is None:
            return
        self._latest = metrics
        state.log_history.append({**self._latest, "step": state.global_step})

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs is not None and self._latest:
            logs.update(self._latest)  # reporters called after this callback see them too

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.recorder.detach()
        if self.out is not None and state.is_world_process_zero:
            self.recorder.save(self.out)
