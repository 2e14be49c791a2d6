"""The fused statistics (recorder/stats/fused.py): compiled functions for module outputs and
parameters, used on GPUs. The output rows are checked field by field in test_stats_fields.py;
here: nothing in them reads a value on the host, a recorded run through them agrees with the
C kernels, and a failed compile falls back to the eager ops with one warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.lab.models import build_model
from gradscope.recorder.stats import flat, fused, native
from gradscope.recorder.stats.backends import TorchBackend


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (fused.moments, (torch.relu(torch.randn(16, 8)), 16, 8, 1)),
        (fused.sample_norms, (torch.randn(4, 3, 5),)),
        (fused.grad_rows, (torch.randn(3, 40),)),
        (fused.sumsq_rows, (torch.randn(3, 40),)),
        (fused.update_rows, (torch.randn(3, 40), torch.randn(3, 40))),
        (fused.read_rows, (torch.randn(1, 40), torch.randn(1, 40))),
        (fused.after_rows, (torch.randn(1, 40), torch.randn(1, 40), torch.randn(1, 40))),
    ],
)
def test_no_fused_function_reads_a_value_on_the_host(fn, args):
    """Each runs on meta tensors, which hold no values: a host read (.item(), float(), a
    data-dependent branch or shape) would raise there. And dynamo traces each whole, as one
    graph (fullgraph raises at a graph break)."""
    out = fn(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    assert out.device.type == "meta" and out.dtype == torch.float64
    torch.compile(fn, fullgraph=True, dynamic=True, backend="eager")(*args)


@pytest.mark.parametrize(
    ("setting", "devices"),
    [("", fused.DEFAULT_DEVICES), ("1", None), ("0", frozenset())],
)
def test_the_setting_picks_the_devices(setting, devices, monkeypatch):
    monkeypatch.setenv("GRADSCOPE_FUSED", setting)
    assert fused.FusedCalls().devices == devices
    assert frozenset({"cuda"}) == fused.DEFAULT_DEVICES  # the CPU keeps the C kernels and eager ops


def _record(  # type: ignore[no-untyped-def]
    fused_on_cpu: bool, monkeypatch: pytest.MonkeyPatch, alone: int = flat.ALONE
):
    torch.manual_seed(0)
    model = build_model("plain", 4, width=32)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monkeypatch.context() as patch:
        if fused_on_cpu:
            patch.setattr(native, "takes", lambda t: False)
            patch.setenv("GRADSCOPE_FUSED", "1")
            patch.setattr(flat, "ALONE", alone)
        with gs.watch(model, optimizer=opt, every=1) as rec:
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            params = rec._params._stats
            outputs = rec._capture.backends.torch._fused
    if fused_on_cpu:  # the fused path taken, and nothing fell back to eager ops
        assert outputs.devices is None and params.fused and not fused._FAILED
        sizes = [p.numel() for p in model.parameters()]
        assert params._alone == {i for i, n in enumerate(sizes) if n >= alone}
    return rec.to_frame().set_index(["step", "layer", "kind", "stat"]).value


@pytest.mark.usefixtures("inductor_cpu")
@pytest.mark.parametrize("alone", [flat.ALONE, 1000, 0], ids=["flat", "mixed", "alone"])
def test_a_recorded_run_through_the_fused_statistics_agrees_with_the_kernels(alone, monkeypatch):
    """Through the flat buffers, with the large tensors read alone (the weight matrices of
    this model: 1000 values or more) and with every tensor read alone."""
    if native.library() is None:
        pytest.skip("no C compiler: the kernels cannot be built")
    monkeypatch.setattr(fused, "_FAILED", set())
    got, kernels = _record(True, monkeypatch, alone), _record(False, monkeypatch)
    assert got.index.equals(kernels.index)
    kinds = got.index.get_level_values("kind")
    assert {"activation", "param", "param_grad", "update"} <= set(kinds)
    # exact in float64 as the kernels (the eager torch ops' float32 sums are ~1e-7 off),
    # but for the update: its difference after - before is taken in float32, as the eager
    # torch ops take it (exact where the two are within 2x of each other: most values)
    update = np.asarray(kinds == "update")
    np.testing.assert_allclose(got[~update], kernels[~update], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(got[update], kernels[update], rtol=1e-6)


def test_a_failed_compile_falls_back_to_the_eager_ops_with_one_warning(monkeypatch):
    def broken(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("no triton")

    monkeypatch.setattr(fused, "compiled", lambda fn, dtype, dim: broken)
    monkeypatch.setattr(fused, "_FAILED", set())
    backend = TorchBackend()
    backend._fused.devices = None
    x = torch.relu(torch.randn(8, 4))
    with pytest.warns(RuntimeWarning, match="no triton"):
        backend.moments(x, (8, 4, 1))
    assert len(backend.device_parts()) == 5  # the eager ops' parts
    assert not fused.works(fused.moments, x)  # not tried again for this dtype and device
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.moments(x, (8, 4, 1))
    assert len(backend.device_parts()) == 10


def test_the_fused_statistics_move_a_fraction_of_the_eager_bytes():
    """benchmarks/traffic.py's counts: a module output is read once and nothing else runs
    beside its compiled call; the parameters' passes stay at 44 bytes a parameter through
    the flat buffers (two float32 copies, their two reads, the copy turned into before -
    after, its read with the gradients'), and at 20 for a tensor read alone (its copy,
    then gradient, copy and parameter read once), the eager ops' over four times 44."""
    from benchmarks.traffic import per_output_value, per_parameter

    assert per_output_value(True) == 2.0  # one pass over a bf16 output
    assert per_output_value(False) > 20 * 2.0
    fused_bytes, eager_bytes = per_parameter(True), per_parameter(False)
    assert fused_bytes <= 44.5 and eager_bytes > 4 * fused_bytes
    assert per_parameter(True, alone=True) <= 20.5


