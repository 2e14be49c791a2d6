"""Running a depth sweep: one set-up for every way of running it (the folder prepared and
locked, the unfinished runs listed, this process's share of them), then the runs trained here
(one local worker, or a torchrun rank's share) or in local worker processes, each saved as it
finishes, with progress reported in cost units (steps x depth).

Worker processes ignore Ctrl-C (the parent stops them) and end themselves when their parent
is gone (kill -9, SIGTERM), so an interrupted sweep leaves no process behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradscope.lab.data import load_dataset
from gradscope.lab.sweep.config import RunSpec, SweepConfig, SweepError, plan_runs
from gradscope.lab.sweep.measure import run_one
from gradscope.lab.sweep.signals import INTERRUPTS, interrupts_blocked, stop_if_asked
from gradscope.lab.sweep.store import finished_runs, prepare_out, store_run, sweep_lock
from gradscope.lab.train import total_steps


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def reports_here() -> bool:
    """Whether this process reports (rank 0 under torchrun; other ranks train quietly)."""
    return not under_torchrun() or os.environ.get("RANK", "0") == "0"


@dataclass
class SweepProgress:
    """What a progress display needs: runs done, work done, in cost units (steps x depth)."""

    total_runs: int
    total_work: float
    done_runs: int = 0
    done_work: float = 0.0
    current: dict[str, int] = field(default_factory=dict)


def run_sweep(
    config: SweepConfig,
    out: Path,
    data_root: str | None = None,
    workers: int = 2,
    resume: bool = False,
    on_progress: Callable[[SweepProgress], None] | None = None,
    on_run_finished: Callable[[int, int], object] | None = None,
) -> list[str]:
    """Runs every unfinished run of the sweep, saving each as it finishes: under torchrun
    rank r trains runs r, r + world, ... (all ranks share `out`), else `workers` local
    processes share them.

    Returns the ids of the runs this process finished; under torchrun it returns on every
    rank once all runs are done (a barrier), so that rank 0 can merge them.
    `on_progress(SweepProgress)` is called as work is done; `on_run_finished(done, total)`
    after each run that local workers finish (gradscope.report.sweep.ProgressReport redraws
    the report). KeyboardInterrupt stops the workers; the runs finished so far stay on disk.

    Example:
        >>> config = SweepConfig(depths=(2, 6), variants=("plain", "preln"), steps=12,
        ...                      dataset="synthetic")
        >>> run_sweep(config, Path("reports/tiny-sweep"), workers=1)
        ['plain-d6-s0', 'preln-d6-s0', 'plain-d2-s0', 'preln-d2-s0']
    """
    data = load_dataset(config.dataset, data_root)  # fail early and clearly on missing data
    with _group() as group, _claimed(out, config, resume, group):
        done = finished_runs(out)
        todo = [r for r in plan_runs(config) if r.run_id not in done][group.rank :: group.world]
        workers = max(1, min(workers, len(todo))) if group.world == 1 else 1
        ctx = mp.get_context("spawn")
        # a plain multiprocessing queue, given to the workers as they start: no Manager process
        updates: Any = ctx.Queue() if workers > 1 else queue.Queue()
        n_steps = total_steps(config.train_config(0), len(data.y_train))
        finished = _Tracker(todo, n_steps, updates, on_progress)
        if group.world == 1:  # (under torchrun the ranks' runs are merged once all are done)
            finished.on_run_finished = on_run_finished
        if todo and workers == 1:
            threads = torch.get_num_threads()  # this process's own: put back afterwards
            try:
                _init_worker(config.dataset, data_root, updates, 1)
                for spec in todo:
                    stop_if_asked()
                    finished.mark(_work(spec, config, str(out)))
            finally:
                torch.set_num_threads(threads)
        elif todo:
            _run_pool(todo, config, out, data_root, workers, ctx, finished)
            updates.close()
        group.barrier()
        return finished.ids


@dataclass
class _Group:
    """This process's place among the sweep's processes: rank 0 of 1 locally, its rank in
    the gloo group under torchrun (`dist`: torch.distributed)."""

    rank: int = 0
    world: int = 1
    dist: Any = None

    def from_first(self, message: str) -> str:
        """Rank 0's message, on every rank."""
        if self.dist is None:
            return message
        box = [message]
        self.dist.broadcast_object_list(box, src=0)
        return str(box[0])

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()


