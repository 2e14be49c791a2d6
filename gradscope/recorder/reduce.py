"""Per-layer reduction of closed steps' per-call tables, vectorized over steps: calls of the
same module (shared weights, micro-batches) merged from additive moments, registered for the
merge over ranks, then the derived statistics written as rows.

A batch is a run of consecutive steps that made the same calls (the same `step_key`): their
tables are stacked, with the steps as a leading axis, and reduced at once (see deferred.py).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
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
        self._answer: tuple[list[str], np.ndarray, bool] = ([], np.zeros(0), False)

    def __call__(self, labels: list[str]) -> tuple[list[str], np.ndarray, bool]:
        """Unique labels, each call's label index, and whether a label has several calls."""
        if labels != self._labels:
            index: dict[str, int] = {}
            ids = np.array([index.setdefault(label, len(index)) for label in labels], np.int64)
            self._labels, self._answer = labels, (list(index), ids, len(index) < len(labels))
        return self._answer


def by_label(values: np.ndarray, label_id: np.ndarray, shared: bool, ufunc: np.ufunc) -> np.ndarray:
    """(steps, calls) -> (steps, labels): each label's calls reduced with `ufunc` (add, fmin
    or fmax) one after the other in call order, as np.bincount adds them."""
    if not shared:  # one call per label: label_id is 0, 1, 2, ...
        return values
    start = 0.0 if ufunc is np.add else np.inf if ufunc is np.fmin else -np.inf
    out = np.full((len(values), int(label_id.max()) + 1), start)
    ufunc.at(out, (slice(None), label_id), values)  # type: ignore[arg-type]
    return out


def step_key(tables: Tables, scaled: bool, origins: dict[str, str]) -> Hashable:
    """What decides a step's rows and layout: steps with equal keys reduce together."""
    params, state = tables.params, tables.state_sumsq
    return (
        [c.label for c in tables.outputs],
        [i for i, _ in tables.saturated],
        [c.label for c in tables.grads],
        scaled,
        None if params is None else params.present,
        tables.update_sumsq is not None,
        None if state is None else np.isfinite(state).tobytes(),
        [name for name, _ in tables.scalars],
        tuple(origins.items()),
    )


def nonfinite_origins(tables: Tables) -> dict[str, str]:
    """The first call with a non-finite value, by phase (forward, backward)."""
    origins: dict[str, str] = {}
    # (count_nonzero: one numpy call, a fifth of `(col > 0).any()`'s cost on every step;
    # the counts are never negative)
    forward, backward = tables.output_stats[:, 5], tables.grad_stats[:, 2]
    if np.count_nonzero(forward):
        origins[Stat.FORWARD] = tables.outputs[int(np.argmax(forward > 0))].label
    if np.count_nonzero(backward):
        origins[Stat.BACKWARD] = tables.grads[int(np.argmax(backward > 0))].label
    return origins


@dataclass(frozen=True)
class ParamLayout:
    """What the reduction needs to know of the recorded parameters."""

    names: list[str]
    ndims: np.ndarray
    sharded: np.ndarray  # bool per parameter: a DTensor shard, merged over ranks


