import math
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.lab.models import build_model
from gradscope.recorder.stats import flat, native

# every test runs twice: statistics from the C kernels, and from torch ops
pytestmark = pytest.mark.usefixtures("stats_path")


def _value(frame, layer, kind, stat, step=0):
    rows = frame[
        (frame.layer == layer) & (frame.kind == kind) & (frame.stat == stat) & (frame.step == step)
    ]
    assert len(rows) == 1, (layer, kind, stat, len(rows))
    return float(rows.value.iloc[0])


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_schema_columns_and_kinds():
    torch.manual_seed(0)
    model = build_model("plain", 2, width=16, activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.watch(model, optimizer=opt) as rec:
        _train_step(model, opt, torch.randn(8, 784), torch.randint(0, 10, (8,)))
    frame = rec.to_frame()
    assert list(frame.columns) == ["step", "layer", "kind", "stat", "value"]
    stats = frame.groupby("kind")["stat"].unique().map(set).to_dict()
    assert {"norm", "max_abs", "nonfinite"} <= stats["param_grad"]
    assert {"norm", "ratio"} <= stats["update"]
    assert {
        "mean",
        "std",
        "rms",
        "zero_frac",
        "saturated_frac",
        "min",
        "max",
        "nonfinite",
    } <= stats["activation"]
    assert {"norm", "sample_norm"} <= stats["activation_grad"]
    assert "blocks.0.fc.weight" in set(frame.layer) and "blocks.0.act" in set(frame.layer)
    assert len(frame[(frame.layer == "*") & (frame.kind == "param_grad")]) == 1


def test_param_norms_match_float64_reference_at_subnormal_scale():
    torch.manual_seed(0)
    model = build_model("plain", 100)
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    rec = gs.watch(model)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rec.step()
    frame = rec.to_frame()
    rec.detach()
    first = grads["blocks.0.fc.weight"]
    assert float(torch.linalg.vector_norm(first)) == 0.0  # float32 squares underflow here
    for name, g in grads.items():
        ref = float(torch.linalg.vector_norm(g.double()))
        got = _value(frame, name, "param_grad", "norm")
        assert got > 0 and got == pytest.approx(ref, rel=1e-6), name
        assert _value(frame, name, "param_grad", "max_abs") == float(g.abs().max())
    total = math.sqrt(sum(float(torch.linalg.vector_norm(g.double())) ** 2 for g in grads.values()))
    assert _value(frame, "*", "param_grad", "norm") == pytest.approx(total, rel=1e-6)
    assert _value(frame, "blocks.0.fc.weight", "param_grad", "norm") < 1e-30


def test_activation_stats_match_direct_formulas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5), nn.Sigmoid())
    x = torch.randn(64, 10)
    outs = {}
    model[1].register_forward_hook(lambda m, a, o: outs.__setitem__("relu", o.detach().clone()))
    model[3].register_forward_hook(lambda m, a, o: outs.__setitem__("sig", o.detach().clone()))
    rec = gs.watch(model)
    model(x).sum().backward()
    rec.step()
    frame = rec.to_frame()
    relu, sig = outs["relu"].double(), outs["sig"].double()
    assert _value(frame, "1", "activation", "mean") == pytest.approx(float(relu.mean()), rel=1e-6)
    assert _value(frame, "1", "activation", "std") == pytest.approx(
        float(relu.std(unbiased=False)), rel=1e-6
    )
    assert _value(frame, "1", "activation", "rms") == pytest.approx(
        float(relu.square().mean().sqrt()), rel=1e-6
    )
    assert _value(frame, "1", "activation", "zero_frac") == pytest.approx(
        float((relu == 0).double().mean())
    )
    assert _value(frame, "1", "activation", "max") == float(relu.max())
    saturated = ((sig <= 0.01) | (sig >= 0.99)).double().mean()
    assert _value(frame, "3", "activation", "saturated_frac") == pytest.approx(float(saturated))
    assert "saturated_frac" not in set(frame[frame.layer == "1"].stat)