@contextlib.contextmanager
def _group() -> Iterator[_Group]:
    if not under_torchrun():
        yield _Group()
        return
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        yield _Group(dist.get_rank(), dist.get_world_size(), dist)
    finally:
        if owns_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def _claimed(out: Path, config: SweepConfig, resume: bool, group: _Group) -> Iterator[None]:
    """The folder made (or, resuming, checked) and locked by rank 0 while the sweep runs; a
    folder that cannot be used is every rank's SweepError."""
    with contextlib.ExitStack() as held:
        error = ""
        if group.rank == 0:
            try:
                if not resume:
                    prepare_out(out, config, resume)  # (made before it can be locked)
                held.enter_context(sweep_lock(out))
                if resume:
                    prepare_out(out, config, resume)
            except SweepError as e:
                error = str(e)
        error = group.from_first(error)
        if error:
            raise SweepError(error)
        yield


class _Tracker:
    """The runs finished by this call and the progress in cost units (steps x (depth + 2))."""

    def __init__(
        self,
        todo: list[RunSpec],
        n_steps: int,
        updates: Any,
        on_progress: Callable[[SweepProgress], None] | None,
    ) -> None:
        self.ids: list[str] = []
        self.n_steps = n_steps
        self.updates = updates
        self.cost = {r.run_id: float(n_steps * (r.depth + 2)) for r in todo}
        self.state = SweepProgress(len(todo), sum(self.cost.values()))
        self.on_progress = on_progress
        self.on_run_finished: Callable[[int, int], object] | None = None

    def drain(self) -> None:
        """Takes in the workers' step updates and reports the progress."""
        state = self.state
        while True:
            try:
                run_id, step, total = self.updates.get_nowait()
            except queue.Empty:
                break
            state.current[run_id] = step
        in_flight = sum(self.cost[r] * s / self.n_steps for r, s in state.current.items())
        state.done_work = sum(self.cost[r] for r in self.ids) + in_flight
        if self.on_progress is not None:
            self.on_progress(state)

    def mark(self, run_id: str) -> None:
        self.ids.append(run_id)
        self.state.current.pop(run_id, None)
        self.state.done_runs += 1
        if self.on_run_finished is not None:
            self.on_run_finished(self.state.done_runs, self.state.total_runs)
        self.drain()


# per worker process: the dataset and the progress queue, set once by the pool's initializer
_worker: dict[str, Any] = {}


def _init_worker(
    dataset: str, data_root: str | None, updates: Any, threads: int, parent: int | None = None
) -> None:
    if parent is not None:  # a worker process (not the parent's own loop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)  # blocked while spawned
        threading.Thread(target=_end_with, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    _worker["data"] = load_dataset(dataset, data_root)
    _worker["updates"] = updates


def _end_with(parent: int) -> None:
    """Ends this worker once its parent is gone (it is then adopted: its ppid changes)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _work(spec: RunSpec, config: SweepConfig, out: str) -> str:
    updates = _worker["updates"]

    def progress(step: int, total: int, loss: float) -> None:
        if step % 10 == 0 or step == total:
            updates.put((spec.run_id, step, total))

    frame, row = run_one(spec, config, _worker["data"], progress)
    store_run(Path(out), spec, frame, row)
    return spec.run_id


def _run_pool(
    todo: list[RunSpec],
    config: SweepConfig,
    out: Path,
    data_root: str | None,
    workers: int,
    ctx: Any,
    finished: _Tracker,
) -> None:
    """The runs spread over `workers` spawned processes, each marked finished as it ends."""
    # one thread per run whatever the worker count: results do not depend on how they were
    # spread (GEMM rounding depends on the thread count)
    threads = 1
    pool = ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(config.dataset, data_root, finished.updates, threads, os.getpid()),
    )
    try:
        with interrupts_blocked():
            pending: set[Future[str]] = {pool.submit(_work, s, config, str(out)) for s in todo}
        while pending:
            stop_if_asked()
            complete, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in complete:
                finished.mark(fut.result())
            finished.drain()
    except BaseException:
        # the runs in flight are dropped (their files are written whole or not at all), so
        # the folder can be resumed; the workers are stopped now, not after their run. Killed,
        # not terminated: a worker still starting holds SIGTERM back (see INTERRUPTS), and
        # left running past our exit it would die on our queue's removed semaphore, printing
        # a traceback
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()
        for process in processes:
            with contextlib.suppress(Exception):
                process.join(5)
        raise
    pool.shutdown()
