"""Mutation check: applies one-line bugs to a copy of the project, one at a time, and runs
the tests meant to catch each; prints caught/survived and exits 1 if any survived.

    .venv/bin/python tests/mutate.py            # all mutations
    .venv/bin/python tests/mutate.py -k resume  # those whose name contains "resume"

Each mutation must match its file exactly once (a refactor that moves the line makes the
script fail loudly, not pass silently). The copy imports its own gradscope (PYTHONPATH) and
builds its own C kernels (GRADSCOPE_CACHE in the copy), so the checkout is never touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "fused statistics: non-zeros counted as x > 0",
        "gradscope/recorder/stats/fused.py",
        "    nonzero = x.ne(0).sum(dim=per_unit)",
        "    nonzero = x.gt(0).sum(dim=per_unit)",
        ("tests/test_stats_fields.py::test_output_fields_agree_with_float64_references",),
    ),
    Mutation(
        "fused parameter passes: the update's dot with the gradient of the wrong sign",
        "gradscope/recorder/stats/fused.py",
        "    return torch.stack([(wide * wide).sum(dim=1), -(wide * g.to(_F64)).sum(dim=1)])",
        "    return torch.stack([(wide * wide).sum(dim=1), (wide * g.to(_F64)).sum(dim=1)])",
        ("tests/test_fused.py",),
    ),
    Mutation(
        "fused parameters read alone: the pre-update copy not made",
        "gradscope/recorder/stats/flat.py",
        "            torch._foreach_copy_(copies, [p.detach() for _, _, p in by_itself])",
        "            torch._foreach_zero_(copies)",
        ("tests/test_fused.py",),
    ),
    Mutation(
        "fused parameters read alone: gradients read after the update without watching them",
        "gradscope/recorder/stats/flat.py",
        "        self.grads_after = bool(self._alone)",
        "        self.grads_after = False",
        ("tests/test_recorder.py::test_gradients_changed_in_place_by_the_optimizer",),
    ),
    Mutation(
        "activation extremes: the last call wins instead of min/max over calls",
        "gradscope/recorder/reduce.py",
        "reduction.ufunc.at(out, (slice(None), label_id), values)",
        "out.__setitem__((slice(None), label_id), values) if reduction is not Reduction.SUM "
        "else reduction.ufunc.at(out, (slice(None), label_id), values)",
        ("tests/test_recorder_merge.py",),
    ),
    Mutation(
        "zero_frac counts x > 0 instead of x != 0 (torch-op path)",
        "gradscope/recorder/stats/torch_ops.py",
        "    per_unit = torch.count_nonzero(rows[:2].view(2, *shape), dim=(1, 3))  # (2, units)",
        "    per_unit = torch.count_nonzero(torch.stack([rows[0].clamp(min=0), rows[1]])"
        ".view(2, *shape), dim=(1, 3))",
        ("tests/test_recorder_merge.py",),
    ),
    Mutation(
        "GradScaler: sample_norm of output gradients not unscaled",
        "gradscope/recorder/reduce.py",
        "per_call[:, :, k] /= scale**power",
        "per_call[:, :, k] /= scale ** (power if power == 2 else 0)",
        (
            "tests/test_recorder_merge.py",
            "tests/test_distributed.py::test_amp_records_unscaled_gradients",
        ),
    ),
    Mutation(
        "GradScaler: a skipped step's gradients divided by the next step's scale",
        "gradscope/recorder/capture.py",
        "[scale_values[g.scale] if g.scale >= 0 else now for g in tables.grads]",
        "[now for g in tables.grads]",
        ("tests/test_recorder_merge.py",),
    ),
    Mutation(
        "a spilling recorder refuses to be re-attached to go on with its recording",
        "gradscope/recorder/rows.py",
        "if directory is None or self.parts:",
        "if directory is None:",
        ("tests/test_recorder.py::test_a_spilling_recorder_goes_on_after_reattaching",),
    ),
    Mutation(
        "VANISHING_RATIO 1e-3 -> 1e-8",
        "gradscope/analysis/rules/flow.py",
        "VANISHING_RATIO = 1e-3",
        "VANISHING_RATIO = 1e-8",
        ("tests/test_frame_and_diagnose.py",),
    ),
    Mutation(
        "vanishing severity always error",
        "gradscope/analysis/rules/flow.py",
        "Severity.ERROR if not ratio >= SEVERE_RATIO else Severity.WARNING",
        "Severity.ERROR",
        ("tests/test_frame_and_diagnose.py",),
    ),
    Mutation(
        "--resume compares only depths, variants and width",
        "gradscope/lab/sweep/store.py",
        "if saved != config:",
        "if (saved.depths, saved.variants, saved.width) != (config.depths, config.variants, config.width):",
        ("tests/test_sweep.py",),
    ),
    Mutation(
        "C param_read: per-thread maxima summed instead of max-ed",
        "gradscope/recorder/stats/native/kernels.c",
        "out[k + j] = r[k + j] > out[k + j] ? r[k + j] : out[k + j];",
        "out[k + j] += r[k + j];",
        ("tests/test_native.py",),
    ),
    Mutation(
        "an all-NaN output keeps min/max at +inf/-inf instead of NaN (C path)",
        "gradscope/recorder/stats/derive.py",
        "lo[no_value] = hi[no_value] = np.nan",
        "pass",
        ("tests/test_recorder_merge.py",),
    ),
    Mutation(
        "a non-finite output gradient's origin is not named",
        "gradscope/recorder/reduce.py",
        "if np.count_nonzero(backward):",
        "if False:",
        ("tests/test_recorder.py::test_nonfinite_values_are_counted_and_localized",),
    ),
    Mutation(
        "a step with module outputs but no parameter read is dropped",
        "gradscope/recorder/capture.py",
        "return not (self.outputs or self.grads or self.params or self.scalars or graph)",
        "return not (self.params or self.scalars or graph)",
        ("tests/test_recorder.py::test_models_without_parameters",),
    ),
    Mutation(
        "C param_after: the update's dot with the gradient drops the update",
        "gradscope/recorder/stats/native/kernels.c",
        "dot += u * d;",
        "dot += d;",
        ("tests/test_native.py", "tests/test_geometry.py"),
    ),
    Mutation(
        "C param_after: per-thread maxima summed instead of max-ed",
        "gradscope/recorder/stats/native/kernels.c",
        "out[f] = f / k == 1 ? (r[f] > out[f] ? r[f] : out[f]) : out[f] + r[f];",
        "out[f] = out[f] + r[f];",
        ("tests/test_native.py",),
    ),
    Mutation(
        "C moments: only the last block's non-zeros counted",
        "gradscope/recorder/stats/native/kernels.c",
        "            nonzero += nz;",
        "            nonzero = nz;",
        ("tests/test_native.py",),
    ),
    Mutation(
        "C grad_rows: the fourth row of each group summed from the third",
        "gradscope/recorder/stats/native/kernels.c",
        "                s3 += d * d;",
        "                s3 += c * c;",
        ("tests/test_native.py",),
    ),
    Mutation(
        "an output changed in place since the last call taken as unchanged",
        "gradscope/recorder/capture.py",
        "        if last[0] is tensor and last[1] == version(tensor) is not None and last[3] == shape:",
        "        if last[0] is tensor and last[3] == shape:",
        ("tests/test_recorder.py::test_an_output_seen_by_two_modules",),
    ),
    Mutation(
        "gradients an optimizer changes in place read only after the update",
        "gradscope/recorder/params.py",
        "        now = self._grads_before is not False and self._stats.grads_after",
        "        now = False",
        ("tests/test_recorder.py::test_gradients_changed_in_place_by_the_optimizer",),
    ),
    Mutation(
        "a step nested in the optimizer's step (super().step()) counted as an update",
        "gradscope/recorder/optimizers.py",
        "        if self._outer is not None and _on_stack(self._outer, caller):",
        "        if False:",
        ("tests/test_recorder.py::test_gradients_changed_in_place_by_the_optimizer",),
    ),
    Mutation(
        "a step that raised makes every later step look nested",
        "gradscope/recorder/optimizers.py",
        "        if self._outer is not None and _on_stack(self._outer, caller):",
        "        if self._outer is not None:",
        ("tests/test_recorder.py::test_a_step_that_raised_leaves_later_steps_recorded",),
    ),
    Mutation(
        "C snapshot: the copy made before the parameter is read",
        "gradscope/recorder/stats/native/kernels.c",
        "            copy[i] = w;",
        "            copy[i] = 0;",
        ("tests/test_native.py",),
    ),
    Mutation(
        "geometry: cos_grad against the gradient instead of the negative gradient",
        "gradscope/recorder/stats/derive.py",
        "-dot / (update_norm * grad_norm)",
        "dot / (update_norm * grad_norm)",
        ("tests/test_geometry.py",),
    ),
    Mutation(
        "spikes: the robust deviation threshold ignored",
        "gradscope/timeline.py",
        "fired = (change - usual > SPIKE_Z * scale) & (above > floor) & level.notna()",
        "fired = (above > floor) & level.notna()",
        ("tests/test_timeline.py",),
    ),
    Mutation(
        "the packed all-reduce reads every array back from the start of its pack",
        "gradscope/recorder/merge.py",
        "                start += size\n",
        "                start += 0\n",
        ("tests/test_distributed.py",),
    ),
    Mutation(
        "compiled: a module's calls within a step overwrite its sums instead of adding",
        "gradscope/recorder/stats/graph_ops.py",
        "            parts.append(a + b)",
        "            parts.append(b)",
        ("tests/test_compile.py",),
    ),
    Mutation(
        "compiled: a module's extremes over calls take max for the minimum",
        "gradscope/recorder/stats/graph_ops.py",
        "            parts.append(torch.minimum(a, b))",
        "            parts.append(torch.maximum(a, b))",
        ("tests/test_compile.py",),
    ),
    Mutation(
        "compiled + GradScaler: a backward's rows kept without a copy",
        "gradscope/recorder/capture.py",
        "rows.detach().clone()))",
        "rows.detach()))",
        ("tests/test_compile.py",),
    ),
    Mutation(
        "compiled: rows never emptied between recorded steps",
        "gradscope/recorder/compiled.py",
        "        self._written = self._written or on",
        "        self._written = False",
        ("tests/test_compile.py",),
    ),
    Mutation(
        "compiled: dynamo's hook guards left off (an unwatched twin lends its graph)",
        "gradscope/recorder/compiled.py",
        "    torch._dynamo.config.skip_nnmodule_hook_guards = False",
        "    pass",
        ("tests/test_compile.py",),
    ),
    Mutation(
        "deferred rows: steps that made other calls held with the batch",
        "gradscope/recorder/deferred.py",
        "        if self._held and key != self._key:",
        "        if self._held and False:",
        ("tests/test_deferred.py",),
    ),
    Mutation(
        "deferred rows: rows_held leaves out the steps not reduced yet",
        "gradscope/recorder/deferred.py",
        "return self.store.rows_held + len(self._held) * self._rows_per_step",
        "return self.store.rows_held",
        ("tests/test_deferred.py",),
    ),
    Mutation(
        "deferred rows: every step of a batch given its first step's outputs",
        "gradscope/recorder/reduce.py",
        "np.stack([t.output_stats for t in batch])",
        "np.stack([first.output_stats for t in batch])",
        ("tests/test_deferred.py",),
    ),
    Mutation(
        "deferred rows: which parameters had a gradient left out of the key",
        "gradscope/recorder/reduce.py",
        "        None if params is None else params.present,",
        "        None,",
        ("tests/test_deferred.py",),
    ),
    Mutation(
        "deferred rows: a held step's element and sample counts taken from the first step",
        "gradscope/recorder/capture.py",
        "        self.numel, self.samples = self.output_numel(), self.grad_samples()",
        "        self.numel, self.samples = first.output_numel(), first.grad_samples()",
        ("tests/test_deferred.py",),
    ),
    Mutation(
        "deferred rows: steps held past the spill threshold",
        "gradscope/recorder/deferred.py",
        "self.rows_held >= self.store.spill_rows:",
        "self.rows_held >= 10 * self.store.spill_rows:",
        ("tests/test_deferred.py",),
    ),
    Mutation(
        "parameters: the second-moment norm read from Adam's first moment",
        "gradscope/recorder/params.py",
        '.get("exp_avg_sq")',
        '.get("exp_avg")',
        ("tests/test_geometry.py",),
    ),
    Mutation(
        "parameters: torch-op sums of squares never recounted in float64",
        "gradscope/recorder/stats/backends.py",
        "    if numel is None:  # exact already\n",
        "    if True:  # exact already\n",
        ("tests/test_recorder.py", "tests/test_native.py"),
    ),
]


def _copy(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "GRADSCOPE_CACHE": str(copy / ".cache")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    return done.returncode, lines[-1] if lines else done.stderr.strip()[-200:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    selected = [m for m in MUTATIONS if parser.parse_args().k.lower() in m.name.lower()]
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        _copy(copy)
        check = subprocess.run(
            [sys.executable, "-c", "import gradscope; print(gradscope.__file__)"],
            cwd=copy,
            env={**os.environ, "PYTHONPATH": str(copy)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert check.startswith(str(copy)), f"the copy imports {check}, not its own gradscope"
        print(f"{'mutation':<75} {'result':<9} tests")
        for m in selected:
            path = copy / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name:<75} {'STALE':<9} {m.old!r} is not once in {m.path}")
                survived += 1
                continue
            rc, last = _run_tests(copy, m.tests)  # the unmutated tests must pass first
            if rc != 0:
                print(f"{m.name:<75} {'BROKEN':<9} unmutated tests fail: {last}")
                survived += 1
                continue
            path.write_text(original.replace(m.old, m.new))
            start = time.perf_counter()
            try:
                rc, last = _run_tests(copy, m.tests)
            finally:
                path.write_text(original)
            result = "caught" if rc == 1 else "SURVIVED" if rc == 0 else f"rc {rc}"
            survived += rc == 0
            took = time.perf_counter() - start
            print(f"{m.name:<75} {result:<9} {' '.join(m.tests)} ({last}; {took:.0f} s)")
    print(f"\n{len(selected) - survived} of {len(selected)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