def test_activation_grad_norms_match_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(16, 6)
    h = model[1](model[0](x))
    h.retain_grad()
    model[2](h).pow(2).sum().backward()
    ref = h.grad.double()
    model.zero_grad()
    rec = gs.watch(model)
    model(x).pow(2).sum().backward()
    rec.step()
    frame = rec.to_frame()
    assert _value(frame, "1", "activation_grad", "norm") == pytest.approx(
        float(ref.norm()), rel=1e-6
    )
    sample = float(ref.norm(dim=1).mean())
    assert _value(frame, "1", "activation_grad", "sample_norm") == pytest.approx(sample, rel=1e-6)


def test_output_gradients_of_leaves_and_of_outputs_changed_in_place():
    """A module that passes a leaf through (no node made it: a tensor hook reads its gradient)
    and a module whose output the next one changes in place (its gradient is the one w.r.t.
    the value it returned, as a tensor hook registered at that moment would see it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x = torch.randn(16, 6, requires_grad=True)
    rec = gs.watch(model)
    model(x).pow(2).sum().backward()
    rec.step()
    rec.detach()
    frame = rec.to_frame()
    assert _value(frame, "0", "activation_grad", "norm") == pytest.approx(
        float(x.grad.double().norm()), rel=1e-6
    )
    # the reference: the same graph, the gradient w.r.t. the Linear's output before the ReLU
    x2 = x.detach()
    pre = model[1](x2)
    pre.retain_grad()
    model[3](torch.relu(pre)).pow(2).sum().backward()
    assert _value(frame, "1", "activation_grad", "norm") == pytest.approx(
        float(pre.grad.double().norm()), rel=1e-6
    )
    assert _value(frame, "1", "activation", "min") == pytest.approx(
        float(pre.detach().min()), rel=1e-6
    )


class _Block(nn.Module):
    """Linear, tanh, Linear; with `in_place`, the last Linear's output scaled in place."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(self.act(self.lin(x)))
        if self.in_place:
            y.mul_(3.0)  # the same tensor, a new version
        return y


