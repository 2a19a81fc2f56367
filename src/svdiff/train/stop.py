"""Ctrl-C and SIGTERM during the training loop: the step in progress finishes, a checkpoint of it is saved and the
run ends saying how to resume, instead of losing everything since the last checkpoint. A second signal stops at
once. Outside the loop (loading, class images, the final save) a signal interrupts as usual: nothing is lost there.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopOnSignal:
    """`with StopOnSignal() as stop:` … `if stop.requested(accelerator):` after each step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def requested(self, accelerator) -> bool:
        """Whether any process got a signal; every process agrees, so they all save the same step together."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else self.received], device=accelerator.device)
        got = int(accelerator.reduce(flag, reduction="max").item())
        if got and self.received is None:
            self.received = got
        return bool(got)
