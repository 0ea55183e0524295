"""Polite stops: the first SIGINT/SIGTERM asks the run to cancel, a second stops at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from flows.interrupts import StopRequest, exit_status, on_signals


def _deliver(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs in the main thread between two bytecodes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_requests_a_stop_and_the_second_raises(sig: signal.Signals) -> None:
    """First signal: the request is set with the signal and a reason, and the user is told
    how to force it; no exception. Second: KeyboardInterrupt. Handlers are restored after."""
    before = signal.getsignal(sig)
    notices: list[str] = []
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt), on_signals(stop, notices.append):
        _deliver(sig)
        assert stop.requested and stop.signal == sig
        assert stop.reason == f"cancelled by {sig.name}"
        assert len(notices) == 1 and "send it again to stop at once" in notices[0]
        _deliver(sig)
    assert signal.getsignal(sig) is before


def test_not_polite_raises_on_the_first_signal() -> None:
    """With `polite=False` (a Dask run, whose workers can't see the request) the first
    signal already raises, and the request still records which signal it was."""
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt), on_signals(stop, print, polite=False):
        _deliver(signal.SIGTERM)
    assert stop.signal == signal.SIGTERM


def test_a_request_keeps_its_first_reason() -> None:
    """A later request (the second signal) does not overwrite the first reason."""
    stop = StopRequest()
    stop.request("cancelled by SIGTERM", signal.SIGTERM)
    stop.request("cancelled by SIGINT", signal.SIGINT)
    assert (stop.reason, stop.signal) == ("cancelled by SIGTERM", signal.SIGTERM)
    assert stop.wait(0)


def test_exit_status_follows_the_shell_convention() -> None:
    """130 for SIGINT, 143 for SIGTERM, 130 when the signal is unknown."""
    assert exit_status(signal.SIGINT) == 130
    assert exit_status(signal.SIGTERM) == 143
    assert exit_status(None) == 130
