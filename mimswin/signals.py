"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption): finish the step, save, exit with `EXIT_PREEMPTED`.

The handler only records the signal; the loop core polls it at step boundaries, agrees on it across ranks and saves.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" (with --resume)


class Preempted(SystemExit):
    """Raised after the checkpoint is saved; being a SystemExit, an uncaught one ends the process with code 75."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 set `received` instead of killing the process."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: SLURM signals every process of a job, and a worker killed by it would make the
    loader raise mid-step (even mid-save), so workers leave the stop to the main process: they ignore SIGUSR1, and
    SIGTERM unless it comes from the process that started them (multiprocessing stops workers so at exit)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(parent.pid if parent else os.getppid(),),
                     name="mimswin-sigterm", daemon=True).start()


def _exit_on_sigterm_from(parent_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent_pid:
            os._exit(0)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
