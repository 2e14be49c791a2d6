"""TensorBoard export: the headline scalars of every recorded step under one `gradscope/`
prefix (not a series per layer), through torch's SummaryWriter.

Example:
    >>> from gradscope.integrations.tensorboard import export_tensorboard
    >>> # export_tensorboard(rec.to_frame(), "tb/run-1")
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from torch.utils.tensorboard import SummaryWriter

from gradscope.integrations.headline import headline


def export_tensorboard(frame: pd.DataFrame, log_dir: str | os.PathLike[str] | SummaryWriter) -> int:
    """Writes the headline scalars of each recorded step of `frame` (a recorder's frame or a
    saved run's) as TensorBoard scalars at that step; returns how many were written."""
    writer = log_dir if isinstance(log_dir, SummaryWriter) else SummaryWriter(str(Path(log_dir)))
    written = 0
    try:
        for step, rows in frame.groupby("step", sort=True):
            for tag, value in headline(rows).items():
                writer.add_scalar(tag, value, global_step=int(step))
                written += 1
    finally:
        if writer is not log_dir:
            writer.close()
        else:
            writer.flush()
    return written
