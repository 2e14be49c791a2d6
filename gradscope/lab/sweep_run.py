"""Running a depth sweep: runs spread over local worker processes or torchrun ranks, each
saved as it finishes, with progress reported in cost units.

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
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradscope.lab.data import load_dataset
from gradscope.lab.sweep import (
    RunSpec,
    SweepConfig,
    SweepError,
    finished_runs,
    plan_runs,
    prepare_out,
    run_one,
    store_run,
    sweep_lock,
)
from gradscope.lab.train import total_steps


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def reports_here() -> bool:
    """Whether this process reports (rank 0 under torchrun; other ranks train quietly)."""
    return not under_torchrun() or os.environ.get("RANK", "0") == "0"


def run(
    config: SweepConfig,
    out: Path,
    data_root: str | None = None,
    workers: int = 2,
    resume: bool = False,
    on_progress: Callable[[SweepProgress], None] | None = None,
) -> list[str]:
    """Runs the sweep's unfinished runs: over the ranks under torchrun, else in `workers`
    local processes. Returns the ids of the runs this process finished."""
    if under_torchrun():
        return run_sweep_ranks(config, out, data_root, resume, on_progress)
    return run_sweep(config, out, data_root, workers, resume, on_progress)


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


# Ctrl-C, and SIGTERM (which the CLI turns into Ctrl-C): either arriving while a worker is
# being spawned would cut the data it is started with short, and it would die printing a
# traceback (EOFError in multiprocessing's spawn_main)
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _sigint_blocked() -> Any:
    """Ctrl-C and SIGTERM held back while worker processes start: they inherit the blocked
    signals (and unblock them once they ignore Ctrl-C); the parent gets them once they have
    started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _work(spec: RunSpec, config: SweepConfig, out: str) -> str:
    updates = _worker["updates"]

    def progress(step: int, total: int, loss: float) -> None:
        if step % 10 == 0 or step == total:
            updates.put((spec.run_id, step, total))

    frame, row = run_one(spec, config, _worker["data"], progress)
    store_run(Path(out), spec, frame, row)
    return spec.run_id


@dataclass
class SweepProgress:
    """What a progress display needs: runs done, work done, in cost units (steps x depth)."""

    total_runs: int
    total_work: float
    done_runs: int = 0
    done_work: float = 0.0
    current: dict[str, int] = field(default_factory=dict)


def run_sweep_ranks(
    config: SweepConfig,
    out: Path,
    data_root: str | None = None,
    resume: bool = False,
    on_progress: Callable[[SweepProgress], None] | None = None,
) -> list[str]:
    """The sweep under torchrun: rank r trains runs r, r + world, ...; all share `out`.

    Rank 0 prepares the folder; every rank saves its runs as they finish; the call returns
    on every rank once all runs are done (a barrier), so that rank 0 can merge them.
    """
    import torch.distributed as dist

    config.validate()
    load_dataset(config.dataset, data_root)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        error = [""]
        if rank == 0:
            try:
                prepare_out(out, config, resume)
            except SweepError as e:
                error[0] = str(e)
        dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise SweepError(error[0])
        done = finished_runs(out)
        todo = [r for r in plan_runs(config) if r.run_id not in done]
        mine = todo[rank::world]
        updates: queue.Queue[Any] = queue.Queue()
        _init_worker(config.dataset, data_root, updates, 1)
        finished = []
        state = SweepProgress(len(mine), float(len(mine)))
        for spec in mine:
            finished.append(_work(spec, config, str(out)))
            state.done_runs = state.done_work = len(finished)
            if on_progress is not None and rank == 0:
                on_progress(state)
        dist.barrier()
        return finished
    finally:
        if owns_group:
            dist.destroy_process_group()


def run_sweep(
    config: SweepConfig,
    out: Path,
    data_root: str | None = None,
    workers: int = 2,
    resume: bool = False,
    on_progress: Callable[[SweepProgress], None] | None = None,
) -> list[str]:
    """Runs every unfinished run of the sweep in worker processes, saving each as it finishes.

    Returns the ids of the runs finished by this call. KeyboardInterrupt stops the workers;
    the runs finished so far stay on disk.
    """
    config.validate()
    data = load_dataset(config.dataset, data_root)  # fail early and clearly on missing data
    if not resume:
        prepare_out(out, config, resume)  # (made before it can be locked)
    with sweep_lock(out):
        if resume:
            prepare_out(out, config, resume)
        return _run_locked(config, out, data_root, workers, on_progress, data)


def _run_locked(
    config: SweepConfig,
    out: Path,
    data_root: str | None,
    workers: int,
    on_progress: Callable[[SweepProgress], None] | None,
    data: Any,
) -> list[str]:
    done = finished_runs(out)
    todo = [r for r in plan_runs(config) if r.run_id not in done]
    n_steps = total_steps(config.train_config(0), len(data.y_train))
    cost = {r.run_id: float(n_steps * (r.depth + 2)) for r in todo}
    state = SweepProgress(len(todo), sum(cost.values()))
    if not todo:
        return []
    ctx = mp.get_context("spawn")
    # a plain multiprocessing queue, given to the workers as they start: no Manager process
    updates: Any = ctx.Queue() if workers > 1 else queue.Queue()
    finished: list[str] = []
    workers = max(1, min(workers, len(todo)))
    # one thread per run whatever the worker count: results do not depend on how they were
    # spread (GEMM rounding depends on the thread count)
    threads = 1

    def drain() -> None:
        while True:
            try:
                run_id, step, total = updates.get_nowait()
            except queue.Empty:
                break
            state.current[run_id] = step
        in_flight = sum(cost[r] * s / n_steps for r, s in state.current.items())
        state.done_work = sum(cost[r] for r in finished) + in_flight
        if on_progress is not None:
            on_progress(state)

    def mark(run_id: str) -> None:
        finished.append(run_id)
        state.current.pop(run_id, None)
        state.done_runs += 1
        # report.html from the first finished run on, rewritten as each finishes
        from gradscope.report.sweep import render_progress

        render_progress(out, state.done_runs, state.total_runs)
        drain()

    if workers == 1:
        _init_worker(config.dataset, data_root, updates, 1)
        for spec in todo:
            mark(_work(spec, config, str(out)))
        return finished
    pool = ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(config.dataset, data_root, updates, threads, os.getpid()),
    )
    try:
        with _sigint_blocked():
            pending: set[Future[str]] = {pool.submit(_work, s, config, str(out)) for s in todo}
        while pending:
            complete, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in complete:
                mark(fut.result())
            drain()
    except BaseException:
        # the runs in flight are dropped (their files are written whole or not at all), so
        # the folder can be resumed; the workers are stopped now, not after their run
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.terminate()
        for process in processes:
            with contextlib.suppress(Exception):
                process.join(5)
        raise
    pool.shutdown()
    updates.close()
    return finished
