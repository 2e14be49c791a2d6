"""The repair benchmark's held-out runs: the remedies and their proposals were never tuned on
these. Frozen before they were first scored (see REPAIR_HELDOUT.txt).

Two parts, each built at seeds the remedies were never run at (SEEDS):
- the fault registry's held-out half (benchmarks/faults/registry.py, split "heldout"), its
  healthy controls beside it;
- VARIANTS: one or two runs per fault class that has a remedy, each with a size and an
  optimizer other than the registry's run of that class (widths 48-128, SGD without momentum,
  Adam where the registry has SGD and back), labelled by what was injected; and their own
  healthy controls (same model and optimizer, trained as intended).

Every faulty run is checked in plain torch (the registry's checks, run by run.run_case) that
its fault is really there; a run whose check fails is reported and not scored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.faults.registry import (
    CNN,
    Case,
    CharRNN,
    TinyTransformer,
    _adam,
    _bias,
    _chars,
    _depth,
    _digits,
    _freeze,
    _mlp,
    _offset_scale,
    _raw_pixels,
    _scale_batch,
    _setup,
    _sgd,
    _synthetic,
    _tokens,
    _without,
    dead_in,
    diverges,
    grad_grows,
    grad_ratio,
    input_scale,
    never_moves,
    no_grad_for,
    not_training,
    plain_step,
    saturated_in,
    trains,
)

SEEDS = (2, 3)
E = 30  # the step mid-run faults are injected at (the registry's EVENT)
W = [784, 128, 128, 10]  # the digit MLP, twice the registry's width
SYN = [32, 96, 96, 10]


def _variants() -> list[Case]:
    h = "healthy"
    return [
        # ---- healthy controls of the variants ----
        Case("hv_mlp128_adam", h, _setup(_mlp(*W), _adam(1e-3), _digits), trains(), "MLP"),
        Case("hv_mlp128_sgd", h, _setup(_mlp(*W), _sgd(0.1, 0.0), _digits), trains(), "MLP"),
        Case(
            "hv_deep8_relu_adam",
            h,
            _setup(_depth(784, 48, 8, gain=math.sqrt(2)), _adam(1e-3), _digits),
            trains(),
            "MLP",
        ),
        Case(
            "hv_cnn_adam",
            h,
            _setup(CNN, _adam(1e-3), lambda s: _digits(s, 48)),
            trains(),
            "CNN",
        ),
        Case(
            "hv_gru_adam",
            h,
            _setup(lambda: CharRNN("gru", 48), _adam(3e-3), _chars),
            trains(),
            "GRU",
        ),
        Case(
            "hv_synth_sgd",
            h,
            _setup(_mlp(*SYN), _sgd(0.1, 0.0), _synthetic),
            trains(),
            "MLP",
        ),
        Case(
            "hv_transformer3_adamw",
            h,
            _setup(lambda: TinyTransformer(3, 48), _adam(1e-3, 0.01), _tokens),
            trains(0.97),
            "transformer",
        ),
        # ---- faults ----
        Case(
            "v_vanishing_tanh12_adam",
            "vanishing",
            _setup(_depth(784, 48, 12, act=nn.Tanh, gain=0.4), _adam(1e-3), _digits),
            grad_ratio(below=1e-3),
            "MLP",
            layer="0",
        ),
        Case(
            "v_vanishing_sigmoid8_sgd",
            "vanishing",
            _setup(_depth(784, 48, 8, act=nn.Sigmoid, gain=1.0), _sgd(0.1, 0.0), _digits),
            grad_ratio(below=1e-3),
            "MLP",
            layer="0",
        ),
        Case(
            "v_exploding_tanh12_adam",
            "exploding",
            _setup(_depth(784, 48, 12, act=nn.Tanh, gain=3.0), _adam(1e-3), _digits),
            grad_ratio(above=30),
            "MLP",
            layer="0",
        ),
        Case(
            "v_exploding_tanh16_sgd",
            "exploding",
            _setup(_depth(784, 48, 16, act=nn.Tanh, gain=2.5), _sgd(5e-3, 0.0), _digits),
            grad_ratio(above=30),
            "MLP",
            layer="0",
        ),
        Case(
            "v_lr_high_sgd_nomomentum",
            "lr_too_high",
            _setup(_mlp(*W), _sgd(5.0, 0.0), _digits),
            diverges(),
            "MLP",
        ),
        Case(
            "v_lr_high_adam_mlp",
            "lr_too_high",
            _setup(_mlp(*W), _adam(0.3), _digits),
            diverges(),
            "MLP",
        ),
        Case(
            "v_lr_jump_adam_mlp",
            "lr_jump",
            _setup(_mlp(*W), _adam(1e-3), _digits, step=lambda: plain_step(lr_jump=(E, 1000.0))),
            diverges(E),
            "MLP",
            step=E,
        ),
        Case(
            "v_lr_jump_gru",
            "lr_jump",
            _setup(
                lambda: CharRNN("gru", 48),
                _adam(3e-3),
                _chars,
                step=lambda: plain_step(lr_jump=(E, 1000.0)),
            ),
            diverges(E),
            "GRU",
            step=E,
        ),
        Case(
            "v_bad_batch_adam_mlp",
            "bad_batch",
            _setup(_mlp(*W), _adam(1e-3), _digits, batches=_scale_batch(E, 1e4)),
            diverges(E),
            "MLP",
            step=E,
        ),
        Case(
            "v_bad_batch_sgd_mlp",
            "bad_batch",
            _setup(_mlp(*W), _sgd(0.1, 0.0), _digits, batches=_scale_batch(E, 1e3)),
            diverges(E),
            "MLP",
            step=E,
        ),
        Case(
            "v_dead_bias_adam_mlp",
            "dead_units",
            _setup(_mlp(*W), _adam(1e-3), _digits, prepare=_bias("0", -6.0)),
            dead_in("1"),
            "MLP",
            layer="1",
        ),
        Case(
            "v_dead_bias_synth_sgd",
            "dead_units",
            _setup(_mlp(*SYN), _sgd(0.1, 0.0), _synthetic, prepare=_bias("2", -8.0)),
            dead_in("3"),
            "MLP",
            layer="3",
        ),
        Case(
            "v_saturated_tanh_adam",
            "saturation",
            _setup(_mlp(*W, act=nn.Tanh, gain=6.0), _adam(1e-3), _digits),
            saturated_in("1"),
            "MLP",
            layer="1",
        ),
        Case(
            "v_saturated_sigmoid_sgd",
            "saturation",
            _setup(
                _mlp(*SYN, act=nn.Sigmoid, gain=1.0),
                _sgd(0.1, 0.0),
                _synthetic,
                batches=lambda b: [(x * 20, y) for x, y in b],
            ),
            saturated_in("1"),
            "MLP",
            layer="1",
        ),
        Case(
            "v_unnormalized_pixels_adam",
            "unnormalized_inputs",
            _setup(_mlp(*W), _adam(1e-3), _digits, batches=_raw_pixels),
            input_scale("0"),
            "MLP",
            layer="0",
        ),
        Case(
            "v_unnormalized_offset_sgd",
            "unnormalized_inputs",
            _setup(_mlp(*SYN), _sgd(1e-4, 0.0), _synthetic, batches=_offset_scale),
            input_scale("0"),
            "MLP",
            layer="0",
        ),
        Case(
            "v_frozen_middle_adam",
            "frozen_or_detached",
            _setup(_mlp(*W), _adam(1e-3), _digits, prepare=_freeze("2.")),
            no_grad_for("2."),
            "MLP",
            layer="2",
        ),
        Case(
            "v_not_in_optimizer_adam_mlp",
            "not_in_optimizer",
            _setup(_mlp(*W), _adam(1e-3), _digits, params=_without("0.")),
            never_moves("0."),
            "MLP",
            layer="0",
        ),
        Case(
            "v_not_in_optimizer_gru",
            "not_in_optimizer",
            _setup(lambda: CharRNN("gru", 48), _adam(3e-3), _chars, params=_without("rnn.")),
            never_moves("rnn."),
            "GRU",
            layer="rnn",
        ),
        Case(
            "v_no_zero_grad_adam_mlp",
            "zero_grad_forgotten",
            _setup(_mlp(*W), _adam(1e-3), _digits, step=lambda: plain_step(zero_grad=False)),
            grad_grows(),
            "MLP",
        ),
        Case(
            "v_no_zero_grad_cnn_adam",
            "zero_grad_forgotten",
            _setup(
                CNN,
                _adam(1e-3),
                lambda s: _digits(s, 48),
                step=lambda: plain_step(zero_grad=False),
            ),
            grad_grows(),
            "CNN",
        ),
        Case(
            "v_lr_zero_adam_mlp",
            "lr_zero",
            _setup(_mlp(*W), _adam(0.0), _digits),
            not_training(0.97),
            "MLP",
        ),
        Case(
            "v_lr_zero_schedule_cnn",
            "lr_zero",
            _setup(
                CNN,
                _adam(1e-3),
                lambda s: _digits(s, 48),
                step=lambda: plain_step(
                    sched=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.0)
                ),
            ),
            not_training(0.97),
            "CNN",
        ),
        Case(
            "v_postln_no_warmup_adamw",
            "post_ln_no_warmup",
            _setup(lambda: TinyTransformer(6, 48, norm_first=False), _adam(3e-2, 0.01), _tokens),
            not_training(0.8),
            "transformer",
        ),
    ]


VARIANTS: list[Case] = _variants()

# The healthy control each variant is judged against: the same model family and optimizer.
CONTROLS = {
    **dict.fromkeys(
        ["v_vanishing_tanh12_adam", "v_vanishing_sigmoid8_sgd", "v_exploding_tanh12_adam",
         "v_exploding_tanh16_sgd"], "hv_deep8_relu_adam"),
    **dict.fromkeys(
        ["v_lr_high_adam_mlp", "v_lr_jump_adam_mlp", "v_bad_batch_adam_mlp",
         "v_dead_bias_adam_mlp", "v_saturated_tanh_adam", "v_unnormalized_pixels_adam",
         "v_frozen_middle_adam", "v_not_in_optimizer_adam_mlp", "v_no_zero_grad_adam_mlp",
         "v_lr_zero_adam_mlp"], "hv_mlp128_adam"),
    **dict.fromkeys(["v_lr_high_sgd_nomomentum", "v_bad_batch_sgd_mlp"], "hv_mlp128_sgd"),
    **dict.fromkeys(["v_lr_jump_gru", "v_not_in_optimizer_gru"], "hv_gru_adam"),
    **dict.fromkeys(
        ["v_dead_bias_synth_sgd", "v_saturated_sigmoid_sgd",
         "v_unnormalized_offset_sgd"], "hv_synth_sgd"),
    **dict.fromkeys(["v_no_zero_grad_cnn_adam", "v_lr_zero_schedule_cnn"], "hv_cnn_adam"),
    "v_postln_no_warmup_adamw": "hv_transformer3_adamw",
}  # fmt: skip
# Variants whose injected cause has a remedy in the catalog: all of them (a layer frozen by
# mistake: unfreeze).
REMEDY_CASES = {c.name for c in VARIANTS if not c.healthy}
