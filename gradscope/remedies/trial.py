"""A trial: a short stretch of training rerun from the same start for the baseline and for each
remedy, on copies, each recorded and diagnosed, and the measured gain of each.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import multiprocessing
import random
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim import Optimizer

from gradscope.diagnose import diagnose
from gradscope.recorder import hooks, watch
from gradscope.remedies.catalog import CannotApply, Context, Remedy, propose, remedy
from gradscope.schema import COLUMNS, TOTAL, Kind, Stat
from gradscope.verdict import Verdict

# A remedy changes the outcome only past this relative difference in final loss: two runs
# from the same start that differ in float rounding alone stay well inside it.
TOLERANCE = 0.02
# A run whose loss stays non-finite this many steps is stopped: its end is known.
NONFINITE_PATIENCE = 5
BASELINE = "baseline"

Make = Callable[[], tuple[nn.Module, Optimizer]]
StepFn = Callable[[nn.Module, Optimizer, Any], Any]


class TrialError(ValueError):
    """A trial that cannot run at all (bad arguments, a baseline that raises); says why."""


@dataclass
class TrialRun:
    """One rerun: the baseline or one remedy, its per-step losses and its verdicts.

    `skipped` is why the remedy could not apply, `failed` the error training raised; either
    leaves `losses` empty.
    """

    name: str
    remedy: Remedy | None
    losses: list[float] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    seconds: float = 0.0
    accuracy: float | None = None
    skipped: str | None = None
    failed: str | None = None

    @property
    def final_loss(self) -> float:
        """The mean loss over the last tenth of the steps (inf where it is not finite)."""
        tail = self._tail()
        if not len(tail):
            return math.nan
        value = float(np.mean(tail))
        return value if math.isfinite(value) else math.inf

    @property
    def loss_spread(self) -> float:
        """The standard deviation of the loss over the last tenth of the steps."""
        tail = self._tail()
        return float(np.std(tail)) if len(tail) and np.isfinite(tail).all() else math.nan

    def _tail(self) -> np.ndarray:
        losses = np.asarray(self.losses, dtype=float)
        return losses[-max(1, len(losses) // 10) :] if len(losses) else losses

    @property
    def problems(self) -> list[str]:
        """The ids of its warning and error verdicts, in the diagnosis's order."""
        return list(
            dict.fromkeys(v.id for v in self.verdicts if v.severity in ("warning", "error"))
        )


