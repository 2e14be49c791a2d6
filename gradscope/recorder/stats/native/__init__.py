"""One-pass C kernels for the recorder's statistics of CPU tensors, compiled on first use.

`kernels.c` fills the rows of fields.py (OUTPUT_FIELDS, GRAD_FIELDS) and is compiled with the system C compiler (``cc``, or ``$CC``) into
``~/.cache/gradscope/native/`` (or ``$GRADSCOPE_CACHE``) the first time it is needed (about
0.2 s), keyed by the source, the compiler flags and this CPU. Every statistic the kernels
give is also computed, more slowly, by plain torch ops: where no compiler is found, where
``GRADSCOPE_NATIVE=0``, or for tensors the kernels do not take (not on the CPU, or not
float32/float64), the recorder uses those instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from gradscope.recorder.stats.flat import ParamValues

SOURCE = Path(__file__).with_name("kernels.c")
# Tried in order. -fopenmp links libgomp.so.1, which in a process with torch loaded is torch's
# own OpenMP runtime; where it cannot be linked (clang without libomp), the kernels are built
# serial, keeping only the vectorizing pragmas.
FLAGS = [
    ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC"],
]
MOMENT_FIELDS = ("sum", "sumsq", "min", "max", "nonzero", "nonfinite")
OUTPUT_FIELDS = (*MOMENT_FIELDS, "dead_units", "units")  # output_row()'s row
GRAD_FIELDS = ("sumsq", "sample_norm_sum", "nonfinite_samples")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64

# name: (argument types, result type); kernels with a result return 0, or -1 out of memory
_SIGNATURES: dict[str, tuple[list[type], type | None]] = {
    "moments": ([_PTR, _I64, _PTR], None),
    "output_row": ([_PTR, _I64, _I64, _I64, _PTR], ctypes.c_int),
    "saturated": ([_PTR, _I64, ctypes.c_double, ctypes.c_double], ctypes.c_double),
    "grad_rows": ([_PTR, _I64, _I64, _PTR], None),
    "param_read": ([_PTR, _PTR, _PTR, _I64, _PTR], ctypes.c_int),
    "snapshot": ([_PTR, _PTR, _PTR, _I64, _PTR], ctypes.c_int),
    "param_after": ([_PTR, _PTR, _PTR, _PTR, _I64, _PTR], ctypes.c_int),
}


def _cache_dir() -> Path:
    root = os.environ.get("GRADSCOPE_CACHE") or Path.home() / ".cache" / "gradscope"
    return Path(root) / "native"


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def build(cache: Path | None = None) -> Path:
    """Compiles kernels.c (if not already cached) and returns the shared library's path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc, or $CC) found")
    cache = cache or _cache_dir()
    source, machine = SOURCE.read_bytes(), _cpu_fingerprint()
    # one library per flag set, named by what it is built from
    keys = [
        hashlib.sha256(source + " ".join([compiler, *flags, machine]).encode()).hexdigest()[:16]
        for flags in FLAGS
    ]
    targets = [cache / f"kernels-{key}.so" for key in keys]
    for target in targets:
        if target.exists():
            return target
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags, target in zip(FLAGS, targets, strict=True):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", str(built)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                os.replace(built, target)  # atomic: processes compiling at once all end up here
                return target
        errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-1000:]}")
    raise RuntimeError("compiling the kernels failed:\n" + "\n".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be had."""
    if os.environ.get("GRADSCOPE_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:
        warnings.warn(
            f"gradscope: C kernels unavailable ({err}); recording with torch ops, which is "
            "slower on the CPU. Install a C compiler, or set GRADSCOPE_NATIVE=0 to silence.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    for name, (args, result) in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, result
    return lib


def takes(t: torch.Tensor) -> bool:
    """Whether the kernels handle this tensor (CPU float32/float64) and are available."""
    return t.dtype in _SUFFIX and t.is_cpu and library() is not None


@functools.cache
def _fn(name: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    return getattr(library(), f"{name}_{_SUFFIX[dtype]}")


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.detach().contiguous()


class _Buffer:
    """A host array made once, with its address kept (numpy's `.ctypes` costs ~1.5 us)."""

    def __init__(self, shape: int | tuple[int, int], dtype: type = np.float64) -> None:
        self.array: np.ndarray = np.empty(shape, dtype=dtype)
        self.at: int = self.array.ctypes.data


def _addresses(tensors: list[torch.Tensor], out: _Buffer, keep: list[torch.Tensor]) -> int:
    """Writes the tensors' data addresses into `out` and returns its address; non-contiguous
    tensors are copied (the copies go to `keep`, which must outlive the kernel call)."""
    dense = [t if t.is_contiguous() else t.detach().contiguous() for t in tensors]
    keep.extend(dense)
    out.array[: len(dense)] = [t.data_ptr() for t in dense]
    return out.at


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("gradscope: no memory left for the C kernels' partial sums")


def moments(x: torch.Tensor, out: int) -> None:
    """Writes MOMENT_FIELDS of x as 6 float64 values at address `out`."""
    x = _dense(x)
    _fn("moments", x.dtype)(x.data_ptr(), x.numel(), out)


def output_row(x: torch.Tensor, shape: tuple[int, int, int], out: int) -> None:
    """Writes one output's row of the per-call schema at address `out`: MOMENT_FIELDS, then
    the dead units and the units of x seen as `shape` (outer, units, inner)."""
    x = _dense(x)
    if _fn("output_row", x.dtype)(x.data_ptr(), *shape, out):  # (_check, inlined: per call)
        _check(-1)


def saturated(x: torch.Tensor, band: tuple[float, float]) -> float:
    """How many values of x lie in the saturation band (mid, half) of stats.saturation_band."""
    x = _dense(x)
    return float(_fn("saturated", x.dtype)(x.data_ptr(), x.numel(), *band))


def grad_rows(x: torch.Tensor, rows: int, out: int) -> None:
    """Writes GRAD_FIELDS of x, as a matrix of `rows` rows (samples), at address `out`."""
    x = _dense(x)
    _fn("grad_rows", x.dtype)(x.data_ptr(), rows, x.numel() // rows if rows else 0, out)


class ParamStats:
    """Exact per-parameter statistics through the kernels; the API of flat.FlatStats.

    Takes CPU float32/float64 tensors, all of one dtype; keeps a copy of each (the parameters
    before the update). In a step with an update, `snapshot()` copies the parameters, summing
    their squares as it goes, and `after()` reads each gradient, copy and updated parameter
    once for the rest: five passes over memory in all. Results are float64 host arrays, exact: no recount is needed.
    The passes are split over torch's OpenMP threads (see kernels.c).
    """

    exact = True
    grads_after = True  # after() reads the gradients (after the update)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.n = n = len(tensors)
        self.dtype = tensors[0].dtype
        self._sizes = _Buffer(n, np.int64)
        self._sizes.array[:] = [t.numel() for t in tensors]
        self._before = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        self._before_at = _Buffer(n, np.int64)
        self._before_at.array[:] = [b.data_ptr() for b in self._before]
        self._size_list = self._sizes.array.tolist()
        self._all = list(range(n))
        # per step: the addresses of the present gradients, parameters and copies, their sizes
        # and the kernels' results (rows: after()'s five, the parameters' sums of squares)
        self._grad_at, self._param_at = _Buffer(n, np.int64), _Buffer(n, np.int64)
        self._picked = (_Buffer(n, np.int64), _Buffer(n, np.int64))
        self._out = _Buffer((6, n))
        # between snapshot() and after(): the gradients (kept alive), and which were present
        self._held: tuple[list[torch.Tensor], list[int]] | None = None

    def fits(self, present: list[int], params: list[torch.Tensor]) -> bool:
        """Whether the parameters `present` still have the dtype, device and size the buffers
        were made for (``p.data = ...`` or ``model.to(...)`` can change them: the kernels
        would then read or write past a buffer)."""
        sizes, dtype = self._size_list, self.dtype
        return all(
            p.dtype is dtype and p.is_cpu and p.numel() == sizes[i]
            for i, p in zip(present, params, strict=True)
        )

    def _present(self, present: list[int]) -> tuple[int, int]:
        """The addresses of the present tensors' copies and sizes."""
        if present == self._all:
            return self._before_at.at, self._sizes.at
        before_at, sizes = self._picked
        k = len(present)
        np.take(self._before_at.array, present, out=before_at.array[:k])
        np.take(self._sizes.array, present, out=sizes.array[:k])
        return before_at.at, sizes.at

    def read(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> ParamValues:
        """Without an update (steps closed by rec.step()): for the tensors `present` (their
        gradients and parameters in that order), the gradients' sums of squares, largest
        absolute values (ignoring NaN) and non-finite counts, and the parameters' sums of
        squares, as host arrays."""
        keep: list[torch.Tensor] = []
        grad_at = _addresses(grads, self._grad_at, keep)
        param_at = _addresses(params, self._param_at, keep)
        k = len(present)
        _check(
            _fn("param_read", self.dtype)(
                grad_at, param_at, self._present(present)[1], k, self._out.at
            )
        )
        return ParamValues(*self._out.array.reshape(-1)[: 4 * k].copy().reshape(4, k))

    def snapshot(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> None:
        """Before the update: copies the parameters `present` (and sums their squares); keeps
        their gradients for after()."""
        keep = list(grads)
        _addresses(grads, self._grad_at, keep)
        param_at = _addresses(params, self._param_at, keep)
        before_at, sizes = self._present(present)
        k = len(present)
        sumsq_at = self._out.at + 5 * k * 8  # row 5 of the (6, k) table after() fills
        _check(_fn("snapshot", self.dtype)(param_at, before_at, sizes, k, sumsq_at))
        self._held = (keep, present)

    def after(
        self, params: list[torch.Tensor], geometry: bool
    ) -> tuple[ParamValues, np.ndarray, np.ndarray | None]:
        """After the update, for the parameters of the last snapshot(), as given now: read()'s
        four values (the parameters' sums of squares as they were before the update), the
        update's sums of squares (parameter minus copy) and, with `geometry`, its dot product
        with each gradient."""
        if self._held is None:
            raise RuntimeError("ParamStats.after() without a snapshot() before it")
        keep, present = self._held
        self._held = None
        k = len(present)
        param_at = _addresses(params, self._param_at, keep)
        before_at, sizes = self._present(present)
        _check(
            _fn("param_after", self.dtype)(
                self._grad_at.at, before_at, param_at, sizes, k, self._out.at
            )
        )
        # the (6, k) table at the buffer's start: after()'s five rows, then snapshot()'s
        out = self._out.array.reshape(-1)[: 6 * k].copy().reshape(6, k)
        values = ParamValues(out[0], out[1], out[2], out[5])
        return values, out[3], out[4] if geometry else None

    def before(self, i: int) -> torch.Tensor | None:
        return self._before[i]
