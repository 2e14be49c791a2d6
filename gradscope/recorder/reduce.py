"""Per-layer reduction of one step's per-call tables: calls of the same module (shared
weights, micro-batches) merged from additive moments, registered for the merge over ranks,
then the derived statistics written as rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradscope import stats
from gradscope.recorder.capture import Tables
from gradscope.recorder.merge import StepMerge
from gradscope.recorder.rows import StepRows
from gradscope.schema import TOTAL, Kind, Stat


class LabelIndex:
    """Unique labels in first-seen order, and each call's index into them. The last answer
    is kept: consecutive recorded steps usually make the same calls."""

    def __init__(self) -> None:
        self._labels: list[str] | None = None
        self._answer: tuple[list[str], np.ndarray] = ([], np.zeros(0, dtype=np.int64))

    def __call__(self, labels: list[str]) -> tuple[list[str], np.ndarray]:
        if labels != self._labels:
            index: dict[str, int] = {}
            ids = [index.setdefault(label, len(index)) for label in labels]
            self._labels, self._answer = labels, (list(index), np.array(ids, dtype=np.int64))
        return self._answer


@dataclass(frozen=True)
class ParamLayout:
    """What the reduction needs to know of the recorded parameters."""

    names: list[str]
    ndims: np.ndarray
    sharded: np.ndarray  # bool per parameter: a DTensor shard, merged over ranks


class Reducer:
    """Turns closed steps into rows; keeps label indices between steps (they rarely change)."""

    def __init__(self, block_index: dict[str, float]) -> None:
        self.output_labels, self.grad_labels = LabelIndex(), LabelIndex()
        self.block_index = block_index
        self._block_rows: dict[str, tuple[list[str], list[str], np.ndarray]] = {}

    def reduce(
        self,
        tables: Tables,
        scales: np.ndarray | None,
        params: ParamLayout,
        merge: StepMerge,
        world: int,
    ) -> tuple[StepRows, dict[str, str]]:
        """The step's rows, and the first layer with a non-finite value by phase."""
        finish: list[Callable[[StepRows], None]] = []
        origins: dict[str, str] = {}
        if tables.outputs:
            finish.append(self._outputs(tables, merge, origins))
        if tables.grads:
            finish.append(self._grads(tables, scales, merge, world, origins))
        if tables.params is not None:
            finish.append(_params(tables, params, merge))
        if tables.scalars:
            handle = merge.add(np.array([v for _, v in tables.scalars]), "sum")
            names = [name for name, _ in tables.scalars]
            finish.append(
                lambda rows: rows.add(
                    [TOTAL] * len(names), Kind.SCALAR, names, merge.get(handle) / world
                )
            )
        merge.run()
        rows = StepRows()
        for add in finish:
            add(rows)
        for phase, layer in origins.items():
            rows.add([layer], Kind.NONFINITE_ORIGIN, phase, np.ones(1))
        return rows, origins

    def _outputs(
        self, tables: Tables, merge: StepMerge, origins: dict[str, str]
    ) -> Callable[[StepRows], None]:
        calls, table = tables.outputs, tables.output_stats
        total, sumsq, lo, hi, nonzero, nonfinite = table.T
        bad = np.flatnonzero(nonfinite > 0)
        if len(bad):
            origins[Stat.FORWARD] = calls[int(bad[0])].label
        names, label_id = self.output_labels([c.label for c in calls])
        n = len(names)
        numel = np.array([c.numel for c in calls], dtype=np.float64)
        lows, highs = np.full(n, np.inf), np.full(n, -np.inf)
        # extremes over calls ignore NaN, as within a call (a kernel's call with no value but
        # NaN gives inf, -inf; a torch-op call NaN)
        np.fmin.at(lows, label_id, lo)
        np.fmax.at(highs, label_id, hi)
        sat_calls = [i for i, _ in tables.saturated]
        sat_values = np.array([v for _, v in tables.saturated])
        sums = np.stack(
            [
                np.bincount(label_id, total, n),
                np.bincount(label_id, sumsq, n),
                np.bincount(label_id, nonzero, n),
                np.bincount(label_id, numel, n),
                np.bincount(label_id, nonfinite, n),
                np.bincount(label_id[sat_calls], sat_values, n),
                np.bincount(label_id[sat_calls], minlength=n).astype(np.float64),
            ]
        )
        merge.expect_same(n)
        handles = merge.add(sums, "sum"), merge.add(lows, "min"), merge.add(highs, "max")

        def add(rows: StepRows) -> None:
            sums, lo, hi = (merge.get(h) for h in handles)
            lo, hi = lo.copy(), hi.copy()
            no_value = lo > hi  # a layer with no value but NaN (counted in nonfinite)
            lo[no_value] = hi[no_value] = np.nan
            total, sumsq, nonzero, count, nonfinite, sat, bounded_calls = sums
            values = stats.activation_stats(total, sumsq, lo, hi, nonzero, count, nonfinite)
            for stat, column in values.items():
                rows.add(names, Kind.ACTIVATION, stat, column)
            self._add_block_rows(rows, Kind.ACTIVATION, names)
            bounded = bounded_calls > 0
            if bounded.any():
                rows.add(
                    [names[i] for i in np.flatnonzero(bounded)],
                    Kind.ACTIVATION,
                    Stat.SATURATED_FRAC,
                    (sat / np.maximum(count, 1.0))[bounded],
                )

        return add

    def _grads(
        self,
        tables: Tables,
        scales: np.ndarray | None,
        merge: StepMerge,
        world: int,
        origins: dict[str, str],
    ) -> Callable[[StepRows], None]:
        calls, per_call = tables.grads, tables.grad_stats.copy()
        if scales is not None:  # each backward unscaled by the scale it was made with
            per_call[:, 0] /= scales**2
            per_call[:, 1] /= scales
        bad = np.flatnonzero(per_call[:, 2] > 0)
        if len(bad):
            origins[Stat.BACKWARD] = calls[int(bad[0])].label
        names, label_id = self.grad_labels([c.label for c in calls])
        n = len(names)
        samples = np.array([c.samples for c in calls], dtype=np.float64)
        sums = np.stack(
            [
                np.bincount(label_id, samples, n),
                np.bincount(label_id, per_call[:, 0], n),
                np.bincount(label_id, per_call[:, 1], n),
                np.bincount(label_id, per_call[:, 2], n),
            ]
        )
        merge.expect_same(n)
        handle = merge.add(sums, "sum")

        def add(rows: StepRows) -> None:
            sums = merge.get(handle).copy()
            # each rank's loss averages its own batch; DDP and FSDP average the gradients over
            # ranks, so the global batch's output gradients are 1/world of the local ones
            sums[1] /= world**2
            sums[2] /= world
            for stat, column in stats.grad_stats(*sums).items():
                rows.add(names, Kind.ACTIVATION_GRAD, stat, column)
            self._add_block_rows(rows, Kind.ACTIVATION_GRAD, names)

        return add

    def _add_block_rows(self, rows: StepRows, kind: str, names: list[str]) -> None:
        """`block_index` rows: each block output's position in the stream."""
        if not self.block_index:
            return
        cached = self._block_rows.get(kind)
        if cached is None or cached[0] is not names:  # label lists are kept while calls repeat
            labels = [n for n in names if n.partition("[")[0] in self.block_index]
            index = np.array([self.block_index[n.partition("[")[0]] for n in labels])
            cached = self._block_rows[kind] = (names, labels, index)
        _, labels, index = cached
        if labels:
            rows.add(labels, kind, Stat.BLOCK_INDEX, index)