def test_an_output_seen_by_two_modules():
    """A block returns its last layer's output: the same tensor, whose statistics are copied
    rather than computed twice; a block that scales that output in place returns the same
    tensor with new values, read again. Both checked against the tensors themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(False), _Block(True))
    outs = {}
    for name in ("0", "0.out", "1", "1.out"):
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: outs.__setitem__(name, o.detach().clone())
        )
    x = torch.randn(16, 6)
    y0 = model[0](x)
    y0.retain_grad()
    y1 = model[1](y0)
    y1.retain_grad()
    y1.pow(2).sum().backward()
    grads = {"0": y0.grad.double(), "1": y1.grad.double()}
    model.zero_grad()
    rec = gs.watch(model)
    model(x).pow(2).sum().backward()
    rec.step()
    frame = rec.to_frame()
    for name in ("0", "0.out", "1", "1.out"):
        ref = outs[name].double()
        assert _value(frame, name, "activation", "rms") == pytest.approx(
            float(ref.square().mean().sqrt()), rel=1e-6
        )
        assert _value(frame, name, "activation", "max") == float(outs[name].max())
    assert _value(frame, "1", "activation", "rms") == pytest.approx(
        3 * _value(frame, "1.out", "activation", "rms"), rel=1e-6
    )
    assert _value(frame, "0", "activation_grad", "norm") == pytest.approx(
        float(grads["0"].norm()), rel=1e-6
    )
    assert _value(frame, "0.out", "activation_grad", "norm") == pytest.approx(
        float(grads["0"].norm()), rel=1e-6
    )
    # the gradient w.r.t. the last Linear's own output is 3x the one w.r.t. the block's
    assert _value(frame, "1.out", "activation_grad", "norm") == pytest.approx(
        3 * float(grads["1"].norm()), rel=1e-6
    )
    assert _value(frame, "1", "activation_grad", "norm") == pytest.approx(
        float(grads["1"].norm()), rel=1e-6
    )


def test_inference_tensors_passed_through():
    """Modules that pass an inference tensor through (it has no version counter): each call
    is read, none taken for the last one unchanged."""

    class Shift(nn.Module):  # an addition: saves no input for backward
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.zeros(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b

    with torch.inference_mode():
        x = torch.randn(4, 6)
    model = nn.Sequential(nn.Identity(), nn.Identity(), Shift())
    rec = gs.watch(model)
    model(x).sum().backward()
    rec.step()
    frame = rec.to_frame()
    for name in ("0", "1"):
        assert _value(frame, name, "activation", "rms") == pytest.approx(
            float(x.double().square().mean().sqrt()), rel=1e-6
        )


def test_sparse_gradients_are_read_as_the_dense_tensors_they_stand_for():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    with gs.watch(model, optimizer=opt) as rec:
        model(torch.tensor([[1, 2, 2], [3, 1, 9]])).pow(2).sum().backward()
        grad = model[0].weight.grad.to_dense()
        opt.step()
    frame = rec.to_frame()
    assert _value(frame, "0.weight", "param_grad", "norm") == pytest.approx(
        float(grad.double().norm()), rel=1e-6
    )
    assert _value(frame, "0.weight", "param_grad", "max_abs") == float(grad.abs().max())
    applied = (model[0].weight.detach() - before).double().norm()
    assert _value(frame, "0.weight", "update", "norm") == pytest.approx(float(applied), rel=1e-6)


def test_parameters_resized_or_retyped_between_steps():
    """`p.data = ...` between recorded steps gets new buffers, not reads past the old ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    with gs.watch(model, optimizer=opt) as rec:
        for step in range(3):
            if step == 1:  # a wider first layer (and a matching second)
                model[0].weight.data = torch.randn(300, 4)
                model[0].bias.data = torch.randn(300)
                model[1].weight.data = torch.randn(2, 300)
            if step == 2:
                model.double()
                x = x.double()
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).sum().backward()
            grad = model[0].weight.grad.detach().clone()
            opt.step()
            frame = rec.to_frame()
            assert _value(frame, "0.weight", "param_grad", "norm", step) == pytest.approx(
                float(grad.double().norm()), rel=1e-6
            )
            assert _value(frame, "0.weight", "param", "norm", step) > 0


class _HalvingSGD(torch.optim.SGD):
    """An optimizer that changes the gradients in place in its step, from step `start` on."""

    def __init__(self, params, start: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=0.1)
        self.start, self.steps = start, 0

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        if self.steps >= self.start:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.mul_(0.5)
        self.steps += 1
        return super().step(closure)


@pytest.mark.parametrize("path", ["default", "fused-alone"])
@pytest.mark.parametrize("start", [0, 2])
def test_gradients_changed_in_place_by_the_optimizer(start, path, monkeypatch, request):
    """Gradient statistics are of the gradients the update was given, also where the optimizer
    changes them in place: seen at the first recorded step, they are read before the update
    from then on; seen later (start=2), that step's are of the changed gradients, with a
    warning, and later steps' are exact again. On the paths that read gradients after the
    update (the C kernels; the fused torch ops, used on GPUs, for the tensors read alone),
    and on the eager torch ops, which read them before."""
    if path == "fused-alone":
        request.getfixturevalue("inductor_cpu")
        monkeypatch.setattr(native, "takes", lambda t: False)
        monkeypatch.setenv("GRADSCOPE_FUSED", "1")
        monkeypatch.setattr(flat, "ALONE", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    # a plain SGD made first: torch then runs step hooks around SGD.step too, so that
    # _HalvingSGD's super().step() runs them a second time, inside its own step
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    opt = _HalvingSGD(model.parameters(), start)
    rec = gs.watch(model, optimizer=opt)
    norms = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(5, 6)).pow(2).sum().backward()
            norms.append(float(model[0].weight.grad.double().norm()))
            opt.step()
    after = rec._params._stats.grads_after  # gradients read after the update
    assert after or path == "default"
    rec.detach()
    changed = [w for w in caught if "changed gradients in place" in str(w.message)]
    assert len(changed) == (1 if start == 2 and after else 0)
    frame = rec.to_frame()
    assert sorted(set(frame.step)) == [0, 1, 2, 3]  # one step per update, not per hook call
    for step, ref in enumerate(norms):
        got = _value(frame, "0.weight", "param_grad", "norm", step)
        want = ref / 2 if start == 2 and step == 2 and after else ref
        assert got == pytest.approx(want, rel=1e-6), step


