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

from gradscope.recorder.capture import Tables
from gradscope.recorder.merge import StepMerge
from gradscope.recorder.rows import StepRows
from gradscope.recorder.stats import derive
from gradscope.recorder.stats.fields import GRAD, OUTPUT, Fields, Reduction, by_reduction
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


def by_label(
    values: np.ndarray, label_id: np.ndarray, shared: bool, reduction: Reduction
) -> np.ndarray:
    """(steps, calls) -> (steps, labels): each label's calls reduced (add, fmin or fmax) one
    after the other in call order, as np.bincount adds them."""
    if not shared:  # one call per label: label_id is 0, 1, 2, ...
        return values
    out = np.full((len(values), int(label_id.max()) + 1), reduction.identity)
    reduction.ufunc.at(out, (slice(None), label_id), values)  # type: ignore[arg-type]
    return out


def merge_fields(
    table: np.ndarray,
    fields: Fields,
    label_id: np.ndarray,
    shared: bool,
    merge: StepMerge,
    extra_sums: dict[str, np.ndarray],
) -> Callable[[], dict[str, np.ndarray]]:
    """(steps, calls, fields) -> each field per label, merged over calls of a label and over
    ranks by its reduction (one merge array per reduction); `extra_sums`: further (steps,
    calls) values merged by sum. Returns the getter of the merged {name: (steps, labels)}."""
    columns = fields.columns(table)
    groups = by_reduction(fields)
    groups.setdefault(Reduction.SUM, [])
    groups[Reduction.SUM] = [*groups[Reduction.SUM], *extra_sums]
    columns = {**columns, **extra_sums}
    handles = {
        reduction: merge.add(
            np.stack([by_label(columns[n], label_id, shared, reduction) for n in names]),
            reduction.value,
        )
        for reduction, names in groups.items()
    }

    def merged() -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for reduction, names in groups.items():
            out.update(zip(names, merge.get(handles[reduction]), strict=True))
        return out

    return merged


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


_FORWARD_BAD, _BACKWARD_BAD = OUTPUT.index("nonfinite"), GRAD.index("nonfinite_samples")


def nonfinite_origins(tables: Tables) -> dict[str, str]:
    """The first call with a non-finite value, by phase (forward, backward)."""
    origins: dict[str, str] = {}
    # (count_nonzero: one numpy call, a fifth of `(col > 0).any()`'s cost on every step;
    # the counts are never negative)
    forward = tables.output_stats[:, _FORWARD_BAD]
    backward = tables.grad_stats[:, _BACKWARD_BAD]
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
        names, label_id, shared = self.output_labels([c.label for c in first.outputs])
        n = len(names)
        sat_calls = [i for i, _ in first.saturated]
        sat_values = np.zeros(table.shape[:2])
        sat_values[:, sat_calls] = [[v for _, v in t.saturated] for t in batch]
        bounded_calls = np.bincount(label_id[sat_calls], minlength=n)
        numel = np.stack([t.output_numel() for t in batch])
        merge.expect_same(n)
        merged = merge_fields(
            table, OUTPUT, label_id, shared, merge, {"count": numel, "saturated": sat_values}
        )

        def add(rows: StepRows) -> None:
            values = merged()
            count = values["count"]
            for stat, column in derive.activation_stats(values, count).items():
                rows.add(names, Kind.ACTIVATION, stat, column)
            self._add_block_rows(rows, Kind.ACTIVATION, names)
            bounded = np.flatnonzero(bounded_calls > 0)
            if len(bounded):
                rows.add(
                    [names[i] for i in bounded],
                    Kind.ACTIVATION,
                    Stat.SATURATED_FRAC,
                    derive.saturated_frac(values["saturated"], count)[:, bounded],
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
        powers = [f.power for f in GRAD]
        if scales is not None:  # each backward unscaled by the scale it was made with
            scale = np.stack(scales)
            for k, power in enumerate(powers):
                if power:
                    per_call[:, :, k] /= scale**power
        names, label_id, shared = self.grad_labels([c.label for c in first.grads])
        samples = np.stack([t.grad_samples() for t in batch])
        merge.expect_same(len(names))
        merged = merge_fields(per_call, GRAD, label_id, shared, merge, {"samples": samples})

        def add(rows: StepRows) -> None:
            values = merged()
            # each rank's loss averages its own batch; DDP and FSDP average the gradients over
            # ranks, so the global batch's output gradients are 1/world of the local ones
            if world != 1:
                for f in GRAD:
                    if f.power:
                        values[f.name] = values[f.name] / world**f.power
            for stat, column in derive.grad_stats(values, values["samples"]).items():
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
    values = [t.param_values for t in batch]
    grad_sumsq, grad_max, nonfinite, param_sumsq = (
        np.stack([getattr(v, name) for v in values])
        for name in ("grad_sumsq", "grad_max", "nonfinite", "param_sumsq")
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
            rows.add(names, Kind.UPDATE, Stat.NORM, update_norm)
            rows.add(names, Kind.UPDATE, Stat.RATIO, derive.update_ratio(update_norm, param_norm))
            if dot is not None and state is not None:
                cos, step = derive.update_geometry(update_norm, grad_norm, dot)
                rows.add(names, Kind.UPDATE, Stat.COS_GRAD, cos)
                rows.add(names, Kind.UPDATE, Stat.STEP_SIZE, step)
                adam = np.isfinite(state[0])  # the same in every step of a batch (its key)
                if adam.any():
                    rows.add(
                        [n for n, a in zip(names, adam, strict=True) if a],
                        Kind.OPTIMIZER_STATE,
                        Stat.EXP_AVG_SQ_NORM,
                        np.sqrt(state[:, adam]),
                    )
        rows.add([TOTAL], Kind.PARAM_GRAD, Stat.NORM, derive.total_norm(grad_norm))

    return add