def _params(tables: Tables, layout: ParamLayout, merge: StepMerge) -> Callable[[StepRows], None]:
    read = tables.params
    assert read is not None
    present = read.present
    if len(present) == len(layout.names):  # the usual case: every parameter has a gradient
        names, ndims, sharded = layout.names, layout.ndims, layout.sharded
    else:
        names = [layout.names[i] for i in present]
        ndims, sharded = layout.ndims[present], layout.sharded[present]
    grad_sumsq, grad_max, nonfinite, param_sumsq = tables.param_values
    update_sumsq, dot, state = tables.update_sumsq, tables.update_dot, tables.state_sumsq
    # a shard's squares, counts and dot products are part of the whole tensor's
    merged = [(grad_sumsq, "sum"), (param_sumsq, "sum"), (nonfinite, "sum"), (grad_max, "max")]
    merged += [(v, "sum") for v in (update_sumsq, dot, state) if v is not None]
    handles = [merge.add(values[sharded], op) for values, op in merged] if sharded.any() else []

    def add(rows: StepRows) -> None:
        for (values, _), handle in zip(merged, handles, strict=False):
            values[sharded] = merge.get(handle)
        grad_norm, param_norm = np.sqrt(grad_sumsq), np.sqrt(param_sumsq)
        rows.add(names, Kind.PARAM_GRAD, Stat.NORM, grad_norm)
        rows.add(names, Kind.PARAM_GRAD, Stat.MAX_ABS, grad_max)
        rows.add(names, Kind.PARAM_GRAD, Stat.NONFINITE, nonfinite)
        rows.add(names, Kind.PARAM, Stat.NORM, param_norm)
        rows.add(names, Kind.PARAM, Stat.NDIM, ndims)
        if update_sumsq is not None:
            update_norm = np.sqrt(update_sumsq)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(param_norm > 0, update_norm / param_norm, np.nan)
            rows.add(names, Kind.UPDATE, Stat.NORM, update_norm)
            rows.add(names, Kind.UPDATE, Stat.RATIO, ratio)
            if dot is not None and state is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    cos = np.where(
                        update_norm * grad_norm > 0, -dot / (update_norm * grad_norm), np.nan
                    )
                    step = np.where(grad_norm > 0, update_norm / grad_norm, np.nan)
                rows.add(names, Kind.UPDATE, Stat.COS_GRAD, np.clip(cos, -1.0, 1.0))
                rows.add(names, Kind.UPDATE, Stat.STEP_SIZE, step)
                adam = np.isfinite(state)
                if adam.any():
                    rows.add(
                        [n for n, a in zip(names, adam, strict=True) if a],
                        Kind.OPTIMIZER_STATE,
                        Stat.EXP_AVG_SQ_NORM,
                        np.sqrt(state[adam]),
                    )
        total = np.sqrt(np.square(grad_norm).sum(keepdims=True))
        rows.add([TOTAL], Kind.PARAM_GRAD, Stat.NORM, total)

    return add
