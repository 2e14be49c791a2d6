"""One run of a depth sweep: trained, recorded and measured into its row of runs.csv (the
first/last gradient ratio and decay at init and at the end, accuracy, the verdicts)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from gradscope import frame as fr
from gradscope.diagnose import diagnose
from gradscope.lab import theory
from gradscope.lab.data import Dataset
from gradscope.lab.models import Variant, build_model
from gradscope.lab.sweep.config import RunSpec, SweepConfig
from gradscope.lab.train import total_steps, train
from gradscope.recorder import Recorder


def run_one(
    spec: RunSpec,
    config: SweepConfig,
    data: Dataset,
    progress: Callable[[int, int, float], None] | None = None,
    record: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Trains and records one run; returns its long-form frame and its row of the run table."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.variant, spec.depth, config.width, config.activation, config.init)
    tc = config.train_config(spec.seed)
    n_steps = total_steps(tc, len(data.y_train))

    def every(step: int) -> bool:
        return step % config.every == 0 or step == n_steps - 1

    recorder = Recorder(every=every) if record else None
    result = train(model, data, tc, recorder=recorder, progress=progress)
    frame = recorder.to_frame() if recorder is not None else pd.DataFrame()
    flow = fr.flow_summary(frame) if len(frame) else pd.DataFrame(columns=["step"])
    first = flow.iloc[0] if len(flow) else None
    last = flow.iloc[-1] if len(flow) else None
    tail = [v for v in result.losses[-20:] if math.isfinite(v)]
    init = diagnose(frame, step=int(frame["step"].min())) if len(frame) else []
    end = diagnose(frame) if len(frame) else []
    row: dict[str, Any] = {
        "variant": spec.variant,
        "depth": spec.depth,
        "seed": spec.seed,
        "width": config.width,
        "activation": config.activation,
        "init": config.init,
        "optimizer": config.optimizer,
        "lr": tc.resolved_lr,
        "steps": result.steps,
        "batch_size": tc.batch_size,
        "train_acc": result.train_acc,
        "test_acc": result.test_acc,
        "train_loss": result.train_loss,
        "test_loss": result.test_loss,
        "final_loss": float(np.mean(tail)) if tail else math.nan,
        "grad_ratio_init": first["grad_ratio"] if first is not None else math.nan,
        "grad_ratio_end": last["grad_ratio"] if last is not None else math.nan,
        "grad_decay_init": first["grad_decay"] if first is not None else math.nan,
        "grad_decay_end": last["grad_decay"] if last is not None else math.nan,
        # the mean-field prediction for plain stacks (gradscope.lab.theory); none for residual ones
        "grad_decay_theory": theory.decay_per_layer(
            config.activation, config.init, config.width, "param_grad"
        )
        if spec.variant == Variant.PLAIN
        else math.nan,
        "diverged": result.diverged,
        "seconds": result.seconds,
        "verdicts_init": ";".join(v.id for v in init),
        "verdicts": ";".join(v.id for v in end),
        "details": {"init": [v.to_dict() for v in init], "end": [v.to_dict() for v in end]},
    }
    if len(frame):
        frame.insert(0, "seed", spec.seed)
        frame.insert(0, "depth", spec.depth)
        frame.insert(0, "variant", spec.variant)
    loss = pd.DataFrame({"step": range(len(result.losses)), "loss": result.losses})
    loss.insert(0, "seed", spec.seed)
    loss.insert(0, "depth", spec.depth)
    loss.insert(0, "variant", spec.variant)
    return frame, {**row, "_losses": loss}
