"""The fused statistics (recorder/stats/fused.py): one compiled function per module output,
used on GPUs. Their values are checked field by field in test_stats_fields.py; here: nothing
in them reads a value on the host (no graph break), a recorded run through them agrees with
the C kernels, and a failed compile falls back to the eager ops with one warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.lab.models import build_model
from gradscope.recorder.stats import fused, native
from gradscope.recorder.stats.backends import TorchBackend


def test_the_fused_function_is_one_graph_without_host_reads():
    """Dynamo traces it whole: a host read (.item(), a data-dependent branch) would break the
    graph there."""
    x = torch.relu(torch.randn(16, 8))
    explained = torch._dynamo.explain(fused.moments)(x, 16, 8, 1)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize(
    ("setting", "devices"),
    [("", fused.DEFAULT_DEVICES), ("1", None), ("0", frozenset())],
)
def test_the_setting_picks_the_devices(setting, devices, monkeypatch):
    monkeypatch.setenv("GRADSCOPE_FUSED", setting)
    assert fused.FusedMoments().devices == devices
    assert frozenset({"cuda"}) == fused.DEFAULT_DEVICES  # the CPU keeps the C kernels and eager ops


def _record(fused_on_cpu: bool, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model("plain", 4, width=32)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monkeypatch.context() as patch:
        if fused_on_cpu:
            patch.setattr(native, "takes", lambda t: False)
            patch.setenv("GRADSCOPE_FUSED", "1")
        with gs.watch(model, optimizer=opt, every=1) as rec:
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    frame = rec.to_frame()
    return frame[frame.kind == "activation"].set_index(["step", "layer", "stat"]).value


def test_a_recorded_run_through_the_fused_statistics_agrees_with_the_kernels(monkeypatch):
    if native.library() is None:
        pytest.skip("no C compiler: the kernels cannot be built")
    got, kernels = _record(True, monkeypatch), _record(False, monkeypatch)
    assert got.index.equals(kernels.index) and len(got) > 50
    # both exact in float64 (the eager torch ops' float32 sums are ~1e-7 off)
    np.testing.assert_allclose(got.to_numpy(), kernels.to_numpy(), rtol=1e-12, atol=1e-300)


def test_a_failed_compile_falls_back_to_the_eager_ops_with_one_warning(monkeypatch):
    def broken(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("no triton")

    monkeypatch.setattr(fused, "compiled", lambda: broken)
    backend = TorchBackend()
    backend._fused.devices = None
    x = torch.relu(torch.randn(8, 4))
    with pytest.warns(RuntimeWarning, match="no triton"):
        backend.moments(x, (8, 4, 1))
    assert len(backend.device_parts()) == 5  # the eager ops' parts
    assert not backend._fused.takes(x)  # not tried again for this dtype and device
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.moments(x, (8, 4, 1))
    assert len(backend.device_parts()) == 10
