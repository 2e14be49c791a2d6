"""Optimizer geometry: the update's cosine with the negative gradient, the effective step
size and Adam's second-moment norm, against the direct float64 computation."""

import pytest
import torch
from torch import nn

import gradscope as gs

pytestmark = pytest.mark.usefixtures("stats_path")


def _rows(frame, kind, stat, step=0):
    rows = frame[(frame.kind == kind) & (frame.stat == stat) & (frame.step == step)]
    return rows.set_index("layer")["value"]


def _step(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt.step()
    after = {n: p.detach().double() for n, p in model.named_parameters()}
    return grads, {n: after[n] - before[n] for n in after}


def test_plain_sgd_steps_along_the_negative_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.watch(model, optimizer=opt) as rec:
        _step(model, opt, torch.randn(8, 6))
    frame = rec.to_frame()
    cos, size = _rows(frame, "update", "cos_grad"), _rows(frame, "update", "step_size")
    assert cos.to_numpy() == pytest.approx(1.0, abs=1e-6)
    assert size.to_numpy() == pytest.approx(0.1, rel=1e-6)
    assert "optimizer_state" not in set(frame.kind)  # SGD keeps no second moment


def test_adam_geometry_matches_the_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 6)
    with gs.watch(model, optimizer=opt) as rec:
        _step(model, opt, x)  # Adam's first step is sign-like: not along the gradient
        grads, updates = _step(model, opt, x)
    frame = rec.to_frame()
    cos, size = _rows(frame, "update", "cos_grad", 1), _rows(frame, "update", "step_size", 1)
    state = _rows(frame, "optimizer_state", "exp_avg_sq_norm", 1)
    for name, p in model.named_parameters():
        g, u = grads[name].flatten(), updates[name].flatten()
        ref = float(-(u @ g) / (u.norm() * g.norm()))
        assert cos[name] == pytest.approx(ref, rel=1e-6, abs=1e-9)
        assert size[name] == pytest.approx(float(u.norm() / g.norm()), rel=1e-6)
        second = opt.state[p]["exp_avg_sq"].double().norm()
        assert state[name] == pytest.approx(float(second), rel=1e-6)
    assert (cos < 0.999).any()  # Adam's per-coordinate scaling turns the update


def test_geometry_can_be_turned_off():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.watch(model, optimizer=opt, geometry=False) as rec:
        _step(model, opt, torch.randn(4, 3))
    assert "cos_grad" not in set(rec.to_frame().stat)