@dataclass
class Trial:
    """The baseline and each remedy tried from the same start (`runs`, the baseline first).

    `table()` compares them; `best` is the remedy with the largest measured gain.
    """

    runs: list[TrialRun]
    steps: int
    seed: int

    @property
    def baseline(self) -> TrialRun:
        return self.runs[0]

    def outcome(self, run: TrialRun) -> str:
        """ "better", "worse" or "no change" against the baseline's final loss; or why the
        remedy did not run."""
        if run.skipped is not None:
            return f"could not apply: {run.skipped}"
        if run.failed is not None:
            return f"failed: {run.failed}"
        if run is self.baseline:
            return ""
        gain = self.gain(run)
        if gain > 0:
            return "better"
        if gain < 0:
            return "worse"
        return "no change"

    def gain(self, run: TrialRun) -> float:
        """The relative drop of the final loss against the baseline's (positive is better);
        0 inside TOLERANCE; +-inf where only one of the two stayed finite; nan where the
        remedy did not run."""
        if run.skipped is not None or run.failed is not None or not run.losses:
            return math.nan
        base, mine = self.baseline.final_loss, run.final_loss
        if not math.isfinite(base):
            return math.inf if math.isfinite(mine) else 0.0
        if not math.isfinite(mine):
            return -math.inf
        gain = (base - mine) / abs(base) if base != 0 else -mine
        return gain if abs(gain) > TOLERANCE else 0.0

    @property
    def best(self) -> Remedy | None:
        """The remedy whose final loss beats the baseline's by most; None when none does."""
        tried = [r for r in self.runs[1:] if self.outcome(r) == "better"]
        if not tried:
            return None
        # an infinite gain (a divergence fixed) ties between remedies: the lower loss wins
        best = max(tried, key=lambda r: (self.gain(r), -r.final_loss))
        return best.remedy

    def table(self) -> pd.DataFrame:
        """One row per run, the baseline first: remedy, final_loss (mean over the last tenth),
        loss_spread, cleared and new (warning/error verdict ids, comma-separated), seconds,
        outcome, gain and code; accuracy where the trial had `eval=`."""
        base = set(self.baseline.problems)
        rows = []
        for run in self.runs:
            ran = run.skipped is None and run.failed is None
            mine = run.problems
            row = {
                "remedy": run.name,
                "final_loss": run.final_loss if ran else math.nan,
                "loss_spread": run.loss_spread if ran else math.nan,
                "cleared": ", ".join(v for v in self.baseline.problems if v not in mine)
                if ran and run is not self.baseline
                else "",
                "new": ", ".join(v for v in mine if v not in base) if ran else "",
                "seconds": run.seconds,
                "outcome": self.outcome(run),
                "gain": self.gain(run) if run is not self.baseline else 0.0,
                "code": run.remedy.code if run.remedy is not None else "",
            }
            if any(r.accuracy is not None for r in self.runs):
                row["accuracy"] = run.accuracy if run.accuracy is not None else math.nan
            rows.append(row)
        return pd.DataFrame(rows)

    def losses(self) -> pd.DataFrame:
        """Long form: remedy, step, loss (for plotting the curves side by side)."""
        parts = [
            pd.DataFrame({"remedy": run.name, "step": range(len(run.losses)), "loss": run.losses})
            for run in self.runs
            if run.losses
        ]
        if not parts:
            return pd.DataFrame(columns=["remedy", "step", "loss"])
        return pd.concat(parts, ignore_index=True)


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
    spec.start = _start(spec)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        baseline = _run(spec, None)
        if baseline.failed is not None:
            raise TrialError(f"the baseline run failed: {baseline.failed}")
        skipped: list[TrialRun] = []
        if chosen is None:
            chosen, skipped = _applicable(spec, propose(baseline.verdicts), limit)
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


def _start(spec: _Spec) -> tuple[nn.Module, Optimizer]:
    """The start every run copies: made under the seed, copied at once (model and optimizer
    together, so the optimizer's parameters are the copy's)."""
    _seed(spec.seed)
    made = spec.make()
    if not isinstance(made, tuple | list) or len(made) != 2:
        raise TrialError("make() must return (model, optimizer)")
    model, optimizer = made
    if not isinstance(model, nn.Module):
        raise TrialError(f"make() returned a {type(model).__name__} as the model, not an nn.Module")
    if not isinstance(optimizer, Optimizer):
        raise TrialError(
            f"make() returned a {type(optimizer).__name__} as the optimizer, not a "
            "torch.optim.Optimizer"
        )
    # a recorder watching the user's model is not copied along with its hooks (its hooks'
    # closures are shared by a deep copy: the copies' training would land in its steps)
    memo: dict[int, Any] = {}
    for module in model.modules():
        for recorder in hooks._WATCHED.get(module, []):
            memo[id(recorder)] = _Unwatched()
    try:
        start = copy.deepcopy((model, optimizer), memo)
    except Exception as e:  # a module holding a lock, a file or an unpicklable hook
        raise TrialError(f"the model and optimizer cannot be deep-copied ({e})") from None
    _drop_gradscope_hooks(start[0])
    return start


class _Unwatched:
    """Stands in, in the copies, for a recorder that watches the user's model."""


_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_post_accumulate_grad_hooks",  # (on parameters)
)


def _drop_gradscope_hooks(model: nn.Module) -> None:
    """Removes the recorder's hooks from a copy: on its modules and on its parameters."""
    for holder in [*model.modules(), *model.parameters()]:
        for name in _HOOK_TABLES:
            table = getattr(holder, name, None)
            if not table:
                continue
            for key, fn in list(table.items()):
                if _recorders_hook(fn):
                    del table[key]


def _recorders_hook(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, _Unwatched):
        return True
    where = getattr(fn, "__module__", None) or type(owner).__module__
    return str(where).startswith("gradscope.recorder")


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