def test_a_step_that_raised_leaves_later_steps_recorded():
    """A step that raises inside the optimizer runs no post-hook; the next step is a new
    update, not one nested in the failed one."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gs.watch(model, optimizer=opt)

    def failing() -> torch.Tensor:
        raise RuntimeError("boom")

    for step in range(4):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        if step == 1:
            with pytest.raises(RuntimeError, match="boom"):
                opt.step(failing)
        else:
            opt.step()
    rec.detach()
    frame = rec.to_frame()
    assert sorted(set(frame[frame.kind == "param_grad"].step)) == [0, 1, 2]


def test_update_is_what_the_optimizer_applied():
    torch.manual_seed(0)
    model = build_model("preln", 2, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with gs.watch(model, optimizer=opt) as rec:
        _train_step(model, opt, torch.randn(8, 784), torch.randint(0, 10, (8,)))
    frame = rec.to_frame()
    for name, p in model.named_parameters():
        delta = (p.detach() - before[name]).double()
        assert _value(frame, name, "update", "norm") == pytest.approx(float(delta.norm()), rel=1e-6)
        weight_norm = float(before[name].double().norm())
        ratio = _value(frame, name, "update", "ratio")
        if weight_norm == 0:  # zero-initialized biases: no ratio to give
            assert math.isnan(ratio)
        else:
            assert ratio == pytest.approx(float(delta.norm()) / weight_norm, rel=1e-6)


def test_micro_batches_and_shared_modules_aggregate():
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # called twice per forward
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(4, 5), torch.randn(6, 5)]
    outputs = []
    handle = shared.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone()))
    with gs.watch(model, optimizer=opt) as rec:
        opt.zero_grad()
        for x in xs:  # gradient accumulation over two micro-batches
            model(x).sum().backward()
        grad = shared.weight.grad.clone()
        opt.step()
    handle.remove()
    frame = rec.to_frame()
    assert frame.step.unique().tolist() == [0]
    allout = torch.cat([o.flatten() for o in outputs]).double()
    assert len(outputs) == 4
    layer = "0"  # the shared module's first fqn
    assert _value(frame, layer, "activation", "mean") == pytest.approx(
        float(allout.mean()), rel=1e-6
    )
    assert _value(frame, layer, "activation", "rms") == pytest.approx(
        float(allout.square().mean().sqrt()), rel=1e-6
    )
    assert _value(frame, "0.weight", "param_grad", "norm") == pytest.approx(
        float(grad.double().norm()), rel=1e-6
    )


def test_nonfinite_values_are_counted_and_localized():
    class Boom(nn.Module):
        def forward(self, x):
            return x / 0.0 * 0.0  # NaN wherever x is finite

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Boom(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.watch(model, optimizer=opt) as rec:
        _train_step(model, opt, torch.randn(3, 4), torch.tensor([0, 1, 0]))
    frame = rec.to_frame()
    assert _value(frame, "2", "activation", "nonfinite") == 12
    assert _value(frame, "1", "activation", "nonfinite") == 0
    assert _value(frame, "3.weight", "param_grad", "nonfinite") == 8
    assert gs.NonfiniteEvent(0, "forward", "2") in rec.nonfinite
    backward = [e for e in rec.nonfinite if e.phase == "backward"]
    assert backward and backward[0].layer == "3"
    origin = frame[frame.kind == "nonfinite_origin"]
    assert set(zip(origin.stat, origin.layer, strict=True)) >= {("forward", "2"), ("backward", "3")}


def test_every_and_callable_selection():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for every, expected in ((3, [0, 3, 6]), (lambda s: s in (1, 5), [1, 5])):
        with gs.watch(model, optimizer=opt, every=every) as rec:
            for _ in range(7):
                _train_step(model, opt, torch.randn(2, 3), torch.tensor([0, 1]))
        assert sorted(rec.to_frame().step.unique()) == expected


def test_forward_hooks_only_on_recorded_steps():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gs.watch(model, optimizer=opt, every=2):
        assert model[0]._forward_hooks  # step 0 is recorded
        _train_step(model, opt, torch.randn(2, 3), torch.tensor([0, 1]))
        assert not model[0]._forward_hooks  # step 1 is not: no hook runs
        _train_step(model, opt, torch.randn(2, 3), torch.tensor([0, 1]))
        assert model[0]._forward_hooks


def test_include_exclude():
    model = build_model("preln", 2, width=8)
    rec = gs.watch(model, include="blocks.*", exclude=lambda fqn, m: isinstance(m, nn.LayerNorm))
    model(torch.randn(2, 784)).sum().backward()
    rec.step()
    layers = set(rec.to_frame().layer)
    rec.detach()
    assert "blocks.0.fc1" in layers and "blocks.1.fc2.weight" in layers
    assert not any(n.startswith(("embed", "head")) or ".norm" in n for n in layers - {"*"})


def test_detach_is_idempotent_and_leaves_nothing():
    model = build_model("preln", 2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs_before = {n: set(vars(m)) for n, m in model.named_modules()}
    rec = gs.watch(model, optimizer=opt)
    with pytest.raises(gs.RecorderError, match="another gradscope Recorder"):
        gs.watch(model)
    gs.watch(model, allow_multiple=True).detach()
    rec.detach()
    rec.detach()
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs_before
    assert state_before.keys() == model.state_dict().keys()
    gs.watch(model).detach()  # attachable again


def test_hooks_do_not_change_outputs_or_gradients():
    torch.manual_seed(0)
    model = build_model("postln", 3, width=16)
    x = torch.randn(8, 784)
    ref_out = model(x)
    ref_out.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with gs.watch(model) as rec:
        out = model(x)
        out.sum().backward()
        rec.step()
    assert torch.equal(out, ref_out)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref_grads, strict=True))


def test_no_grad_passes_are_skipped_and_frozen_params_ignored():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    rec = gs.watch(model)
    with torch.no_grad():
        model(torch.randn(100, 3) + 50.0)  # an evaluation pass with very different outputs
    x = torch.randn(2, 3)
    model(x).sum().backward()
    rec.step()
    frame = rec.to_frame()
    rec.detach()
    assert "0.weight" not in set(frame.layer) and "0.bias" in set(frame.layer)
    # only the 2-sample pass counts
    expected = model[0](x).detach().double().mean()
    assert _value(frame, "0", "activation", "mean") == pytest.approx(float(expected), rel=1e-6)
    assert frame.step.unique().tolist() == [0]


def test_models_without_parameters():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.raises(gs.RecorderError, match="no trainable parameters"):
        gs.watch(model, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    rec = gs.watch(model)
    model(torch.randn(4, 3, requires_grad=False))
    rec.step()
    frame = rec.to_frame()
    rec.detach()
    assert set(frame.kind) == {"activation"}
    # an unbounded activation alone: the C kernels write every row, nothing goes to the host
    relu = nn.ReLU()
    with gs.watch(relu) as rec:
        relu(torch.tensor([[-1.0, 0.0, 2.0, 3.0]]))
        rec.step()
    frame = rec.to_frame()
    assert _value(frame, "ReLU", "activation", "zero_frac") == 0.5
    assert _value(frame, "ReLU", "activation", "max") == 3.0


def test_tuple_dict_and_none_outputs():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return x

    class TupleOut(nn.Module):
        def forward(self, x):
            return x * 2, {"a": x + 1, "idx": x.argmax(1)}, None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.multi = TupleOut()

        def forward(self, x):
            a, d, _ = self.multi(self.lin(x))
            return a.sum() + d["a"].sum()

    net = Net()
    rec = gs.watch(net)
    net(torch.randn(2, 3)).backward()
    rec.step()
    layers = set(rec.to_frame().layer)
    rec.detach()
    assert {"multi[0]", "multi[1][a]"} <= layers and "multi[1][idx]" not in layers


def test_outputs_made_by_one_node_get_their_own_gradients():
    """chunk() returns two tensors made by one autograd node: each output's gradient is its
    own (the node's pre-hook sees both, the recorder takes the one at the output's index)."""

    class Halves(nn.Module):
        def forward(self, x):
            return x.chunk(2, dim=1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Halves())
    x = torch.randn(5, 4)
    rec = gs.watch(model)
    first, second = model(x)
    (first.sum() + 3 * second.sum()).backward()
    rec.step()
    rec.detach()
    frame = rec.to_frame()
    ones = math.sqrt(5 * 3)  # the gradient of a sum is 1 at each of the 5 x 3 values
    assert _value(frame, "1[0]", "activation_grad", "norm") == pytest.approx(ones, rel=1e-6)
    assert _value(frame, "1[1]", "activation_grad", "norm") == pytest.approx(3 * ones, rel=1e-6)
    assert _value(frame, "1[1]", "activation_grad", "sample_norm") == pytest.approx(
        3 * math.sqrt(3), rel=1e-6
    )


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_and_cnn(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gs.watch(model, optimizer=opt) as rec:
        opt.zero_grad()
        model(torch.randn(4, 5, 16)).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    frame = rec.to_frame()
    assert "layers.1.norm2" in set(frame.layer) and "layers.0.linear1" in set(frame.layer)
    for name, g in grads.items():
        assert _value(frame, name, "param_grad", "norm") == pytest.approx(
            float(g.double().norm()), rel=1e-6
        )
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
    )
    rec = gs.watch(cnn)
    cnn(torch.randn(2, 1, 28, 28)).sum().backward()
    rec.step()
    assert {"0", "1", "2", "4"} <= set(rec.to_frame().layer)
    rec.detach()


def test_misuse_is_reported():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gs.watch(model, optimizer=opt)
    with pytest.raises(gs.RecorderError, match="optimizer is attached"):
        rec.step()
    rec.detach()
    with pytest.raises(gs.RecorderError, match="detached"):
        rec.step()
    with pytest.raises(ValueError, match="every"):
        gs.Recorder(every=0)
    empty = gs.Recorder().to_frame()  # nothing recorded: no rows, the schema's columns
    assert len(empty) == 0 and list(empty.columns) == ["step", "layer", "kind", "stat", "value"]
    assert empty.dtypes.astype(str).tolist() == ["int64", "object", "object", "object", "float64"]


def test_subnormal_output_gradients_are_never_reported_as_zero():
    model = nn.Sequential(nn.Linear(4, 4))
    rec = gs.watch(model)
    (model(torch.randn(3, 4)) * 1e-39).sum().backward()  # every output gradient is 1e-39
    rec.step()
    frame = rec.to_frame()
    rec.detach()
    grad = torch.full((3, 4), 1e-39)  # the float32 value autograd produced
    assert float(torch.linalg.vector_norm(grad)) == 0.0
    expected = float(torch.linalg.vector_norm(grad.double()))
    assert _value(frame, "0", "activation_grad", "norm") == pytest.approx(expected, rel=1e-6)
    sample = float(torch.linalg.vector_norm(grad.double(), dim=1).mean())
    assert _value(frame, "0", "activation_grad", "sample_norm") == pytest.approx(sample, rel=1e-6)


def test_long_rows_and_large_tensors_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 300_000))
    out = {}
    model[0].register_forward_hook(lambda m, a, o: out.__setitem__("y", o.detach().clone()))
    rec = gs.watch(model)
    y = model(torch.randn(2, 3))
    y.retain_grad()
    (y.pow(2) * 1e3).sum().backward()
    rec.step()
    frame = rec.to_frame()
    rec.detach()
    ref = y.grad.double()
    assert _value(frame, "0", "activation_grad", "norm") == pytest.approx(
        float(ref.norm()), rel=1e-6
    )
    rms = float(out["y"].double().square().mean().sqrt())
    assert _value(frame, "0", "activation", "rms") == pytest.approx(rms, rel=1e-6)
    weight = float(model[0].weight.grad.double().norm())
    assert _value(frame, "0.weight", "param_grad", "norm") == pytest.approx(weight, rel=1e-6)


def test_spilled_rows_come_back_identical(tmp_path):
    torch.manual_seed(0)
    model = build_model("plain", 3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    held = gs.Recorder()
    spilled = gs.Recorder(allow_multiple=True, spill_to=tmp_path / "rows", spill_rows=150)
    held.attach(model, opt)
    spilled.attach(model, opt)
    most_held = 0
    for _ in range(12):
        _train_step(model, opt, x, y)
        most_held = max(most_held, spilled.rows_held)
    per_step = len(held.to_frame()) // 12
    assert spilled.rows_held < 150 and most_held < 150 + per_step
    parts = sorted((tmp_path / "rows").glob("part-*.parquet"))
    assert len(parts) >= 5
    before_detach = spilled.to_frame()
    pd.testing.assert_frame_equal(before_detach, held.to_frame())
    spilled.detach()  # writes what is still held
    assert spilled.rows_held == 0
    pd.testing.assert_frame_equal(spilled.to_frame(), before_detach)
    on_disk = pd.concat([pd.read_parquet(p) for p in sorted(parts[0].parent.glob("*.parquet"))])
    assert len(on_disk) == len(before_detach)
    held.detach()
    with pytest.raises(gs.RecorderError, match="another recording"):
        gs.Recorder(spill_to=tmp_path / "rows").attach(model, opt)


def test_a_spilling_recorder_goes_on_after_reattaching(tmp_path):
    torch.manual_seed(0)
    model = build_model("plain", 2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    rec = gs.Recorder(spill_to=tmp_path / "rows", spill_rows=10)
    for _ in range(2):  # e.g. detached for an evaluation, then training goes on
        rec.attach(model, opt)
        for _ in range(3):
            _train_step(model, opt, x, y)
        rec.detach()
    frame = rec.to_frame()
    assert sorted(frame.step.unique()) == [0, 1, 2, 3, 4, 5]
    parts = sorted((tmp_path / "rows").glob("part-*.parquet"))
    assert len(parts) == 6  # a part per step: each held more than spill_rows rows
    on_disk = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(on_disk, frame)


def test_constant_values_and_tiny_updates_are_exact():
    # constant tensors are where float32 norms that add squares one by one drift (1e-5 at
    # 100k elements); the recorder must still match float64 to 1e-6
    model = nn.Sequential(nn.Linear(1000, 400), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(1e-21)  # its square, 1e-42, is a float32 subnormal
    x = torch.full((256, 1000), 0.1)
    plain32 = float(torch.linalg.vector_norm(model[0].weight.detach()))
    ref_weight = float(model[0].weight.detach().double().norm())
    assert abs(plain32 - ref_weight) / ref_weight > 1e-6  # the case is a hard one
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)  # updates of ~1e-30
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with gs.watch(model, optimizer=opt) as rec:
        out = model(x)
        out.retain_grad()
        out.sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    frame = rec.to_frame()
    for name, p in model.named_parameters():
        ref = float(before[name].double().norm())
        assert _value(frame, name, "param", "norm") == pytest.approx(ref, rel=1e-6)
        ref = float(grads[name].double().norm())
        assert _value(frame, name, "param_grad", "norm") == pytest.approx(ref, rel=1e-6)
        # the weight's update is below its float32 spacing: nothing applied, 0 recorded
        ref = float((p.detach().double() - before[name].double()).norm())
        assert (ref > 0) == name.endswith("bias")
        assert _value(frame, name, "update", "norm") == pytest.approx(ref, rel=1e-6, abs=0)
    act = out.detach().double()
    assert _value(frame, "1", "activation", "rms") == pytest.approx(
        float(act.square().mean().sqrt()), rel=1e-6
    )
    assert _value(frame, "1", "activation_grad", "norm") == pytest.approx(
        float(out.grad.double().norm()), rel=1e-6
    )
