"""A second held-out set of the fault benchmark ("blind"), written and frozen before the
rules were changed in session 2, and scored once at the end: new architectures, sizes,
optimizers and seeds for the existing fault classes, and new healthy controls.

Each case is built like the registry's (benchmarks.faults.registry) and checked in plain
torch (no gradscope) that its fault is really there, or that the healthy run trains.
`python -m benchmarks.faults --split blind --check-only` runs the checks without diagnosing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.faults.registry import (
    CNN,
    EVENT,
    MLP,
    Case,
    CharRNN,
    NanAt,
    NormFeature,
    Setup,
    TinyTransformer,
    _adam,
    _bias,
    _chars,
    _digits,
    _freeze,
    _raw_pixels,
    _scale_batch,
    _setup,
    _sgd,
    _synthetic,
    _tokens,
    _warmup,
    _without,
    _zero_sample,
    accumulate_step,
    dead_in,
    detached_step,
    diverges,
    grad_grows,
    grad_ratio,
    input_scale,
    never_moves,
    no_grad_for,
    nonfinite_at,
    not_training,
    plain_step,
    saturated_in,
    trains,
)

E = EVENT


def _seeded(build: Callable[[int], Setup], offset: int) -> Callable[[int], Setup]:
    """Another seed than the registry's runs: the same case at seed + offset."""
    return lambda seed: build(seed + offset)


def _rmsprop(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.RMSprop(params, lr=lr)


def _mlp(*sizes: int, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: MLP(list(sizes), **kw)


def _wrap_nan_attr(module: str) -> Callable[[nn.Module], None]:
    def prepare(m: nn.Module) -> None:
        setattr(m, module, NanAt(getattr(m, module), E))

    return prepare


def _norm_mlp_synth() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 48, bias=False),
        NormFeature(),
        nn.Linear(49, 48),
        nn.Tanh(),
        nn.Linear(48, 10),
    )


SYN = [32, 64, 64, 10]
DEEP = [784, 64, 64, 64, 10]


