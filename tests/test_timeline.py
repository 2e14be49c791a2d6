"""Diagnosis over a whole run: each rule on constructed frames (firing and silent), on real
training with a scripted failure, online through on_verdict, and silent on healthy runs."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope import timeline
from gradscope.lab.models import build_model, build_named
from gradscope.lab.train import TrainConfig, train


def _frame(series: dict[tuple[str, str, str], np.ndarray], matrices=("a.weight", "b.weight")):
    """A long-form frame from per-step series, with the matrices marked as 2-D weights."""
    rows = []
    for (layer, kind, stat), values in series.items():
        rows += [(step, layer, kind, stat, float(v)) for step, v in enumerate(values)]
    steps = max(len(v) for v in series.values())
    for name in matrices:
        rows += [(step, name, "param", "ndim", 2.0) for step in range(steps)]
    return pd.DataFrame(rows, columns=["step", "layer", "kind", "stat", "value"])


def _noise(n, seed, level=1.0, sd=0.05):
    return level * 10 ** np.random.default_rng(seed).normal(0, sd, n)


def test_the_layer_that_spiked_first_is_named_with_its_lead_over_the_loss():
    a, b = _noise(80, 0), _noise(80, 1)
    b[40:] *= 8  # b leaves its baseline at step 40 ...
    a[42:] *= 30  # ... a at 42, larger
    loss = _noise(80, 2, level=2.0)
    loss[45:] *= 20  # the loss follows at 45
    total = np.sqrt(a**2 + b**2)
    frame = _frame(
        {
            ("a.weight", "param_grad", "norm"): a,
            ("b.weight", "param_grad", "norm"): b,
            ("*", "param_grad", "norm"): total,
            ("*", "scalar", "loss"): loss,
        }
    )
    hits = timeline.gradient_spikes(frame)
    assert (int(hits["step"].iloc[0]), hits["layer"].iloc[0]) == (40, "b.weight")
    assert hits["factor"].iloc[0] == pytest.approx(8, rel=0.3)
    assert timeline.first_loss_spike(frame)[0] == 45
    # the diagnosis: the total gradient norm left its baseline (10x) at step 42, three steps
    # before the loss; the loss that stopped decreasing is its symptom, not another verdict
    (spike,) = [v for v in gs.diagnose(frame) if v.severity != "ok"]
    assert (spike.id, spike.first_step) == ("gradient_spike", 42)
    assert spike.explains == ["loss_not_decreasing"]


def test_spike_thresholds_either_side():
    base = _noise(60, 3)
    for factor, fires in ((2.5, False), (4.0, True)):  # SPIKE_FACTOR 3
        series = base.copy()
        series[50] *= factor
        hits = timeline.spikes(pd.DataFrame({"x": series}))
        assert (not hits.empty and hits["step"].iloc[0] == 50) == fires, factor
    series = base.copy()
    series[5] *= 100  # before SPIKE_MIN_HISTORY steps there is no baseline yet
    assert timeline.spikes(pd.DataFrame({"x": series})).empty
    series[30] = np.nan if False else np.inf  # a non-finite value is a spike
    assert timeline.spikes(pd.DataFrame({"x": series}))["step"].tolist() == [30]


def test_noise_alone_fires_nothing():
    series = {("*", "param_grad", "norm"): _noise(500, 4, sd=0.1)}
    for i, name in enumerate(("a.weight", "b.weight")):
        series[(name, "param_grad", "norm")] = _noise(500, 5 + i, sd=0.1)
        series[(name, "update", "ratio")] = _noise(500, 7 + i, level=1e-3, sd=0.1)
    series[("*", "scalar", "loss")] = np.linspace(2.3, 0.3, 500) * _noise(500, 9, sd=0.02)
    verdicts = gs.diagnose(_frame(series))
    assert [v.id for v in verdicts] == ["healthy"]
    assert (verdicts[0].first_step, verdicts[0].last_step) == (0, 499)


def test_conditions_are_dated_by_onset_and_end_not_the_whole_run():
    # units that die at step 100 of 250: the verdict starts at 100, not 0
    steps = 250
    dead = np.where(np.arange(steps) >= 100, 9.0, 0.0)
    frame = _frame(
        {
            ("a.weight", "param_grad", "norm"): _noise(steps, 10),
            ("b.weight", "param_grad", "norm"): _noise(steps, 11),
            ("a.act", "activation", "dead_units"): dead,
            ("a.act", "activation", "units"): np.full(steps, 10.0),
        }
    )
    (verdict,) = [v for v in gs.diagnose(frame) if v.severity != "ok"]
    assert (verdict.id, verdict.first_step, verdict.last_step) == ("dead_units", 100, 249)
    assert "90% of a.act's units" in verdict.message and "60% of the steps" in verdict.message


def test_step_keeps_the_single_step_view():
    steps = np.arange(50)
    frame = _frame(
        {
            ("a.weight", "param_grad", "norm"): 1e-5 * 10 ** (steps / 4.5),
            ("b.weight", "param_grad", "norm"): np.ones(50),
        }
    )
    at_5 = gs.diagnose(frame, step=5)
    assert [(v.id, v.first_step, v.last_step) for v in at_5] == [("vanishing_gradients", 5, 5)]
    whole = {v.id: v for v in gs.diagnose(frame)}
    # it held on steps 0-8: under half of the 50, and under the 10 in a row from the start
    # that an init's vanishing shows (flow.VANISHING_STEPS)
    assert "vanishing_gradients" not in whole
    early = {v.id: v for v in gs.diagnose(frame.query("step <= 12"))}
    assert early["vanishing_gradients"].first_step == 0  # it held from the first step on


def _lr_jump_run(data, losses, on_verdict=None, steps=70, jump_at=40):
    """Pre-LN blocks on MNIST; the learning rate x50 from `jump_at` on. The loss of each step
    is appended to `losses` as the step runs."""
    torch.manual_seed(0)
    model = build_model("preln", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with gs.watch(model, optimizer=opt, on_verdict=on_verdict) as rec:
        for t in range(steps):
            if t == jump_at:
                for group in opt.param_groups:
                    group["lr"] *= 50
            i = torch.randint(0, len(data.y_train), (64,), generator=g)
            x, y = data.x_train[i], data.y_train[i]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            rec.log_scalar("loss", loss)
            losses.append(float(loss.detach()))
            if not np.isfinite(losses[-1]):
                break
            loss.backward()
            opt.step()
    return rec


def test_a_learning_rate_jump_is_caught_before_the_loss_breaks(mnist):
    losses: list[float] = []
    announced: list[tuple[str, int]] = []
    # online: each new warning as the step that showed it closes (len(losses) = steps run)
    on_verdict = lambda v: announced.append((v.id, len(losses) - 1))  # noqa: E731
    rec = _lr_jump_run(mnist, losses, on_verdict)
    top = rec.diagnose()[0]
    # the update of the jump step: its step size jumped before any loss moved
    assert (top.id, top.first_step) == ("lr_too_high", 40)
    assert top.evidence["step_size_jump"] > 10  # lr x50; momentum carries the old steps
    loss_event = next(t for t, v in enumerate(losses) if t > 8 and v > 10 * np.median(losses[:t]))
    assert loss_event >= 41
    ids = [vid for vid, _ in announced]
    assert len(ids) == len(set(ids))  # each finding once
    assert announced[0] == ("lr_too_high", 40)  # online, at the step it happened


@pytest.mark.parametrize(
    ("name", "optimizer", "steps"),
    [("preln", "sgd", 300), ("digit", "adamw", 300), ("deep-digit", "adamw", 300)],
)
def test_healthy_runs_give_no_warning_over_the_whole_run(mnist, name, optimizer, steps):
    torch.manual_seed(0)
    model = build_model("preln", 10) if name == "preln" else build_named(name)
    rec = gs.Recorder(every=5)
    config = TrainConfig(optimizer=optimizer, steps=steps, batch_size=64, eval_train_size=500)
    result = train(model, mnist, config, recorder=rec)
    verdicts = rec.diagnose()
    assert [v.id for v in verdicts if v.severity in ("warning", "error")] == [], verdicts
    assert result.test_acc > 0.85


def test_a_noisy_series_fires_only_on_a_jump_beyond_its_own_noise():
    noisy = _noise(200, 21, sd=0.3)  # often 3x above its median: noise, not spikes
    assert (noisy > 3 * np.median(noisy)).sum() > 5
    assert timeline.spikes(pd.DataFrame({"x": noisy})).empty
    noisy[150:] *= 1e4  # four decades: far beyond its step-to-step changes
    assert timeline.spikes(pd.DataFrame({"x": noisy}))["step"].tolist() == [150]
