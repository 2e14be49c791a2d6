"""The C kernels against the direct float64 torch computation on the same tensors."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gradscope.recorder.stats import native
from gradscope.recorder.stats import torch_ops as stats

pytestmark = pytest.mark.usefixtures("kernels")


def _moments(x: torch.Tensor) -> np.ndarray:
    out = np.full(6, -1.0)
    native.moments(x, out.ctypes.data)
    return out


def _reference(x: torch.Tensor) -> list[float]:
    d = x.double()
    finite = d[~torch.isnan(d)]
    return [
        float(d.sum()),
        float(d.square().sum()),
        float(finite.min()),
        float(finite.max()),
        float((d != 0).sum()),
        float((~torch.isfinite(d)).sum()),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_match_float64_formulas(dtype):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(300, 77, dtype=dtype))  # zeros for the count
    np.testing.assert_allclose(_moments(x), _reference(x), rtol=1e-12)
    # a transposed (non-contiguous) view gives the same as its values
    np.testing.assert_allclose(_moments(x.t()), _reference(x.t()), rtol=1e-12)


def test_moments_are_exact_where_float32_sums_are_not():
    x = torch.full((1_000_000,), 0.1)
    naive = float(torch.linalg.vector_norm(x)) ** 2
    ref = _reference(x)
    assert abs(naive - ref[1]) / ref[1] > 1e-6  # float32 one-by-one sums drift here
    # float64 sums of 1e6 terms differ by summation order alone (vector lanes vs torch's
    # pairwise sum) by up to ~n * 2**-53 / lanes: a few 1e-12 relative
    np.testing.assert_allclose(_moments(x), ref, rtol=1e-10)
    tiny = torch.full((1000,), 1e-39)  # float32 subnormals: their squares are 0 in float32
    assert float(tiny.square().sum()) == 0.0
    np.testing.assert_allclose(_moments(tiny), _reference(tiny), rtol=1e-12)


def test_moments_over_count_blocks():
    """Non-zeros are counted in blocks of 2**20 elements; a tensor of several blocks and a
    tail, its extremes in the last block, still gives one exact count and the extremes."""
    torch.manual_seed(3)
    x = torch.relu(torch.randn(3 * 2**20 + 17))
    x[-1], x[-2] = 9.0, -7.0
    got, ref = _moments(x), _reference(x)
    assert got[4] == ref[4] == float(torch.count_nonzero(x))
    assert (got[2], got[3]) == (-7.0, 9.0)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_moments_count_nonfinite_and_skip_nan_in_extremes():
    x = torch.tensor([1.0, float("nan"), -float("inf"), 0.0, 2.0])
    out = _moments(x)
    assert out[4] == 4 and out[5] == 2  # NaN and inf are non-zero; two are non-finite
    assert out[2] == -np.inf and out[3] == 2.0
    assert np.isnan(out[0]) and np.isnan(out[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (0.0, 1.0), (0.0, 6.0)])
def test_saturated_counts_values_near_the_bounds(dtype, bounds):
    torch.manual_seed(3)
    low, high = bounds
    x = torch.rand(10_000, dtype=dtype) * (high - low) + low
    x[:3] = torch.tensor([float("nan"), low, high], dtype=dtype)
    band = stats.saturation_band(bounds)
    margin = 0.01 * max(abs(low), abs(high))
    ref = int(((x <= low + margin) | (x >= high - margin)).sum())  # NaN is in neither
    assert native.saturated(x, band) == ref
    assert int(stats.saturated_count(x, band)) == ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_rows(dtype):
    torch.manual_seed(1)
    g = torch.randn(64, 3, 5, 7, dtype=dtype) * torch.logspace(-30, 30, 64, dtype=dtype).view(
        -1, 1, 1, 1
    )
    g[5, 0, 0, 0] = float("inf")
    g[9, 1, 2, 3] = float("nan")
    out = np.zeros(3)
    native.grad_rows(g, 64, out.ctypes.data)
    assert not np.isfinite(out[0]) and not np.isfinite(out[1])  # inf and NaN reach the sums
    assert out[2] == 2
    g[5, 0, 0, 0] = g[9, 1, 2, 3] = 0.0
    native.grad_rows(g, 64, out.ctypes.data)
    rows = g.double().reshape(64, -1)
    assert out[0] == pytest.approx(float(rows.square().sum()), rel=1e-12)
    assert out[1] == pytest.approx(float(torch.linalg.vector_norm(rows, dim=1).sum()), rel=1e-12)
    assert out[2] == 0
    # rows are summed four at a time: 63 rows leave three to the one-row loop, the last inf
    g[62, 0, 0, 0] = float("inf")
    native.grad_rows(g[:63], 63, out.ctypes.data)
    assert out[2] == 1 and out[0] == float("inf")
    g[62, 0, 0, 0] = 1.0
    native.grad_rows(g[:63], 63, out.ctypes.data)
    rows = g[:63].double().reshape(63, -1)
    assert out[0] == pytest.approx(float(rows.square().sum()), rel=1e-12)
    assert out[1] == pytest.approx(float(torch.linalg.vector_norm(rows, dim=1).sum()), rel=1e-12)


@pytest.mark.parametrize("update", [True, False])
def test_param_stats_read_snapshot_and_after(update):
    """Without an update, read() gives the gradient and parameter statistics at once; with
    one, snapshot() keeps the copy and after() gives the same statistics (the parameter's
    as it was before the update) with the update's sum of squares and its dot with the
    gradient, in one pass."""
    torch.manual_seed(2)
    params = [torch.randn(40, 30), torch.randn(30), torch.zeros(0), torch.randn(5, 5).t()]
    grads = [torch.randn_like(p) for p in params]
    grads[3][0, 0] = float("nan")
    stats = native.ParamStats(params)
    present = [0, 2, 3]  # parameter 1 has no gradient this step
    before = [p.clone() for p in params]
    now = [params[i] for i in present]
    if update:
        stats.snapshot(present, [grads[i] for i in present], now)
        for i in present:
            assert torch.equal(stats.before(i), params[i])  # type: ignore[arg-type]
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
        values, update_sumsq, dots = stats.after(now, geometry=True)
    else:
        values = stats.read(present, [grads[i] for i in present], now)
    grad_sumsq, largest, nonfinite, param_sumsq = values[:4]
    assert grad_sumsq[0] == pytest.approx(float(grads[0].double().square().sum()), rel=1e-12)
    assert largest[0] == float(grads[0].abs().max())
    assert grad_sumsq[1] == 0 and largest[1] == 0  # empty
    assert nonfinite.tolist() == [0, 0, 1]
    assert largest[2] == float(grads[3].nan_to_num(0.0).abs().max())  # NaN is not the largest
    for k, i in enumerate(present):
        ref = float(before[i].double().square().sum())
        assert param_sumsq[k] == pytest.approx(ref, rel=1e-12)
    if not update:
        return
    for k, i in enumerate(present):
        diff = params[i].double() - before[i].double()
        assert update_sumsq[k] == pytest.approx(float(diff.square().sum()), rel=1e-12, abs=0)
        if i != 3:  # the NaN gradient makes its dot NaN
            ref = float(diff.flatten() @ grads[i].double().flatten())
            assert dots[k] == pytest.approx(ref, rel=1e-10, abs=1e-300)
    assert np.isnan(dots[2])
    with pytest.raises(RuntimeError, match="snapshot"):  # one after() per snapshot()
        stats.after(now, geometry=False)


def test_build_reports_a_failing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="failed"):
        native.build(tmp_path)
    assert not list(tmp_path.glob("*.so"))


def test_build_without_an_openmp_runtime_is_serial(tmp_path, monkeypatch):
    """A compiler that cannot link OpenMP (clang without libomp) still builds the kernels."""
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text(
        '#!/bin/sh\ncase " $* " in *" -fopenmp "*) echo "no libomp" >&2; exit 1;; esac\n'
        f'exec {shutil.which("cc") or "cc"} "$@"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    built = native.build(tmp_path / "cache")
    assert "gomp" not in subprocess.run(["ldd", str(built)], capture_output=True, text=True).stdout
    lib = ctypes.CDLL(str(built))
    lib.moments_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    x = torch.randn(1000)
    out = np.zeros(6)
    lib.moments_f32(x.data_ptr(), x.numel(), out.ctypes.data)
    assert out[1] == pytest.approx(float(x.double().square().sum()), rel=1e-12)
    assert native.build(tmp_path / "cache") == built  # found in the cache, not compiled again


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_kernels_share_torchs_openmp_runtime(kernels):
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch build does not use OpenMP")
    """The parallel kernels use the OpenMP runtime torch loaded, not a second pool (torch's CPU
    build on Linux uses OpenMP, so exactly one runtime is mapped)."""
    mapped = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libgomp" in line or "libomp" in line or "libiomp" in line
    }
    assert len(mapped) == 1, mapped


def test_build_is_cached(tmp_path):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_param_passes_split_over_threads(threads):
    """Above PARALLEL_MIN elements the passes are split over OpenMP threads, tensors cut at
    thread boundaries: each thread's partial sums and maxima must merge (sums add, maxima
    take the max). Boundaries for 2 and 4 threads fall inside parameters 0, 2 and 3."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(threads)
        sizes = [50_001, 7, 40_000, 33_333]  # 123,341 elements, over PARALLEL_MIN = 65,536
        params = [torch.randn(n) for n in sizes]
        grads = [torch.randn(n) for n in sizes]
        for g in grads:  # the largest |g| near both ends: every thread's maximum is large
            g[0], g[-1] = 50.0, -60.0
        grads[2][5] = float("inf")  # non-finite values on both sides of a boundary
        grads[2][-5] = float("nan")
        stats = native.ParamStats(params)
        present = list(range(len(params)))
        before_copy = [p.clone() for p in params]
        read = stats.read(present, grads, params)
        stats.snapshot(present, grads, params)
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
        values, update_sumsq, dots = stats.after(params, geometry=True)
        for got in (read, values):  # read() now and after() from the copy agree
            grad_sumsq, largest, nonfinite, param_sumsq = got[:4]
            for i in present:
                finite = grads[i][torch.isfinite(grads[i])].double()
                if i != 2:
                    ref = float(grads[i].double().square().sum())
                    assert grad_sumsq[i] == pytest.approx(ref, rel=1e-12)
                assert largest[i] == float(finite.abs().max() if i != 2 else float("inf"))
                ref = float(before_copy[i].double().square().sum())
                assert param_sumsq[i] == pytest.approx(ref, rel=1e-12)
            assert nonfinite.tolist() == [0, 0, 2, 0]
        for i in present:
            update = params[i].double() - before_copy[i].double()
            assert update_sumsq[i] == pytest.approx(float(update.square().sum()), rel=1e-12)
            if i != 2:
                dot = float(update @ grads[i].double())
                assert dots[i] == pytest.approx(dot, rel=1e-10, abs=1e-12)
        assert not np.isfinite(dots[2])
    finally:
        torch.set_num_threads(before)
