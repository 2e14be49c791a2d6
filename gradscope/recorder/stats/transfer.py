"""The one transfer of a recorded step: its statistics (0-d tensors and short vectors of any
float or integer dtype) joined on their device into one float64 vector by one `cat`, copied
without blocking into a reused host buffer (page-locked where CUDA is available, so that the
copy is truly asynchronous), with an event that says when it has arrived.

Nothing here waits for a device while a step runs: `start()` only queues work, `ready()`
asks the event, `values()` waits (called at a later step's close, or when rows are asked
for). Parts already on the CPU are joined straight into the host buffer.
"""

from __future__ import annotations

import numpy as np
import torch


class StepTransfer:
    """One host buffer and the transfer in flight into it."""

    def __init__(self) -> None:
        self._host = torch.empty(0, dtype=torch.float64)
        self._array: np.ndarray = np.zeros(0)
        self._staging: dict[torch.device, torch.Tensor] = {}
        self._events: list[torch.Event] = []
        self._size = 0
        self.busy = False  # holds values not yet read

    def start(self, parts: list[torch.Tensor]) -> None:
        """Queues the join and copy of `parts`, in order, into the host buffer."""
        total = sum(p.numel() for p in parts)
        self._grow(total)
        self._events = []
        at, i = 0, 0
        while i < len(parts):  # runs of consecutive parts on one device
            device = parts[i].device
            j = i
            while j < len(parts) and parts[j].device == device:
                j += 1
            run = [p.detach().reshape(-1) for p in parts[i:j]]
            n = sum(p.numel() for p in run)
            if device.type == "cpu":
                torch.cat(run, out=self._host[at : at + n])  # cast to float64 as it joins
            else:
                staging = self._staging_for(device, n)
                torch.cat(run, out=staging)
                event = copy_to_host(self._host[at : at + n], staging)
                if event is not None:
                    self._events.append(event)
            at, i = at + n, j
        self._size = total
        self.busy = True

    def ready(self) -> bool:
        """Whether the copy has arrived (asks the device; never waits)."""
        return all(e.query() for e in self._events)

    def values(self) -> np.ndarray:
        """The transferred vector (waiting for the copy where it has not arrived yet); valid
        until release()."""
        for event in self._events:
            event.synchronize()
        self._events = []
        return self._array[: self._size]

    def release(self) -> None:
        """The values have been read: the buffer may take another step's."""
        self.busy = False

    def _grow(self, n: int) -> None:
        if self._host.numel() >= n:
            return
        host = torch.empty(max(n, 2 * self._host.numel(), 256), dtype=torch.float64)
        if torch.cuda.is_available():
            host = host.pin_memory()
        self._host, self._array = host, host.numpy()

    def _staging_for(self, device: torch.device, n: int) -> torch.Tensor:
        """A float64 device buffer of at least n values, reused (stream order keeps the last
        copy out of it ahead of the next join into it)."""
        staging = self._staging.get(device)
        if staging is None or staging.numel() < n:
            size = max(n, 256) if staging is None else max(n, 2 * staging.numel())
            staging = self._staging[device] = torch.empty(size, dtype=torch.float64, device=device)
        return staging[:n]


def copy_to_host(host: torch.Tensor, source: torch.Tensor) -> torch.Event | None:
    """Queues the copy of a device tensor into `host` and returns the event recorded after
    it on the device's current stream (torch.Event: CUDA and the other accelerators); where
    the device's backend records no events, the copy is made blocking instead, so that a
    value is never read before it has arrived."""
    try:
        event = torch.Event(device=source.device.type)
        stream = torch.accelerator.current_stream(source.device)
    except (RuntimeError, ValueError):  # this backend records no events
        host.copy_(source)
        return None
    host.copy_(source, non_blocking=True)
    event.record(stream)
    return event


class TransferPool:
    """Host buffers for the steps whose values are in flight or not read yet."""

    def __init__(self) -> None:
        self._all: list[StepTransfer] = []

    def start(self, parts: list[torch.Tensor]) -> StepTransfer:
        transfer = next((t for t in self._all if not t.busy), None)
        if transfer is None:
            transfer = StepTransfer()
            self._all.append(transfer)
        transfer.start(parts)
        return transfer
