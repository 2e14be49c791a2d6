"""Every implementation of the per-call fields (C kernels, torch ops, compiled-graph rows) fills
every field of fields.OUTPUT and fields.GRAD, and agrees with a float64 reference written
directly in torch, field by field."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch

from gradscope.recorder.stats import graph_ops, native, torch_ops
from gradscope.recorder.stats.backends import NativeBackend, Reader, TorchBackend
from gradscope.recorder.stats.fields import GRAD, GRAPH_GRAD, GRAPH_OUTPUT, OUTPUT, Reduction
from gradscope.recorder.stats.units import unit_axis, unit_shape


def _output_reference(x: torch.Tensor, axis: int | None) -> dict[str, float]:
    d = x.double()
    finite = d[~torch.isnan(d)]
    if axis is None:
        dead, units = float(bool((d == 0).all())), 1.0
    else:
        per_unit = d.movedim(axis, 0).reshape(d.shape[axis], -1)
        dead, units = float((per_unit == 0).all(dim=1).sum()), float(d.shape[axis])
    return {
        "sum": float(d.sum()),
        "sumsq": float(d.square().sum()),
        "min": float(finite.min()) if finite.numel() else math.nan,
        "max": float(finite.max()) if finite.numel() else math.nan,
        "nonzero": float((d != 0).sum()),
        "nonfinite": float((~torch.isfinite(d)).sum()),
        "dead_units": dead,
        "units": units,
    }


def _grad_reference(g: torch.Tensor) -> dict[str, float]:
    rows = g.double().reshape(g.shape[0], -1)
    norms = rows.square().sum(dim=1).sqrt()
    return {
        "sumsq": float(rows.square().sum()),
        "sample_norm_sum": float(norms.sum()),
        "nonfinite_samples": float((~torch.isfinite(norms)).sum()),
    }


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    relu = torch.relu(torch.randn(64, 33, generator=gen))
    relu[:, [2, 7]] = 0.0  # dead features
    conv = torch.relu(torch.randn(4, 6, 5, 5, generator=gen))
    conv[:, 1] = 0.0  # a dead channel
    nonfinite = torch.randn(16, 9, generator=gen)
    nonfinite[3, 4], nonfinite[5, 0] = math.inf, math.nan
    return {
        "relu": relu,
        "relu64": relu.double(),
        "conv": conv,
        "subnormal": torch.full((32, 8), 1e-39) * torch.rand(32, 8, generator=gen),
        "nonfinite": nonfinite,
        "sequence": torch.randn(3, 7, 11, generator=gen),
    }


def _transferred(backend: NativeBackend | TorchBackend) -> tuple[np.ndarray, np.ndarray]:
    """The backend's tables read back as after the step's transfer."""
    parts = backend.device_parts()
    flat = (
        torch.cat([p.reshape(-1).double().cpu() for p in parts]).numpy() if parts else np.zeros(0)
    )
    return backend.decoder()(Reader(flat))


def _torch_output_row(x: torch.Tensor, axis: int | None) -> np.ndarray:
    backend = TorchBackend()
    backend.moments(x, unit_shape(x.shape, axis))
    return _transferred(backend)[0][0]


def _fused_output_row(x: torch.Tensor, axis: int | None) -> np.ndarray:
    backend = TorchBackend()
    backend._fused.devices = None  # on every device, the CPU included (GRADSCOPE_FUSED=1)
    backend.moments(x, unit_shape(x.shape, axis))
    assert len(backend.device_parts()) == 1  # the fused row, not the eager ops' five parts
    return _transferred(backend)[0][0]


def _cuda_output_row(x: torch.Tensor, axis: int | None) -> np.ndarray:
    """On a CUDA device, as a recorder there computes them (the fused statistics)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    backend = TorchBackend()
    backend.moments(x.cuda(), unit_shape(x.shape, axis))
    assert len(backend.device_parts()) == 1  # fused
    return _transferred(backend)[0][0]


def _native_output_row(x: torch.Tensor, axis: int | None) -> np.ndarray:
    backend = NativeBackend()
    backend.moments(x, unit_shape(x.shape, axis))
    return _transferred(backend)[0][0]


def _graph_output_row(x: torch.Tensor, axis: int | None) -> np.ndarray:
    return graph_ops.output_row(x, None, axis).numpy()[: len(OUTPUT)]


OUTPUT_PATHS = {
    "kernels": _native_output_row,
    "torch": _torch_output_row,
    "fused": _fused_output_row,
    "cuda": _cuda_output_row,
    "graph": _graph_output_row,
}


