"""A transformers TrainerCallback: records the model during `Trainer.train()`, its loss and
the headline scalars of each recorded step on the recorder's step axis, and keeps the run
folder current while it trains (every `save_every` recorded steps, whole at the end).

Steps: the recorder numbers optimizer steps from 0 (micro-batches of a gradient accumulation
are one step), so its step k is the update after which the Trainer's `global_step` is k + 1
(the step the Trainer logs that update's loss and grad_norm at).

Example:
    >>> from gradscope.integrations.transformers import GradscopeTrainerCallback
    >>> cb = GradscopeTrainerCallback("runs/train-1", every=10)  # Trainer(callbacks=[cb])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

from gradscope.integrations.folder import DEFAULT_SAVE_EVERY, clear_earlier_run, folder_options
from gradscope.integrations.headline import NewHeadlines
from gradscope.recorder import Recorder

STEP_KEY = "gradscope/step"  # in the Trainer's logs: the recorded step the headlines are of


class GradscopeTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Attaches a Recorder at train begin (the optimizer the Trainer builds is found by its
    step hooks) and records the model's loss each step; the headlines of each recorded step
    go into `state.log_history` at the recorder's step, and into the next logs the Trainer
    reports (with `gradscope/step`, the recorded step they are of); detaches and saves the
    run folder at train end.

    The loss is the one the model returns (`outputs.loss`, as the Trainer's default
    `compute_loss` takes it), averaged over the micro-batches of a step (summed where the
    Trainer passes `num_items_in_batch`: the model then normalizes over the whole step), so
    it equals the loss the Trainer logs for that update. A loss the Trainer computes itself
    (label smoothing, `compute_loss_func`) is not in the outputs and is not recorded.

    Args:
        out: the run folder to save; None saves none.
        every, **recorder_kwargs: as for gradscope.Recorder.
        save_every: while training, the rows recorded so far are added to `out` every this
            many recorded steps (gradscope.integrations.folder); None writes `out` only at
            train end.
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | None = None,
        every: int = 1,
        save_every: int | None = DEFAULT_SAVE_EVERY,
        **recorder_kwargs: Any,
    ) -> None:
        self.out = Path(out) if out is not None else None
        kwargs = folder_options(self.out, save_every, recorder_kwargs)
        self.recorder = Recorder(every=every, **kwargs)
        self._new_headlines = NewHeadlines()
        self._unreported: dict[str, float] = {}
        self._loss: torch.Tensor | None = None  # summed over the step's micro-batches
        self._micro = 0
        self._summed = False  # the model normalized its loss over the whole step
        self._hook: RemovableHandle | None = None

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        if model is not None and not self.recorder.attached:
            if state.is_world_process_zero:
                clear_earlier_run(self.recorder)
            self.recorder.attach(model)
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module: Any, args: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled() and self.recorder.recording):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        # kept on the device (no sync); logged once, when the step's update is about to run
        loss = loss.detach().reshape(())
        self._loss = loss if self._loss is None else self._loss + loss
        self._micro += 1
        self._summed = kwargs.get("num_items_in_batch") is not None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # the step is still open: the loss lands on the recorder's step of this update
        if self._loss is not None:
            loss = self._loss if self._summed else self._loss / self._micro
            self.recorder.log_scalar("loss", loss)
        self._loss, self._micro = None, 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        metrics = self._new_headlines(self.recorder)
        if metrics is None:
            return
        step = self._new_headlines.step  # the recorder's, one less than state.global_step
        self._unreported = {**metrics, STEP_KEY: float(step)}
        state.log_history.append({**metrics, "step": step})

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        # each recorded step's headlines are reported once (reporters called after this
        # callback see them), with the recorded step they are of
        if logs is not None and self._unreported:
            logs.update(self._unreported)
            self._unreported = {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.recorder.detach()
        if self.out is not None and state.is_world_process_zero:
            self.recorder.save(self.out)
