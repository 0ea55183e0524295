"""Stop a run politely: the first Ctrl-C or SIGTERM cancels, a second one stops at once.

Plain Python. `StopRequest` is what a caller hands a run (`flows.api`, through
`flows.context.RunContext`); the flow watches it, and when it is set the flow
stops the running pipelines, marks their sites and the ones still waiting `cancelled`,
and still returns its summary. `on_signals` is how the CLI sets it from SIGINT/SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


def exit_status(sig: int | None) -> int:
    """The shell's convention for a run stopped by `sig`: 128 + its number (SIGINT 130,
    SIGTERM 143); 130 when no signal is known (a KeyboardInterrupt)."""
    return 128 + int(sig) if sig else 130


class StopRequest:
    """Set once, from any thread or a signal handler; read by the flow."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.signal: int | None = None

    def request(self, reason: str, sig: int | None = None) -> None:
        if not self._event.is_set():
            self.reason, self.signal = reason, sig
            self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


@contextmanager
def on_signals(
    stop: StopRequest,
    notice: Callable[[str], None],
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
    polite: bool = True,
) -> Iterator[StopRequest]:
    """While the block runs, the first of `signals` sets `stop` (and prints `notice`); the
    next raises KeyboardInterrupt, as does the first when not `polite`. Restores the
    previous handlers. Only the main thread can set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if stop.requested or not polite:
            stop.request(f"stopped by {name}", number)
            raise KeyboardInterrupt(name)
        stop.request(f"cancelled by {name}", number)
        notice(
            f"{name}: cancelling; running pipelines are being stopped and the summary will "
            "follow (send it again to stop at once)"
        )

    installable = [s for s in signals if sys.platform != "win32" or s == signal.SIGINT]
    previous = {s: signal.signal(s, handle) for s in installable}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
