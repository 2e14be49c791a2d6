"""try_remedies: reruns a short stretch of training for the baseline and for each remedy from
the same start, on copies, each recorded and diagnosed; serially or in forked workers.
"""

from __future__ import annotations

import copy
import itertools
import math
import multiprocessing
import random
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim import Optimizer

from gradscope.diagnose import diagnose
from gradscope.recorder import watch
from gradscope.remedies.catalog import remedy
from gradscope.remedies.copies import copy_start
from gradscope.remedies.core import CannotApply, Context, Remedy
from gradscope.remedies.proposals import propose
from gradscope.remedies.trial import BASELINE, Trial, TrialError, TrialRun
from gradscope.schema import COLUMNS, TOTAL, Kind, Stat

# A run whose loss stays non-finite this many steps is stopped: its end is known.
NONFINITE_PATIENCE = 5

Make = Callable[[], tuple[nn.Module, Optimizer]]
StepFn = Callable[[nn.Module, Optimizer, Any], Any]


@dataclass
class _Spec:
    make: Make
    step: StepFn
    batches: Any
    steps: int
    seed: int
    eval: Callable[[nn.Module], float] | None
    every: int
    start: tuple[nn.Module, Optimizer] | None = None


def try_remedies(
    make: Make,
    step: StepFn,
    batches: Iterable[Any] | Callable[[], Iterator[Any]],
    steps: int = 200,
    remedies: Sequence[str | Remedy] | None = None,
    seed: int = 0,
    eval: Callable[[nn.Module], float] | None = None,  # noqa: A002 (the issue's name)
    workers: int = 1,
    every: int = 1,
    limit: int = 6,
    threads: int | None = 1,
) -> Trial:
    """Reruns `steps` steps of training for the baseline and for each remedy, from the same
    start, on deep copies of what `make()` returns; each run recorded and diagnosed.

    Args:
        make: returns (model, optimizer); it may return the same objects each call: they are
            copied once, under the seed, and never changed.
        step: `step(model, optimizer, batch)` runs one training step (forward, backward,
            `optimizer.step()`) and returns the loss (a tensor or a float).
        batches: a re-iterable (a list, a DataLoader) or a function returning a fresh
            iterator; restarted when it runs out before `steps`.
        remedies: names or Remedy objects to try; by default the ones the baseline's
            verdicts propose (gradscope.remedies.propose): the first `limit` of them that
            apply, and a row (not run) for each proposed before those that cannot, saying why.
        seed: torch, numpy and random are seeded with it before the start is made and
            before each run, so a trial is deterministic.
        eval: `eval(model) -> float` (an accuracy, higher is better), called after each run.
        workers: processes to run the remedies in (forked after the baseline; 1: here).
        every: record every n-th step.
        limit: the most remedies tried when the verdicts choose them.
        threads: torch's intra-op threads while the runs train (restored after); None keeps
            the current setting. One by default: small models train fastest on one thread
            (a trial of the 784-128-10 MLP took 4-10 s on one thread, 35-139 s on two
            busy cores: benchmarks/remedies_speed.py); forked workers always use one.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> def make():
        ...     model = nn.Linear(4, 2)
        ...     return model, torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def step(model, opt, batch):
        ...     opt.zero_grad()
        ...     loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        ...     loss.backward()
        ...     opt.step()
        ...     return loss
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
        >>> trial = try_remedies(make, step, data, steps=20, remedies=["lr_x0.3"])
        >>> list(trial.table()["remedy"])
        ['baseline', 'lr_x0.3']
    """
    if steps < 1:
        raise TrialError(f"steps must be >= 1, got {steps}")
    if workers < 1:
        raise TrialError(f"workers must be >= 1, got {workers}")
    if every < 1:
        raise TrialError(f"every must be >= 1, got {every}")
    if not callable(batches) and iter(batches) is batches:  # type: ignore[arg-type]
        raise TrialError(
            "batches is a one-shot iterator, so every run could not see the same data: pass a "
            "list, a DataLoader, or a function that returns a fresh iterator"
        )
    if threads is not None and threads < 1:
        raise TrialError(f"threads must be >= 1, got {threads}")
    chosen = [remedy(r) for r in remedies] if remedies is not None else None
    spec = _Spec(make, step, batches, steps, seed, eval, every)
    _seed(seed)
    spec.start = copy_start(make)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        baseline = _run(spec, None)
        if baseline.failed is not None:
            raise TrialError(f"the baseline run failed: {baseline.failed}")
        skipped: list[TrialRun] = []
        if chosen is None:
            chosen, skipped = _applicable(
                spec, propose(baseline.verdicts, losses=baseline.losses), limit
            )
        runs = [baseline] + _run_all(spec, chosen, workers) + skipped
    finally:
        torch.set_num_threads(before)
    return Trial(runs, steps, seed)


