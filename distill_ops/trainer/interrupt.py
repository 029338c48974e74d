"""Stopping cleanly on SIGINT/SIGTERM: the loop finishes the optimizer step in progress, writes a
checkpoint (the periodic format, so ``resume_from="latest"`` continues exactly) and raises
TrainingInterrupted, a SystemExit whose code is what shells expect (130 for SIGINT, 143 for
SIGTERM).

While the loop runs, the handlers only record the signal; a second signal stops at once (the way
SIGINT or SIGTERM normally would). The previous handlers are restored when the loop ends. A
signal that was ignored (SIG_IGN, e.g. SIGINT under ``nohup``) stays ignored. Handlers can only be
installed from the main thread: elsewhere (a loop run from a worker thread) nothing changes.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """train() stopped on SIGINT/SIGTERM after finishing and checkpointing step ``step``.

    ``code`` is 128 + the signal number (130 SIGINT, 143 SIGTERM), so a script that does not catch
    it exits with the status shells expect; ``checkpoint`` is the directory to resume from.
    """

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return (f"training stopped by {signal_name(self.signum)} after step {self.step}; "
                f"checkpoint: {self.checkpoint}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover
        return f"signal {signum}"


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM set ``signum`` instead of stopping."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # a second signal: stop now, as the signal would without the loop's handler
        self._restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; use the default
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