def _blind() -> list[Case]:
    h, b = "healthy", "blind"
    return [
        # ---- healthy controls ----
        Case(
            "b_h_mlp_wide_adamw",
            h,
            _seeded(_setup(_mlp(784, 256, 10), _adam(1e-3, 0.01), _digits), 11),
            trains(),
            "MLP",
            split=b,
            note="one wide ReLU layer, AdamW",
        ),
        Case(
            "b_h_cnn_nobn_adam",
            h,
            _seeded(_setup(lambda: CNN(bn=False), _adam(1e-3), lambda s: _digits(s, 32)), 12),
            trains(),
            "CNN",
            split=b,
            note="no BN, max-pool, Adam",
        ),
        Case(
            "b_h_lstm_frozen_embedding",
            h,
            _seeded(
                _setup(
                    lambda: CharRNN("lstm"),
                    _adam(1e-2),
                    _chars,
                    prepare=_freeze("embed."),
                ),
                13,
            ),
            trains(),
            "LSTM",
            split=b,
            note="a frozen (pretrained-style) embedding",
        ),
        Case(
            "b_h_gelu_rmsprop",
            h,
            _seeded(_setup(_mlp(*SYN, act=nn.GELU), _rmsprop(1e-3), _synthetic), 14),
            trains(),
            "MLP",
            split=b,
            note="GELU, RMSprop",
        ),
        Case(
            "b_h_postln_warmup",
            h,
            _seeded(
                _setup(
                    lambda: TinyTransformer(2, 32, norm_first=False),
                    _adam(1e-3),
                    _tokens,
                    step=lambda: plain_step(sched=_warmup(15)),
                ),
                15,
            ),
            trains(0.97),
            "transformer",
            split=b,
            note="Post-LN x2 with warm-up",
        ),
        Case(
            "b_h_cnn_accumulation",
            h,
            _seeded(
                _setup(CNN, _sgd(0.05), lambda s: _digits(s, 32), step=lambda: accumulate_step(2)),
                16,
            ),
            trains(),
            "CNN",
            split=b,
            note="2 micro-batches per step, BN",
        ),
        Case(
            "b_h_sigmoid_shallow",
            h,
            _seeded(_setup(_mlp(32, 64, 10, act=nn.Sigmoid), _sgd(0.5), _synthetic), 17),
            trains(),
            "MLP",
            split=b,
            note="one sigmoid layer, SGD 0.5",
        ),
        Case(
            "b_h_exp_decay_deep",
            h,
            _seeded(
                _setup(
                    _mlp(*DEEP),
                    _sgd(0.1),
                    _digits,
                    step=lambda: plain_step(
                        sched=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.95)
                    ),
                ),
                18,
            ),
            trains(),
            "MLP",
            split=b,
            note="ExponentialLR, SGD 0.1",
        ),
        # ---- faults ----
        Case(
            "b_vanishing_sigmoid_adam",
            "vanishing",
            _seeded(_setup(_mlp(32, *[48] * 9, 10, act=nn.Sigmoid), _adam(1e-3), _synthetic), 21),
            grad_ratio(below=1e-3),
            "MLP",
            layer="0",
            split=b,
            note="sigmoid x9, width 48, Adam",
        ),
        Case(
            "b_exploding_tanh_rmsprop",
            "exploding",
            _seeded(
                _setup(_mlp(784, *[48] * 16, 10, act=nn.Tanh, gain=2.5), _rmsprop(1e-4), _digits),
                22,
            ),
            grad_ratio(above=30),
            "MLP",
            layer="0",
            split=b,
            note="tanh x16, width 48, init gain 2.5, RMSprop",
        ),
        Case(
            "b_lr_high_adam_mlp",
            "lr_too_high",
            _seeded(_setup(_mlp(*SYN), _adam(1.0), _synthetic), 23),
            diverges(),
            "MLP",
            split=b,
            note="Adam lr 1",
        ),
        Case(
            "b_lr_jump_cnn",
            "lr_jump",
            _seeded(
                _setup(
                    CNN,
                    _sgd(0.05),
                    lambda s: _digits(s, 32),
                    step=lambda: plain_step(lr_jump=(E, 500.0)),
                ),
                24,
            ),
            diverges(E),
            "CNN",
            step=E,
            split=b,
            note="lr x500 at step 30, BN",
        ),
        Case(
            "b_bad_batch_deep",
            "bad_batch",
            _seeded(_setup(_mlp(*DEEP), _sgd(0.05), _digits, batches=_scale_batch(E, 3e3)), 25),
            diverges(E),
            "MLP",
            step=E,
            split=b,
            note="inputs x3e3 on one batch, 4 layers",
        ),
        Case(
            "b_nan_forward_transformer",
            "nonfinite_forward",
            _seeded(
                _setup(TinyTransformer, _adam(1e-3), _tokens, prepare=_wrap_nan_attr("head")),
                26,
            ),
            nonfinite_at(E),
            "transformer",
            layer="head",
            step=E,
            split=b,
            note="log of negatives in the head",
        ),
        Case(
            "b_nan_backward_synth",
            "nonfinite_backward",
            _seeded(_setup(_norm_mlp_synth, _adam(1e-3), _synthetic, batches=_zero_sample(E)), 27),
            nonfinite_at(E),
            "MLP",
            layer="1",
            step=E,
            split=b,
            note="sqrt at 0 in a norm feature, tanh, Adam",
        ),
        Case(
            "b_dead_bias_deep",
            "dead_units",
            _seeded(
                _setup(_mlp(*SYN[:-1], 64, 10), _sgd(0.05), _synthetic, prepare=_bias("4", -8.0)),
                28,
            ),
            dead_in("5"),
            "MLP",
            layer="5",
            split=b,
            note="layer 4's bias at -8 (3 ReLU layers)",
        ),
        Case(
            "b_saturated_tanh_adam",
            "saturation",
            _seeded(_setup(_mlp(*SYN, act=nn.Tanh, gain=6.0), _adam(1e-3), _synthetic), 29),
            saturated_in("1"),
            "MLP",
            layer="1",
            split=b,
            note="tanh, init gain 6, Adam",
        ),
        Case(
            "b_unnormalized_cnn",
            "unnormalized_inputs",
            _seeded(
                _setup(
                    lambda: CNN(bn=False), _sgd(1e-4), lambda s: _digits(s, 32), batches=_raw_pixels
                ),
                30,
            ),
            input_scale("conv1"),
            "CNN",
            layer="conv1",
            split=b,
            note="raw pixels 0..255, no BN",
        ),
        Case(
            "b_frozen_middle",
            "frozen_or_detached",
            _seeded(_setup(_mlp(*DEEP), _sgd(0.05), _digits, prepare=_freeze("2.")), 31),
            no_grad_for("2."),
            "MLP",
            layer="2",
            split=b,
            note="a middle layer requires_grad=False",
        ),
        Case(
            "b_detached_synth",
            "frozen_or_detached",
            _seeded(_setup(_mlp(*SYN), _adam(1e-3), _synthetic, step=lambda: detached_step(2)), 32),
            no_grad_for("0."),
            "MLP",
            layer="0",
            split=b,
            note="output of module 2 detached, Adam",
        ),
        Case(
            "b_not_in_optimizer_head",
            "not_in_optimizer",
            _seeded(_setup(TinyTransformer, _adam(1e-3), _tokens, params=_without("head.")), 33),
            never_moves("head."),
            "transformer",
            layer="head",
            split=b,
            note="the head left out of Adam",
        ),
        Case(
            "b_no_zero_grad_cnn",
            "zero_grad_forgotten",
            _seeded(
                _setup(
                    CNN,
                    _sgd(0.005),
                    lambda s: _digits(s, 32),
                    step=lambda: plain_step(zero_grad=False),
                ),
                34,
            ),
            grad_grows(),
            "CNN",
            split=b,
            note="SGD, BN, zero_grad forgotten",
        ),
        Case(
            "b_lr_zero_adamw",
            "lr_zero",
            _seeded(_setup(_mlp(*DEEP), _adam(0.0, 0.01), _digits), 35),
            not_training(0.97),
            "MLP",
            split=b,
            note="AdamW lr 0",
        ),
        Case(
            "b_postln_no_warmup_4",
            "post_ln_no_warmup",
            _seeded(
                _setup(lambda: TinyTransformer(4, 48, norm_first=False), _adam(3e-2), _tokens), 36
            ),
            not_training(0.8),
            "transformer",
            split=b,
            note="Post-LN x4, d 48, Adam 3e-2, no warm-up",
        ),
    ]


BLIND: list[Case] = _blind()
