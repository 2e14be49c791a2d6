#!/usr/bin/env bash
# The GPU checks of the torch-op path, as one command for a lent GPU machine (the device
# tool runs it in the repository root; its python3 holds torch with CUDA, Triton, pandas and
# pytest): the sync and fused-statistics tests on CUDA, the parameter passes (flat buffers
# against large tensors read alone), then the GPU benchmark, eager before
# compiled (each model's ratios print as they are measured, so a run stopped at its limit
# keeps what it finished). Logs go to $OUT (the device tool brings them back), else /tmp.
#
#     bash benchmarks/gpu_check.sh                # on the GPU machine (at most 560 s)
#     DEVICE=cpu bash benchmarks/gpu_check.sh     # here: the same steps, shrunk, on the CPU
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT_DIR=${OUT:-/tmp}
size=(); [ "$DEVICE" = cpu ] && size=(--tiny --repeats 3)
[ "$DEVICE" = cpu ] && export GRADSCOPE_FUSED=1 GRADSCOPE_NATIVE=0  # the GPU's path
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_sync.py tests/test_fused.py tests/test_stats_fields.py 2>&1 \
    | tee "$OUT_DIR/gpu_tests.log" | tail -n 15
timeout 60 "$PY" benchmarks/param_passes.py --device "$DEVICE" 2>&1 \
    | tee "$OUT_DIR/gpu_param_passes.log"
timeout 170 "$PY" benchmarks/overhead.py --device "$DEVICE" --no-compile "${size[@]}" 2>&1 \
    | tee "$OUT_DIR/gpu_eager.log"
GRADSCOPE_FUSED=0 timeout 70 "$PY" benchmarks/overhead.py --device "$DEVICE" --no-compile \
    --repeats 3 "${size[@]}" 2>&1 | tee "$OUT_DIR/gpu_eager_unfused.log"
timeout 140 "$PY" benchmarks/overhead.py --device "$DEVICE" --compile-only "${size[@]}" 2>&1 \
    | tee "$OUT_DIR/gpu_compiled.log"
