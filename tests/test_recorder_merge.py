"""Statistics of many calls of one module in one step (shared modules, micro-batches, AMP
backwards the GradScaler skipped) against the direct computation over all of them."""

import math

import pytest
import torch
from torch import nn

import gradscope as gs

# every test runs twice: statistics from the C kernels, and from torch ops
pytestmark = pytest.mark.usefixtures("stats_path")


def _value(frame, layer, kind, stat, step=0):
    rows = frame[
        (frame.layer == layer) & (frame.kind == kind) & (frame.stat == stat) & (frame.step == step)
    ]
    assert len(rows) == 1, (layer, kind, stat, len(rows))
    return float(rows.value.iloc[0])


class _Capture:
    """Every output of a module and every gradient w.r.t. it, as the module produced them."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        module.register_forward_hook(self._forward)

    def _forward(self, module, args, out):
        self.outputs.append(out.detach().clone())
        if out.requires_grad:
            out.register_hook(lambda g: self.grads.append(g.detach().clone()))


def _shared_model():
    """Hardshrink gives exact zeros among negative and positive values; Tanh saturates."""
    torch.manual_seed(0)
    shrink, tanh = nn.Hardshrink(0.5), nn.Tanh()
    return nn.ModuleDict({"fc": nn.Linear(6, 6), "shrink": shrink, "tanh": tanh})


def _forward(model, x):
    return model["tanh"](model["shrink"](model["fc"](x)))


def test_every_activation_stat_merges_over_calls_and_micro_batches():
    model = _shared_model()
    shrink, tanh = _Capture(model["shrink"]), _Capture(model["tanh"])
    # the extremes sit in the first call: a merge where the last call wins is wrong
    xs = [10.0 * torch.randn(5, 6), 0.1 * torch.randn(3, 6), torch.randn(7, 6)]
    with gs.watch(model) as rec:
        for x in xs[:2]:  # one micro-batch whose forward calls each module twice
            _forward(model, _forward(model, x) * 3.0).pow(2).sum().backward()
        _forward(model, xs[2]).pow(2).sum().backward()
        rec.step()
    frame = rec.to_frame()
    assert len(shrink.outputs) == 5 and len(shrink.grads) == 5
    for layer, capture in (("shrink", shrink), ("tanh", tanh)):
        out = torch.cat([o.flatten() for o in capture.outputs]).double()
        assert (out < 0).any() and (out == 0).any()  # negative values and exact zeros
        expected = {
            "mean": float(out.mean()),
            "std": float(out.std(unbiased=False)),
            "rms": float(out.square().mean().sqrt()),
            "zero_frac": float((out == 0).double().mean()),
            "min": float(out.min()),
            "max": float(out.max()),
            "nonfinite": 0.0,
        }
        for stat, ref in expected.items():
            got = _value(frame, layer, "activation", stat)
            assert got == pytest.approx(ref, rel=1e-6, abs=1e-12), (layer, stat)
        grads = [g.double() for g in capture.grads]
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        per_sample = torch.cat([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads])
        assert _value(frame, layer, "activation_grad", "norm") == pytest.approx(norm, rel=1e-6)
        sample = float(per_sample.mean())
        assert _value(frame, layer, "activation_grad", "sample_norm") == pytest.approx(
            sample, rel=1e-6
        )
    tanh_out = torch.cat([o.flatten() for o in tanh.outputs]).double()
    saturated = float((tanh_out.abs() >= 0.99).double().mean())
    assert 0 < saturated < 1
    assert _value(frame, "tanh", "activation", "saturated_frac") == pytest.approx(saturated)


class _NaNs(nn.Module):
    def __init__(self, all_nan_calls: set[int]) -> None:
        super().__init__()
        self.all_nan_calls, self.calls = all_nan_calls, 0

    def forward(self, x):
        self.calls += 1
        return x * float("nan") if self.calls in self.all_nan_calls else x - 1.0


def test_all_nan_outputs_have_nan_extremes_and_nan_is_ignored_over_calls():
    x = torch.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
    model = _NaNs({1, 2})
    with gs.watch(model) as rec:
        model(x)  # every value NaN
        rec.step()
        model(x)  # all NaN
        model(x)  # finite: x - 1
        rec.step()
    frame = rec.to_frame()
    assert math.isnan(_value(frame, "_NaNs", "activation", "min"))
    assert math.isnan(_value(frame, "_NaNs", "activation", "max"))
    assert _value(frame, "_NaNs", "activation", "nonfinite") == 3
    # over calls, as within one: extremes of the finite values, NaN counted apart
    assert _value(frame, "_NaNs", "activation", "min", step=1) == -3.0
    assert _value(frame, "_NaNs", "activation", "max", step=1) == 2.0
    assert _value(frame, "_NaNs", "activation", "nonfinite", step=1) == 3


def _scaled_step(model, scaler, opt, x, skip: bool) -> None:
    scaler.scale(model(x).pow(2).sum()).backward()
    if skip:  # what an overflow in one gradient looks like to the scaler
        model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("skipped", [False, True])
def test_output_gradients_are_unscaled_by_the_scale_of_their_own_backward(skipped):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    capture = _Capture(model[1])
    model(x).pow(2).sum().backward()  # the unscaled reference
    ref = capture.grads[0].double()
    capture.grads.clear()
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same forward every time
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gs.watch(model, optimizer=opt, grad_scaler=scaler) as rec:
        if skipped:  # inf found: no optimizer step; the next step halves the scale
            _scaled_step(model, scaler, opt, x, skip=True)
            assert scaler.get_scale() == 512.0
        _scaled_step(model, scaler, opt, x, skip=False)
    frame = rec.to_frame()
    assert frame.step.unique().tolist() == [0]
    assert rec.step_index == 1  # the skipped pass merged into the step that went through
    passes = 2 if skipped else 1
    assert len(capture.grads) == passes
    norm = math.sqrt(passes) * float(ref.norm())  # each pass's gradient, unscaled
    assert _value(frame, "1", "activation_grad", "norm") == pytest.approx(norm, rel=1e-7)
    sample = float(ref.norm(dim=1).mean())
    assert _value(frame, "1", "activation_grad", "sample_norm") == pytest.approx(sample, rel=1e-7)
    weight_ref = float(torch.autograd.grad(model(x).pow(2).sum(), model[0].weight)[0].norm())
    got = _value(frame, "0.weight", "param_grad", "norm")
    assert got == pytest.approx(weight_ref, rel=1e-6)
