"""Ctrl-C handling: a training run finishes its step and saves (``StopFlag``); a compare parent passes the
signals it gets on to the children that are training (``Relay``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


class StopFlag:
    """First Ctrl-C (or SIGTERM, as a scheduler or ``kill`` sends): finish the current step, save, exit 130 (143 for
    SIGTERM). Second Ctrl-C: abort at once."""

    def __init__(self, grace: float = 0.0):
        self.requested = False
        self.installed = False
        self._previous = None
        self._previous_term = None
        self.signal = signal.SIGINT
        self.grace = grace  # torchrun forwards the terminal's Ctrl-C: a second SIGINT this soon is the same one
        self._when = 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._previous_term = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._when < self.grace:
                return
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum
        self._when = time.monotonic()
        print(
            "\ngradspace: interrupt received; stopping after this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def request(self) -> None:
        if self.installed:
            os.kill(os.getpid(), signal.SIGINT)
        self.requested = True

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self._previous)
            signal.signal(signal.SIGTERM, self._previous_term)
        return False


class Relay:
    """While compare's children run, each in its own session (so a terminal's Ctrl-C reaches compare alone, not
        them twice), a signal to compare is passed on to them by ``relay(signum)``: Ctrl-C and ``kill -INT`` of
        compare's pid alike make every running run save (a second one aborts them), SIGTERM and SIGHUP (the terminal
        closed) too. Only the main thread can install handlers; elsewhere (``installed`` false) this does nothing, and
    the children had better stay in the terminal's process group."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self, relay):
        self.relay = relay
        self._previous: dict[int, object] = {}
        self.installed = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.installed:
            for sig in (getattr(signal, name) for name in self.SIGNALS if hasattr(signal, name)):
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.relay(signum))
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False
