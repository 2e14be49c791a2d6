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


class Severity(StrEnum):
    """How bad a verdict is: `ok` (nothing wrong), `info` (worth knowing, often intended:
    a frozen backbone), `warning` (likely hurts training), `error` (training is broken)."""

    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class VerdictId(StrEnum):
    """What a verdict says (gradscope.analysis). Root causes first, then symptoms that a root
    cause takes as its evidence when both hold.

    - ``healthy``: no rule fired.
    - ``nonfinite_forward``: a module's forward made inf/NaN from finite inputs.
    - ``nonfinite_backward``: a module's backward made inf/NaN from a finite output gradient
      (an operation undefined at a point: sqrt or a norm at 0, log at 0, a division by 0).
    - ``nonfinite_values``: inf/NaN in gradients or the loss with no module to blame.
    - ``lr_too_high``: updates as large as the weights, or a jump in the step size followed by
      growing gradients (divergence), or large steps on a loss that does not decrease.
    - ``gradient_spike``: the gradient of one step left its baseline by orders of magnitude
      at an unchanged step size (a corrupted or outlier batch).
    - ``gradients_not_zeroed``: parameter gradients larger than one backward pass can make
      (summed over steps: a forgotten ``zero_grad``); accumulation over micro-batches with
      one zeroing per optimizer step does not trigger it.
    - ``no_updates``: no parameter moved although gradients are nonzero (learning rate 0).
    - ``not_in_optimizer``: parameters with gradients that the optimizer never updates.
    - ``no_gradient``: the first modules get no gradient (frozen with requires_grad=False,
      or the graph detached after them); info: often intended (a frozen backbone).
    - ``unnormalized_inputs``: the first layer's outputs are far from unit scale.
    - ``exploding_gradients`` / ``vanishing_gradients``: gradient norms grow / shrink going
      back toward the input, over a share of the run's steps.
    - ``dead_units``: activations whose units are zero for every sample of the batch.
    - ``saturated_units``: bounded activations (tanh, sigmoid) at their bounds.
    - ``loss_not_decreasing``: a symptom (info when alone).
    """

    HEALTHY = "healthy"
    NONFINITE_FORWARD = "nonfinite_forward"
    NONFINITE_BACKWARD = "nonfinite_backward"
    NONFINITE_VALUES = "nonfinite_values"
    LR_TOO_HIGH = "lr_too_high"
    GRADIENT_SPIKE = "gradient_spike"
    GRADIENTS_NOT_ZEROED = "gradients_not_zeroed"
    NO_UPDATES = "no_updates"
    NOT_IN_OPTIMIZER = "not_in_optimizer"
    NO_GRADIENT = "no_gradient"
    UNNORMALIZED_INPUTS = "unnormalized_inputs"
    EXPLODING_GRADIENTS = "exploding_gradients"
    VANISHING_GRADIENTS = "vanishing_gradients"
    DEAD_UNITS = "dead_units"
    SATURATED_UNITS = "saturated_units"
    LOSS_NOT_DECREASING = "loss_not_decreasing"
