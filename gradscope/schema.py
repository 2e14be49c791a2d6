"""Every kind and statistic of the recorder's long-form frame, named and documented once.

A frame has exactly the columns ``step, layer, kind, stat, value``. Kinds and their stats:

- ``param_grad`` (layer = parameter fqn, e.g. ``blocks.3.fc1.weight``), read when the optimizer
  is about to step, i.e. the gradient the update uses (after accumulation, clipping, AMP
  unscaling, all-reduce); without an optimizer, at ``rec.step()``:
  ``norm`` (L2, float64), ``max_abs``, ``nonfinite`` (count of inf/NaN entries).
  One extra row ``layer="*"``, ``stat="norm"``: the total L2 norm over all recorded parameters.
- ``param``: ``norm`` of the parameter before the update, ``ndim`` (2 for a weight matrix).
- ``update`` (only with an optimizer): ``norm`` of the update the optimizer applied
  (parameter after the step minus before), ``ratio`` = update norm / parameter norm;
  ``cos_grad``, the cosine between the update and the negative gradient (1 for plain SGD),
  and ``step_size`` = update norm / gradient norm (the effective learning rate).
- ``optimizer_state`` (Adam-like optimizers): ``exp_avg_sq_norm``, the L2 norm of the
  second-moment estimate of each parameter.
- ``activation`` (layer = module fqn; ``fqn[i]`` / ``fqn[key]`` for tuple or dict outputs):
  ``mean``, ``std``, ``rms``, ``zero_frac`` (exact zeros: dead ReLU outputs), ``min``,
  ``max``, ``nonfinite``; ``saturated_frac`` for bounded activations (tanh, sigmoid,
  hardtanh, ...): outputs within 1% of a bound's magnitude of that bound.
  ``dead_units``: the number of units (features, or channels of convolution-shaped outputs:
  the rule is in ``recorder/stats/units.py``) that are exactly zero for every sample and
  position of the step's batch, and ``units``, their number (``dead_units / units`` is the
  dead fraction; unlike ``zero_frac`` it does not count the zeros a healthy ReLU makes).
  A unit is dead over several calls of one module in a step (micro-batches) and over ranks
  only if dead in each, so calls and ranks merge by the smallest count: exact for one call
  per step and rank, and for parts whose dead units are the same (units dead through their
  weights are dead on every batch); otherwise an upper bound of the merged count.
- ``activation_grad``: gradient w.r.t. the module's output (the back-propagated signal):
  ``norm`` over the whole batch, ``sample_norm`` (mean over samples, indexed by the first
  dimension, of each sample's norm), ``nonfinite`` (samples whose gradient holds inf/NaN).
- ``block_index`` (under both ``activation`` and ``activation_grad``, blocks only): the
  block's position in the residual stream, 0 nearest the input (``frame.stream_layers``).
- ``nonfinite_origin``: on a step with a non-finite value, ``stat="forward"`` names the first
  module in forward order whose output became non-finite, ``stat="backward"`` the first in
  backward order whose gradient did (value 1).
- ``scalar`` (layer ``"*"``): values logged with ``Recorder.log_scalar`` (loss, pre-clip norm).
"""

from __future__ import annotations

from enum import StrEnum

COLUMNS = ("step", "layer", "kind", "stat", "value")
TOTAL = "*"  # the layer of rows about the whole model (total gradient norm, scalars)


class Kind(StrEnum):
    """What a row describes (see the module docstring)."""

    PARAM_GRAD = "param_grad"
    PARAM = "param"
    UPDATE = "update"
    ACTIVATION = "activation"
    ACTIVATION_GRAD = "activation_grad"
    NONFINITE_ORIGIN = "nonfinite_origin"
    SCALAR = "scalar"
    OPTIMIZER_STATE = "optimizer_state"


class Stat(StrEnum):
    """Which statistic a row holds (see the module docstring for which kinds have which)."""

    NORM = "norm"
    MAX_ABS = "max_abs"
    NONFINITE = "nonfinite"
    NDIM = "ndim"
    RATIO = "ratio"
    MEAN = "mean"
    STD = "std"
    RMS = "rms"
    ZERO_FRAC = "zero_frac"
    MIN = "min"
    MAX = "max"
    SATURATED_FRAC = "saturated_frac"
    DEAD_UNITS = "dead_units"
    UNITS = "units"
    SAMPLE_NORM = "sample_norm"
    BLOCK_INDEX = "block_index"
    COS_GRAD = "cos_grad"
    STEP_SIZE = "step_size"
    EXP_AVG_SQ_NORM = "exp_avg_sq_norm"
    FORWARD = "forward"
    BACKWARD = "backward"
    LOSS = "loss"
    PRECLIP_NORM = "preclip_norm"