class Reducer:
    """Turns batches of closed steps into rows; keeps label indices between batches."""

    def __init__(self, block_index: dict[str, float]) -> None:
        self.output_labels, self.grad_labels = LabelIndex(), LabelIndex()
        self.block_index = block_index
        self._block_rows: dict[str, tuple[list[str], list[str], np.ndarray]] = {}

    def reduce(
        self,
        batch: Sequence[Tables],
        scales: Sequence[np.ndarray] | None,
        origins: dict[str, str],
        params: ParamLayout,
        merge: StepMerge,
        world: int,
    ) -> StepRows:
        """The rows of a batch of steps with one `step_key` (one row of values per step);
        `scales`: each step's per-call GradScaler scales, or None; `origins`: the batch's
        first layer with a non-finite value by phase (part of the key)."""
        first = batch[0]
        finish: list[Callable[[StepRows], None]] = []
        if first.outputs:
            finish.append(self._outputs(batch, merge))
        if first.grads:
            finish.append(self._grads(batch, scales, merge, world))
        if first.params is not None:
            finish.append(_params(batch, params, merge))
        if first.scalars:
            values = np.array([[v for _, v in t.scalars] for t in batch])
            handle = merge.add(values, "sum")
            names = [name for name, _ in first.scalars]
            finish.append(
                lambda rows: rows.add(
                    [TOTAL] * len(names), Kind.SCALAR, names, merge.get(handle) / world
                )
            )
        merge.run()
        rows = StepRows(len(batch))
        for add in finish:
            add(rows)
        for phase, layer in origins.items():
            rows.add([layer], Kind.NONFINITE_ORIGIN, phase, np.ones(1))
        return rows

    def _outputs(self, batch: Sequence[Tables], merge: StepMerge) -> Callable[[StepRows], None]:
        first = batch[0]
        table = np.stack([t.output_stats for t in batch])
        total, sumsq, lo, hi, nonzero, nonfinite, dead, units = np.moveaxis(table, 2, 0)
        names, label_id, shared = self.output_labels([c.label for c in first.outputs])
        n = len(names)
        numel = np.stack([t.output_numel() for t in batch])
        # extremes over calls ignore NaN, as within a call (a kernel's call with no value but
        # NaN gives inf, -inf; a torch-op call NaN)
        lows = by_label(lo, label_id, shared, np.fmin)
        highs = by_label(hi, label_id, shared, np.fmax)
        # a unit is dead over several calls (micro-batches, ranks) only where dead in each:
        # the smallest count (see schema.Stat.DEAD_UNITS)
        dead = by_label(dead, label_id, shared, np.fmin)
        units = by_label(units, label_id, shared, np.fmax)
        sat_calls = [i for i, _ in first.saturated]
        sat_values = np.zeros_like(total)
        sat_values[:, sat_calls] = [[v for _, v in t.saturated] for t in batch]
        bounded_calls = np.bincount(label_id[sat_calls], minlength=n)
        sums = np.stack(
            [
                by_label(values, label_id, shared, np.add)
                for values in (total, sumsq, nonzero, numel, nonfinite, sat_values)
            ]
        )
        merge.expect_same(n)
        handles = (
            merge.add(sums, "sum"),
            merge.add(np.stack([lows, dead]), "min"),
            merge.add(np.stack([highs, units]), "max"),
        )

        def add(rows: StepRows) -> None:
            sums, (lo, dead), (hi, units) = (merge.get(h) for h in handles)
            lo, hi = lo.copy(), hi.copy()
            no_value = lo > hi  # a layer with no value but NaN (counted in nonfinite)
            lo[no_value] = hi[no_value] = np.nan
            total, sumsq, nonzero, count, nonfinite, sat = sums
            values = stats.activation_stats(
                total, sumsq, lo, hi, nonzero, count, nonfinite, dead, units
            )
            for stat, column in values.items():
                rows.add(names, Kind.ACTIVATION, stat, column)
            self._add_block_rows(rows, Kind.ACTIVATION, names)
            bounded = np.flatnonzero(bounded_calls > 0)
            if len(bounded):
                rows.add(
                    [names[i] for i in bounded],
                    Kind.ACTIVATION,
                    Stat.SATURATED_FRAC,
                    (sat / np.maximum(count, 1.0))[:, bounded],
                )

        return add

    def _grads(
        self,
        batch: Sequence[Tables],
        scales: Sequence[np.ndarray] | None,
        merge: StepMerge,
        world: int,
    ) -> Callable[[StepRows], None]:
        first = batch[0]
        per_call = np.stack([t.grad_stats for t in batch])
        if scales is not None:  # each backward unscaled by the scale it was made with
            scale = np.stack(scales)
            per_call[:, :, 0] /= scale**2
            per_call[:, :, 1] /= scale
        names, label_id, shared = self.grad_labels([c.label for c in first.grads])
        n = len(names)
        samples = np.stack([t.grad_samples() for t in batch])
        sums = np.stack(
            [
                by_label(values, label_id, shared, np.add)
                for values in (samples, per_call[:, :, 0], per_call[:, :, 1], per_call[:, :, 2])
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


def _stacked(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    return None if arrays[0] is None else np.stack(arrays)  # type: ignore[arg-type]


def _params(
    batch: Sequence[Tables], layout: ParamLayout, merge: StepMerge
) -> Callable[[StepRows], None]:
    read = batch[0].params
    assert read is not None
    present = read.present
    if len(present) == len(layout.names):  # the usual case: every parameter has a gradient
        names, ndims, sharded = layout.names, layout.ndims, layout.sharded
    else:
        names = [layout.names[i] for i in present]
        ndims, sharded = layout.ndims[present], layout.sharded[present]
    grad_sumsq, grad_max, nonfinite, param_sumsq = (
        np.stack([t.param_values[k] for t in batch]) for k in range(4)
    )
    update_sumsq = _stacked([t.update_sumsq for t in batch])
    dot = _stacked([t.update_dot for t in batch])
    state = _stacked([t.state_sumsq for t in batch])
    # a shard's squares, counts and dot products are part of the whole tensor's
    merged = [(grad_sumsq, "sum"), (param_sumsq, "sum"), (nonfinite, "sum"), (grad_max, "max")]
    merged += [(v, "sum") for v in (update_sumsq, dot, state) if v is not None]
    handles = [merge.add(values[:, sharded], op) for values, op in merged] if sharded.any() else []

    def add(rows: StepRows) -> None:
        for (values, _), handle in zip(merged, handles, strict=False):
            values[:, sharded] = merge.get(handle)
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
                adam = np.isfinite(state[0])  # the same in every step of a batch (its key)
                if adam.any():
                    rows.add(
                        [n for n, a in zip(names, adam, strict=True) if a],
                        Kind.OPTIMIZER_STATE,
                        Stat.EXP_AVG_SQ_NORM,
                        np.sqrt(state[:, adam]),
                    )
        total = np.sqrt(np.square(grad_norm).sum(axis=1, keepdims=True))
        rows.add([TOTAL], Kind.PARAM_GRAD, Stat.NORM, total)

    return add