def test_the_references_cover_every_field():
    x = torch.ones(2, 3)
    assert tuple(_output_reference(x, 1)) == OUTPUT.names
    assert tuple(_grad_reference(x)) == GRAD.names
    assert GRAPH_OUTPUT.names[: len(OUTPUT)] == OUTPUT.names
    assert GRAPH_GRAD.names[: len(GRAD)] == GRAD.names
    assert {f.reduction for f in OUTPUT} == set(Reduction)


@pytest.mark.parametrize("path", list(OUTPUT_PATHS))
@pytest.mark.parametrize("name", list(_tensors()))
def test_output_fields_agree_with_float64_references(path, name, kernels, request):
    if path == "fused":
        request.getfixturevalue("inductor_cpu")
    x = _tensors()[name]
    axis = unit_axis(x.dim(), False)
    ref = _output_reference(x, axis)
    got = OUTPUT_PATHS[path](x, axis)
    assert got.shape == (len(OUTPUT),)
    # float64 sums: a few ulp per term apart (summation order); the torch ops' float32
    # cascade sum of values to ~1e-7 of the sum of magnitudes (squares are recounted in
    # float64 where they may have underflowed)
    magnitude = float(x.double().abs().nan_to_num(posinf=0).sum())
    sum_tol = 1e-6 * magnitude if path == "torch" and x.dtype == torch.float32 else 1e-12
    for field in OUTPUT:
        a, b = got[OUTPUT.index(field.name)], ref[field.name]
        if field.name == "sum":
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=sum_tol) or (
                math.isnan(a) and math.isnan(b)
            ), (field.name, a, b)
        elif field.name == "sumsq":
            tol = 1e-6 if path == "torch" and x.dtype == torch.float32 else 1e-12
            assert math.isclose(a, b, rel_tol=tol) or (math.isnan(a) and math.isnan(b)), (
                field.name,
                a,
                b,
            )
            assert not b > 0 or a > 0  # subnormal squares never reported as 0
        else:  # counts and extremes: exact
            assert a == b or (math.isnan(a) and math.isnan(b)), (field.name, a, b)


def _torch_grad_row(g: torch.Tensor) -> np.ndarray:
    backend = TorchBackend()
    backend.grad(g, g.shape[0])
    return _transferred(backend)[1][0]


def _fused_grad_row(g: torch.Tensor) -> np.ndarray:
    backend = TorchBackend()
    backend._fused.devices = None  # as GRADSCOPE_FUSED=1
    with mock.patch.object(torch_ops, "sample_norms", side_effect=AssertionError("eager")):
        backend.grad(g, g.shape[0])
    return _transferred(backend)[1][0]


def _cuda_grad_row(g: torch.Tensor) -> np.ndarray:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    backend = TorchBackend()
    with mock.patch.object(torch_ops, "sample_norms", side_effect=AssertionError("eager")):
        backend.grad(g.cuda(), g.shape[0])
    return _transferred(backend)[1][0]


def _native_grad_row(g: torch.Tensor) -> np.ndarray:
    backend = NativeBackend()
    backend.grad(g, g.shape[0])
    return _transferred(backend)[1][0]


def _graph_grad_row(g: torch.Tensor) -> np.ndarray:
    return graph_ops.grad_row(g).numpy()[: len(GRAD)]


GRAD_PATHS = {
    "kernels": _native_grad_row,
    "torch": _torch_grad_row,
    "fused": _fused_grad_row,
    "cuda": _cuda_grad_row,
    "graph": _graph_grad_row,
}


@pytest.mark.parametrize("path", list(GRAD_PATHS))
@pytest.mark.parametrize("name", list(_tensors()))
def test_grad_fields_agree_with_float64_references(path, name, kernels, request):
    if path == "fused":
        request.getfixturevalue("inductor_cpu")
    g = _tensors()[name]
    ref = _grad_reference(g)
    got = GRAD_PATHS[path](g)
    assert got.shape == (len(GRAD),)
    for field in GRAD:
        a, b = got[GRAD.index(field.name)], ref[field.name]
        tol = 1e-6 if path == "torch" and g.dtype == torch.float32 else 1e-12
        assert (
            math.isclose(a, b, rel_tol=tol)
            or (math.isnan(a) and math.isnan(b))
            or (math.isinf(a) and a == b)
        ), (field.name, a, b)


def test_native_rows_are_the_schema():
    assert OUTPUT.names == native.OUTPUT_FIELDS and GRAD.names == native.GRAD_FIELDS