def _applicable(
    spec: _Spec, proposed: list[Remedy], limit: int
) -> tuple[list[Remedy], list[TrialRun]]:
    """The first `limit` proposed remedies that apply to the start (each tried on a copy, which
    is cheap next to a run), and a row for each that does not, with its reason: so a remedy
    that cannot apply does not take the place of one that can."""
    assert spec.start is not None
    chosen: list[Remedy] = []
    skipped: list[TrialRun] = []
    for r in proposed:
        if len(chosen) == limit:
            break
        model, optimizer = copy.deepcopy(spec.start)
        try:
            r.apply(model, optimizer, Context(spec.steps, spec.seed))
        except CannotApply as e:
            skipped.append(TrialRun(r.name, r, skipped=str(e)))
            continue
        except Exception:  # left to the run, which says how it failed
            pass
        chosen.append(r)
    return chosen, skipped


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _batches(spec: _Spec) -> Iterator[Any]:
    """`steps` batches, the source restarted where it runs out."""

    def fresh() -> Iterator[Any]:
        return iter(spec.batches()) if callable(spec.batches) else iter(spec.batches)

    def forever() -> Iterator[Any]:
        while True:
            empty = True
            for batch in fresh():
                empty = False
                yield batch
            if empty:
                raise TrialError("batches yielded nothing")

    return itertools.islice(forever(), spec.steps)


def _run(spec: _Spec, chosen: Remedy | None) -> TrialRun:
    assert spec.start is not None
    run = TrialRun(chosen.name if chosen else BASELINE, chosen)
    model, optimizer = copy.deepcopy(spec.start)
    began = time.perf_counter()
    if chosen is not None:
        try:
            optimizer = chosen.apply(model, optimizer, Context(spec.steps, spec.seed))
        except CannotApply as e:
            run.skipped = str(e)
            return run
        except Exception as e:  # a remedy must not stop the others
            run.failed = f"applying it raised {type(e).__name__}: {e}"
            return run
    _seed(spec.seed)
    losses: list[float] = []
    try:
        with watch(model, optimizer=optimizer, every=spec.every) as rec:
            bad = 0
            for batch in _batches(spec):
                loss = spec.step(model, optimizer, batch)
                value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
                losses.append(value)
                bad = 0 if math.isfinite(value) else bad + 1
                if bad >= NONFINITE_PATIENCE:
                    break
            frame = rec.to_frame()
    except TrialError:
        raise
    except CannotApply as e:  # found only once the run began (the model's input, say)
        run.skipped = str(e)
        run.seconds = time.perf_counter() - began
        return run
    except Exception as e:
        run.failed = f"{type(e).__name__}: {e}"
        run.seconds = time.perf_counter() - began
        if chosen is None:
            run.failed += "\n" + traceback.format_exc(limit=4)
        return run
    run.losses = losses + [math.nan] * (spec.steps - len(losses)) if bad else losses
    run.verdicts = diagnose(_with_loss(frame, losses))
    if spec.eval is not None:
        model.eval()
        with torch.no_grad():
            run.accuracy = float(spec.eval(model))
    run.seconds = time.perf_counter() - began
    return run


def _with_loss(frame: pd.DataFrame, losses: list[float]) -> pd.DataFrame:
    """The recording with each step's loss as a scalar row (the step function returns the
    loss after the optimizer has closed the step, too late to log it in the step)."""
    recorded = set(frame["step"].unique()) if len(frame) else set(range(len(losses)))
    rows = pd.DataFrame(
        {
            "step": [s for s in range(len(losses)) if s in recorded],
            "layer": TOTAL,
            "kind": str(Kind.SCALAR),
            "stat": str(Stat.LOSS),
            "value": [v for s, v in enumerate(losses) if s in recorded],
        }
    )
    if not len(frame):
        return rows[list(COLUMNS)]
    rows = rows.astype({c: frame[c].dtype for c in COLUMNS})
    return pd.concat([frame, rows], ignore_index=True)


# Forked workers read the trial from here: closures and lambdas (make, step, a remedy's
# change) cannot be pickled to them, so only an index goes over, and a run comes back
# without its Remedy, which the parent puts back.
_FORKED: tuple[_Spec, list[Remedy]] | None = None


def _run_forked(index: int) -> TrialRun:
    assert _FORKED is not None
    torch.set_num_threads(1)  # one run per core; torch's pool would oversubscribe them
    spec, chosen = _FORKED
    run = _run(spec, chosen[index])
    run.remedy = None
    return run


def _run_all(spec: _Spec, chosen: list[Remedy], workers: int) -> list[TrialRun]:
    if workers == 1 or len(chosen) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_run(spec, r) for r in chosen]
    global _FORKED
    _FORKED = (spec, chosen)
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(chosen)), mp_context=context) as pool:
            runs = list(pool.map(_run_forked, range(len(chosen))))
    finally:
        _FORKED = None
    for run, r in zip(runs, chosen, strict=True):
        run.remedy = r
    return runs
