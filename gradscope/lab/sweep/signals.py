"""A sweep's stop signals: Ctrl-C and SIGTERM (a job scheduler's stop) both stop it, and both
are held back while worker processes start. Signal state can only be changed on the main
thread; elsewhere (a sweep run from a thread) these leave it as it is."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Ctrl-C, and SIGTERM (which terminate_as_interrupt turns into Ctrl-C): either arriving while a
# worker is being spawned would cut the data it is started with short, and it would die
# printing a traceback (EOFError in multiprocessing's spawn_main)
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _on_main_thread(set_: Callable[[], Any], restore: Callable[[Any], object]) -> Iterator[None]:
    """set_() before the block and restore(what it returned) after, on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = set_()
    try:
        yield
    finally:
        restore(old)


# set by a stop signal: a KeyboardInterrupt that library code swallowed (a bare `except:`)
# is raised again by the sweep's loop (stop_if_asked) and still counts as a stop
STOP = threading.Event()


def _interrupt(signum: int, frame: object) -> None:
    STOP.set()
    raise KeyboardInterrupt


def stop_if_asked() -> None:
    """Raises KeyboardInterrupt where a stop signal came (see STOP)."""
    if STOP.is_set():
        raise KeyboardInterrupt


def _install() -> dict[int, Any]:
    """Our handler for each stop signal, except one this process was started ignoring (as
    `nohup` or a script's `cmd &` start it): that choice is kept."""
    STOP.clear()
    return {
        sig: signal.signal(sig, _interrupt)
        for sig in INTERRUPTS
        if signal.getsignal(sig) is not signal.SIG_IGN
    }


def _uninstall(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)
    STOP.clear()


def stop_on_signals() -> contextlib.AbstractContextManager[None]:
    """Ctrl-C and SIGTERM end the sweep: workers stopped, the finished runs written out, one
    line. Inside the block, stop_if_asked() tells whether one came."""
    return _on_main_thread(_install, _uninstall)


def interrupts_blocked() -> contextlib.AbstractContextManager[None]:
    """Ctrl-C and SIGTERM held back while worker processes start: they inherit the blocked
    signals (and unblock them once they ignore Ctrl-C); the parent gets them once they have
    started."""
    return _on_main_thread(
        lambda: signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS),
        lambda old: signal.pthread_sigmask(signal.SIG_SETMASK, old),
    )