def test_a_call_under_a_dispatch_mode_does_not_keep_the_function_from_compiling(monkeypatch):
    """Dynamo skips a function for good once it was called under a torch dispatch mode (a
    FlopCounterMode around a recorded step, say): such calls run it as written instead."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(fused, "_FAILED", set())
    x = torch.randn(4, 9)
    with FlopCounterMode(display=False):
        assert torch.equal(fused.rows(fused.sumsq_rows, x), fused.sumsq_rows(x))
    # (fullgraph raises "found no compiled frames" for a function dynamo skips)
    compiled = torch.compile(fused.sumsq_rows, fullgraph=True, dynamic=True, backend="eager")
    assert torch.allclose(compiled(x), fused.sumsq_rows(x), rtol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("alone", [flat.ALONE, 0], ids=["flat", "alone"])
def test_on_cuda_the_parameter_statistics_agree_with_the_kernels(alone, kernels, monkeypatch):
    """The parameter passes as a recorder on a GPU runs them (fused by default there),
    against the C kernels on the same values: through the flat buffers, and read alone."""
    from gradscope.recorder.stats.flat import FlatStats

    monkeypatch.setattr(flat, "ALONE", alone)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in [(64, 32), (64, 32), (32,), (7, 3, 3)]]
    grads = [torch.randn(p.shape, generator=gen) * 1e-20 for p in params]  # tiny squares
    grads[3][0, 0, 0] = float("nan")
    after = [p - 0.01 * torch.randn(p.shape, generator=gen) for p in params]
    present = list(range(len(params)))
    results = []
    for device in ("cpu", "cuda"):
        ps, gs_, later = ([t.to(device) for t in ts] for ts in (params, grads, after))
        stats = native.ParamStats(ps) if device == "cpu" else FlatStats(ps)
        assert device == "cpu" or stats.fused
        stats.snapshot(present, gs_, ps)
        for p, q in zip(ps, later, strict=True):
            p.copy_(q)
        values, update, dots = stats.after(ps, True)
        as_host = [np.asarray(torch.as_tensor(v).cpu()) for v in (*values[:4], update, dots)]
        results.append(as_host)
    (k_gss, k_max, k_bad, k_pss, k_upd, k_dot), (g_gss, g_max, g_bad, g_pss, g_upd, g_dot) = results
    np.testing.assert_allclose(g_gss, k_gss, rtol=1e-12)
    np.testing.assert_array_equal(g_max, k_max)  # NaN ignored by both
    np.testing.assert_array_equal(g_bad, k_bad)
    np.testing.assert_allclose(g_pss, k_pss, rtol=1e-12)
    np.testing.assert_allclose(g_upd.reshape(2, -1)[0], k_upd, rtol=1e-6)
    np.testing.assert_allclose(g_dot, k_dot, rtol=1e-6)


@pytest.mark.usefixtures("inductor_cpu")
def test_each_kind_of_input_stays_compiled(monkeypatch):
    """dynamo compiles one function at most recompile_limit times (8), then runs it
    uncompiled: each dtype and number of dimensions has its own copy, so that a process
    recording many kinds of output keeps them all compiled (here with a limit of 1)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "_FAILED", set())
    fused.compiled.cache_clear()
    graphs = counters["stats"]["unique_graphs"]
    kinds = [
        (dtype, shape) for dtype in (torch.float32, torch.float64) for shape in ((6, 4), (2, 4, 3))
    ]
    with torch._dynamo.config.patch(recompile_limit=1):
        for dtype, shape in kinds:
            x = torch.randn(shape, dtype=dtype)
            layout = (shape[0], 4, x.numel() // (4 * shape[0]))
            np.testing.assert_allclose(
                fused.call(fused.moments, x, *layout), fused.moments(x, *layout), rtol=1e-12
            )
    assert counters["stats"]["unique_graphs"] - graphs == len(kinds)  # each compiled


@pytest.mark.usefixtures("inductor_cpu")
def test_views_of_any_base_share_one_graph(monkeypatch):
    """Module outputs are often views (a reshape, a split): dynamo would guard on each view's
    base and compile again for every kind of base; the inputs are detached first."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "_FAILED", set())
    fused.compiled.cache_clear()
    graphs = counters["stats"]["unique_graphs"]
    for x in (torch.randn(4, 6, 2).view(8, 6), torch.randn(3, 16).view(8, 6), torch.randn(8, 6)):
        np.testing.assert_allclose(
            fused.call(fused.moments, x, 8, 6, 1), fused.moments(x, 8, 6, 1), rtol=1e-12
        )
    assert counters["stats"]["unique_graphs"] - graphs == 1
