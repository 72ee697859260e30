"""Ctrl-C during a sweep: the first one stops gracefully, a second one at once.

The driver asks the running trials to stop through a file in the experiment folder
(`GracefulStop` creates it, a trial's `StopRequest` sees it): each trial saves a checkpoint at
its current step and reports that it stopped; then Tune's loop is ended the way Tune's own
Ctrl-C handler ends it. Nothing computed is lost, and the MLflow runs end KILLED.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ray import tune

from orchestrator.spec_file import SpecError
from orchestrator.protocol import EVENT, STOPPED

STOP_GRACE_ENV = "PODD_SWEEP_STOP_GRACE_S"  # how long a first Ctrl-C waits for checkpoints
DEFAULT_STOP_GRACE_S = 120.0
STOP_FILE_PREFIX = ".stop-requested-"  # + a token per launch, in the experiment folder


class StopRequest:
    """Whether the driver asked the running trials to stop (a first Ctrl-C): a file that the
    driver creates in the experiment folder (`GracefulStop`). That folder is the sweep's storage,
    which every node of a cluster shares (checkpoints need it too); a trial on a node that cannot
    see it just keeps going until the driver's grace period ends."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None

    def requested(self) -> bool:
        return self.path is not None and self.path.exists()


_ACTIVE_STOP: GracefulStop | None = None


class GracefulStop(tune.Callback):
    """Ctrl-C during a sweep. The first one asks every running trial to save a checkpoint at
    its current step and ends the sweep once all have (or after `grace_s`): nothing computed
    is lost, and the runs end KILLED. A second one, or one before Tune's loop runs, stops at
    once (KeyboardInterrupt): trials then continue from their last periodic checkpoint.

    Tune's own Ctrl-C handling ends its loop and stops the trial actors straight away, and a
    function trainable gets no hook to save on stop: up to checkpoint_every steps would be
    redone. So the trials are asked through a file (`StopRequest`) and answer with a
    checkpoint report (event `stopped`); then Tune's loop is ended the way its own handler
    ends it: a last experiment snapshot (holding those checkpoints), actors stopped, unfinished
    trials left resumable."""

    def __init__(self, stop_file: Path | None, grace_s: float = DEFAULT_STOP_GRACE_S):
        self.stop_file = stop_file
        self.grace_s = grace_s
        self.requested_at: float | None = None  # monotonic time of the first Ctrl-C
        self.announced = False
        self.loop_ended = False
        self.tune_loop_running = False
        self.answered: set[str] = set()  # Tune ids of trials that reported their stop
        self.reason = "Ctrl-C"

    # Tune pickles its callbacks with the experiment state and unpickles them when a sweep is
    # resumed: they come back as this launch's instance (a resumed sweep's old copy would
    # watch a stop file no trial of this launch knows of).
    def __reduce__(self):
        return (_active_graceful_stop, ())

    def activate(self) -> None:
        """Make this the instance that Tune's pickled copies unpickle as."""
        global _ACTIVE_STOP
        _ACTIVE_STOP = self

    def close(self) -> None:
        global _ACTIVE_STOP
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
        if _ACTIVE_STOP is self:
            _ACTIVE_STOP = None

    # -- the SIGINT handler: flags only (printing or file I/O here could re-enter a stream
    # the interrupted main thread was writing to); on_step_end does the rest
    def on_sigint(self, signum: int, frame) -> None:
        if self.requested_at is not None or not self.tune_loop_running:
            raise KeyboardInterrupt
        self.requested_at = time.monotonic()

    def request(self, reason: str) -> None:
        """Stop as a first Ctrl-C does, for `reason` (from any thread: the tracking writer
        when the store stays away)."""
        if self.requested_at is None:
            self.reason = reason
            self.requested_at = time.monotonic()

    # -- Tune's callbacks, on the driver's main thread
    def setup(self, **info) -> None:
        self.tune_loop_running = True

    def on_experiment_end(self, trials, **info) -> None:
        self.tune_loop_running = False

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(EVENT) == STOPPED:
            self.answered.add(trial.trial_id)

    def on_step_end(self, iteration, trials, **info) -> None:
        if self.requested_at is None or self.loop_ended:
            return
        waiting = [t for t in trials if t.status == "RUNNING" and t.trial_id not in self.answered]
        if not self.announced:
            self.announced = True
            if self.stop_file is not None:
                self.stop_file.touch()
            say(f"{self.reason}: {len(waiting)} running trial(s) save a checkpoint at their "
                f"current step, then the sweep stops (within {self.grace_s:g} s; Ctrl-C again "
                f"to stop at once)")
        if waiting and time.monotonic() - self.requested_at < self.grace_s:
            return
        if waiting:
            say(f"warning: {len(waiting)} trial(s) saved no checkpoint within "
                 f"{self.grace_s:g} s ({', '.join(str(t) for t in waiting)}); they will "
                 f"continue from their last one")
        self.loop_ended = True
        _end_tune_loop()


def _active_graceful_stop() -> GracefulStop:
    # outside a launch (a tool reading the experiment state): one that nothing will trigger
    return _ACTIVE_STOP or GracefulStop(None)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _end_tune_loop() -> None:
    """End Tune's loop as its own Ctrl-C handler would. Tune registers that handler for
    SIGUSR1 too (its SIGINT registration is off: TUNE_DISABLE_SIGINT_HANDLER); where it has
    none, stop at once."""
    handler = signal.getsignal(signal.SIGUSR1)
    if callable(handler) and getattr(handler, "__module__", "").startswith("ray.tune"):
        handler(signal.SIGUSR1, None)
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_interrupts() -> Iterator[None]:
    """A launch can be stopped (Ctrl-C, `podd-sweep stop`) from its first moment. A process
    started with SIGINT ignored, as bash starts a background job (`podd-sweep launch ... &`),
    gets no KeyboardInterrupt handler from Python, so a stop before Tune's loop (whose
    handler `ctrl_c_handled_by` installs) was lost and the sweep ran on (seen 2026-12-06)."""
    if (threading.current_thread() is not threading.main_thread()
            or callable(signal.getsignal(signal.SIGINT))):
        yield  # a handler is there already (Python's own, or the caller's)
        return
    saved = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


@contextlib.contextmanager
def ctrl_c_handled_by(stop: GracefulStop) -> Iterator[None]:
    """While Tune runs, SIGINT goes to `stop` instead of Tune (whose own handler is turned off
    by its documented TUNE_DISABLE_SIGINT_HANDLER); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers (nor can Tune set its own)
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, stop.on_sigint)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env


def seconds_from_env(name: str, default: float) -> float:
    """A duration from environment variable `name` (one error line when it is not a number)."""
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise SpecError(f"{name}: {value!r} is not a number of seconds") from None


def stop_grace_s() -> float:
    return seconds_from_env(STOP_GRACE_ENV, DEFAULT_STOP_GRACE_S)
