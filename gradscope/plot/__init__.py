"""Seaborn figures of gradient flow, one function per figure: the long-form frame (or a Run,
a Recorder, a run folder; a sweep's run table for the sweep figures) in, a matplotlib Axes out,
drawn into `ax=` when given. The reports are assembled from these same functions.

Example:
    >>> import gradscope.plot as gp
    >>> from gradscope.lab.models import recorded_example
    >>> rec = recorded_example()  # a small model, watched
    >>> ax = gp.gradient_profile(rec)  # or gp.heatmap(rec), gp.activations(rec, "zero_frac")
"""

from gradscope.plot.common import LOG10_SCALES, MAX_ROWS, ZERO_COLOR, PlotError, row_groups
from gradscope.plot.outputs import activations, residual_stream
from gradscope.plot.run import (
    gradient_profile,
    heatmap,
    over_steps,
    scalars,
    update_ratio,
    verdict_timeline,
)
from gradscope.plot.sweep import (
    ratio_vs_depth,
    slope_vs_depth,
    trainability_map,
    variant_palette,
)

__all__ = [
    "LOG10_SCALES",
    "MAX_ROWS",
    "ZERO_COLOR",
    "PlotError",
    "activations",
    "gradient_profile",
    "heatmap",
    "over_steps",
    "ratio_vs_depth",
    "residual_stream",
    "row_groups",
    "scalars",
    "slope_vs_depth",
    "trainability_map",
    "update_ratio",
    "variant_palette",
    "verdict_timeline",
]
