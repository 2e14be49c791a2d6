import importlib
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.frame import decay_slope, first_last_ratio, flow_summary, gradient_profile
from gradscope.lab.models import build_model

dg = importlib.import_module("gradscope.diagnose")  # the package re-exports the function


def _frame(norms, extra=()):
    """A hand-built recorder frame: weight matrices with the given gradient norms at step 0."""
    rows = []
    for i, n in enumerate(norms):
        name = f"blocks.{i}.fc.weight"
        rows += [
            (0, name, "param_grad", "norm", n),
            (0, name, "param", "ndim", 2.0),
            (0, name, "param", "norm", 1.0),
        ]
    rows += list(extra)
    return pd.DataFrame(rows, columns=["step", "layer", "kind", "stat", "value"])


def test_decay_slope_against_polyfit():
    norms = 10.0 ** (0.39 * np.arange(12) - 40)
    assert decay_slope(norms) == pytest.approx(0.39)
    noisy = norms * np.exp(np.random.default_rng(0).normal(0, 0.3, 12))
    assert decay_slope(noisy) == pytest.approx(np.polyfit(np.arange(12), np.log10(noisy), 1)[0])
    assert math.isnan(decay_slope([0.0, 1.0]))
    assert first_last_ratio([1e-9, 1.0]) == 1e-9


def test_plain_relu_stack_loses_039_decades_per_layer():
    # the domain note's reference: PyTorch's default init, about 0.39 decades per layer
    torch.manual_seed(0)
    model = build_model("plain", 40)
    rec = gs.watch(model)
    nn.functional.cross_entropy(
        model(torch.randn(256, 784)), torch.randint(0, 10, (256,))
    ).backward()
    rec.step()
    frame = rec.to_frame()
    rec.detach()
    profile = gradient_profile(frame, 0)
    assert len(profile) == 41
    assert decay_slope(profile["norm"].to_numpy()[1:-1]) == pytest.approx(0.39, abs=0.03)
    assert flow_summary(frame).grad_ratio.iloc[0] < 1e-12


def test_verdict_vanishing():
    verdicts = dg.diagnose(_frame([1e-9, 1e-6, 1e-3, 1.0]))
    assert verdicts[0].id == "vanishing_gradients" and verdicts[0].severity == "error"
    assert verdicts[0].evidence["median_ratio"] == pytest.approx(1e-9)
    assert verdicts[0].threshold == dg.VANISHING_RATIO
    # the starved matrices (under 1/1000 of the last one's gradient), named by module
    assert verdicts[0].layers == ["blocks.0.fc", "blocks.1.fc"]
    assert "residual" in verdicts[0].suggestion and "(s)" not in verdicts[0].message


def test_verdict_exploding_scales_with_depth():
    # 0.2 decades per layer over 8 matrices after the first: 1.4 decades in all
    norms = [1e3] + [10 ** (0.2 * (7 - i)) for i in range(8)]
    verdicts = dg.diagnose(_frame(norms))
    assert [v.id for v in verdicts] == ["exploding_gradients"]
    tail = np.log10(norms[1:])
    assert verdicts[0].evidence["decades_per_layer"] == pytest.approx(
        -np.polyfit(range(8), tail, 1)[0]
    )
    # the same slope over 4 matrices after the first is 0.6 decades: under the 1-decade bar
    assert [v.id for v in dg.diagnose(_frame(norms[:5]))] == ["healthy"]


def test_verdict_healthy():
    verdicts = dg.diagnose(_frame([0.5, 0.8, 1.0, 1.2]))
    assert [v.id for v in verdicts] == ["healthy"] and verdicts[0].severity == "ok"


def test_recorder_diagnose_on_a_vanishing_model():
    torch.manual_seed(0)
    model = build_model("plain", 30)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gs.watch(model, optimizer=opt) as rec:
        nn.functional.cross_entropy(
            model(torch.randn(64, 784)), torch.randint(0, 10, (64,))
        ).backward()
        opt.step()
    assert rec.diagnose()[0].id == "vanishing_gradients"


# Each rule just either side of its threshold, with the severity it must give. The values are
# written out (not derived from the constants), so a changed constant is caught.
@pytest.mark.parametrize(
    ("first_norm", "expected"),
    [
        (1.1e-3, None),  # just above the vanishing ratio 1e-3
        (0.9e-3, ("vanishing_gradients", "warning")),
        (1.1e-6, ("vanishing_gradients", "warning")),  # just above the severe ratio 1e-6
        (0.9e-6, ("vanishing_gradients", "error")),
        (0.0, ("vanishing_gradients", "error")),  # no gradient at all reaches the first layer
        (1e6, None),  # the first matrix alone: its gradient scales with the input's size
    ],
)
def test_flow_thresholds_and_severities(first_norm, expected):
    verdicts = dg.diagnose(_frame([first_norm, 1.0, 1.0]))
    if expected is None:
        assert [v.id for v in verdicts] == ["healthy"]
    else:
        assert [(v.id, v.severity) for v in verdicts] == [expected]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([("dead_units", 6.0), ("units", 10.0)], None),  # 60% of units dead: under 70%
        ([("dead_units", 8.0), ("units", 10.0)], "dead_units"),
        ([("zero_frac", 0.96)], None),  # older recordings: exact-zero elements, 97%
        ([("zero_frac", 0.98)], "dead_units"),
        ([("saturated_frac", 0.59)], None),  # saturated above 60% at the bounds
        ([("saturated_frac", 0.61)], "saturated_units"),
    ],
)
def test_activation_thresholds(rows, expected):
    extra = [(0, "blocks.0.act", "activation", stat, value) for stat, value in rows]
    verdicts = dg.diagnose(_frame([1.0, 1.0], extra))
    if expected is None:
        assert [v.id for v in verdicts] == ["healthy"]
    else:
        assert [(v.id, v.severity, v.layers) for v in verdicts] == [
            (expected, "warning", ["blocks.0.act"])
        ]


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (0.29, None),  # updates of 30% of the weights or more: the learning rate is too high
        (0.31, ("lr_too_high", "warning")),
        (1.5, ("lr_too_high", "error")),  # updates larger than the weights themselves
    ],
)
def test_update_thresholds(ratio, expected):
    extra = [(0, f"blocks.{i}.fc.weight", "update", "ratio", ratio) for i in range(2)]
    verdicts = dg.diagnose(_frame([1.0, 1.0], extra))
    if expected is None:
        assert [v.id for v in verdicts] == ["healthy"]
    else:
        assert [(v.id, v.severity) for v in verdicts] == [expected]
        assert verdicts[0].evidence["update_ratio"] == pytest.approx(ratio)
