"""The sweep's MLflow record, written in the background: Ray Tune's loop hands each event to
the writer and goes on, so trials keep running while the tracking store does not answer.

The writer applies the events in order through the `SweepRecorder` (whose writes are
idempotent: a metric step, a param, a poster picture is never recorded twice). When the store
does not answer it retries with backoff; if it stays away longer than
PODD_SWEEP_TRACKING_GRACE_S (default 600 s) the sweep is stopped the way a first Ctrl-C stops
it (trials checkpoint, exit 130). Every event is first appended to a journal beside the
sweep's Ray folder, and marked done once recorded, so what was not recorded (the store went
away, the driver was killed) is recorded by the next launch of the same sweep before anything
else: the record ends complete.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.interrupt import say, seconds_from_env
from orchestrator.protocol import ARTIFACT_DIR, POSTER_PNG
from podd_engine.errors import UserError, first_line

GRACE_ENV = "PODD_SWEEP_TRACKING_GRACE_S"
DEFAULT_GRACE_S = 600.0
BACKOFF_S = (1.0, 30.0)  # first wait, longest wait between retries
_TRANSIENT = ("connection", "max retries", "timed out", "timeout", "temporarily", "unavailable",
              "502", "503", "504", "database is locked", "bad gateway", "refused")


def grace_s() -> float:
    return seconds_from_env(GRACE_ENV, DEFAULT_GRACE_S)


def transient(error: BaseException) -> bool:
    """An error that says the store is away for now (worth retrying), not that the write is
    wrong."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in _TRANSIENT)


class RecordWriter:
    """Applies recorder events in a background thread, in order, with a journal."""

    def __init__(self, recorder, trials: dict, folder: Path,
                 on_give_up: Callable[[str], None], give_up_s: float | None = None):
        self.recorder = recorder
        self.trials = trials  # trial key -> PlannedTrial
        self.journal = folder / ".mlflow-journal.jsonl"
        self.spool = folder / ".mlflow-spool"
        self.on_give_up = on_give_up
        self.give_up_s = grace_s() if give_up_s is None else give_up_s
        self.gave_up: str | None = None  # why the writer stopped writing
        self._queue: queue.Queue = queue.Queue()
        self._seq = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        global _ACTIVE
        _ACTIVE = self

    # Tune pickles its callbacks with the experiment; the callback's writer unpickles as the
    # one this launch opened (a thread and a queue do not travel, nor should a second writer)
    def __reduce__(self):
        return (_active_writer, ())

    # -- the journal
    def _append(self, entry: dict) -> None:
        with self._lock, open(self.journal, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> list[dict]:
        """Events journaled but not marked recorded, in order."""
        if not self.journal.exists():
            return []
        events, done = [], set()
        for line in self.journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill: its event was never handed over
            if "done" in entry:
                done.add(entry["done"])
            else:
                events.append(entry)
        return [e for e in events if e["seq"] not in done]

    def replay(self) -> int:
        """Record, now, what an earlier launch of this sweep journaled but did not record (a
        store that stays away is one line: the next launch tries again)."""
        events = self.pending()
        for event in events:
            try:
                self._apply(event)
            except Exception as exc:
                raise UserError(f"the MLflow store {self.recorder.tracking_uri} cannot take "
                                f"the {len(events)} record(s) an earlier launch could not "
                                f"write ({first_line(exc)}): launch again once it answers") \
                    from None
        self._clear()
        self._seq = 0
        return len(events)

    def _clear(self) -> None:
        self.journal.unlink(missing_ok=True)
        shutil.rmtree(self.spool, ignore_errors=True)

    # -- events (called on Tune's loop thread: journal, queue, return)
    def submit(self, op: str, key: str, *args: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="podd-sweep-mlflow")
            self._thread.start()
        self._seq += 1
        event = {"seq": self._seq, "op": op, "key": key, "args": list(args)}
        self._append(event)
        self._queue.put(event)

    def checkpoint(self, key: str, folder: Path, step: int) -> None:
        """A checkpoint's picture and artifact, copied first: Tune may delete the folder
        before the writer gets to it."""
        copy = self.spool / f"{self._seq + 1}"
        copy.mkdir(parents=True, exist_ok=True)
        if (folder / POSTER_PNG).exists():
            shutil.copyfile(folder / POSTER_PNG, copy / POSTER_PNG)
        if (folder / ARTIFACT_DIR).is_dir():
            shutil.copytree(folder / ARTIFACT_DIR, copy / ARTIFACT_DIR, dirs_exist_ok=True)
        self.submit("trial_checkpoint", key, str(copy), step)

    # -- the writer thread
    def _apply(self, event: dict) -> None:
        op, key, args = event["op"], event["key"], event["args"]
        if op == "trial_started":
            self.recorder.trial_started(self.trials[key])
        elif op == "trial_checkpoint":
            folder, step = Path(args[0]), int(args[1])
            if folder.exists():
                self.recorder.trial_checkpoint(key, folder, step)
        else:
            getattr(self.recorder, op)(key, *args)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None or self.gave_up:
                    continue
                self._apply_with_retries(event)
            except Exception as exc:
                # the thread must outlive any one event (the journal could not be written, a
                # bug): a dead writer would leave every later event unrecorded and flush
                # waiting. The event stays pending in the journal: flush tries it once more.
                say(f"warning: the MLflow writer could not finish {event['op']} of trial "
                    f"{event['key']}: {first_line(exc)}")
            finally:
                self._queue.task_done()
            if event is None:
                return

    def _apply_with_retries(self, event: dict) -> None:
        away_since, wait = None, BACKOFF_S[0]
        while True:
            try:
                self._apply(event)
            except Exception as exc:
                if not transient(exc):
                    say(f"warning: could not record {event['op']} of trial {event['key']}: "
                        f"{first_line(exc)}")
                    break
                now = time.monotonic()
                if away_since is None:
                    away_since = now
                    say(f"warning: the MLflow store {self.recorder.tracking_uri} does not "
                        f"answer ({first_line(exc)}); retrying, the trials keep running")
                if now - away_since > self.give_up_s:
                    self.gave_up = (f"the MLflow store {self.recorder.tracking_uri} did not "
                                    f"answer for {self.give_up_s:g} s")
                    self.on_give_up(self.gave_up)
                    return  # left in the journal: the next launch records it
                time.sleep(wait)
                wait = min(wait * 2, BACKOFF_S[1])
                continue
            if away_since is not None:
                say(f"the MLflow store answers again after {time.monotonic() - away_since:.0f} s;"
                    f" catching up")
            break
        self._append({"done": event["seq"]})
        if event["op"] == "trial_checkpoint":
            shutil.rmtree(event["args"][0], ignore_errors=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is recorded (or the writer gave up); True when
        the journal is empty afterwards (and then removed)."""
        if self._thread is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._queue.unfinished_tasks and not self.gave_up \
                    and self._thread.is_alive():
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
        if not self.gave_up:
            # the queue is drained, so what is still pending was journaled but never queued
            # (a Ctrl-C landed between the two steps of submit, on Tune's loop thread) or the
            # writer could not finish it: this thread records it now
            for event in self.pending():
                self._apply_with_retries(event)
        if self.gave_up or self.pending():
            return False
        self._clear()
        return True

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None


_ACTIVE: RecordWriter | None = None


def _active_writer() -> RecordWriter | None:
    return _ACTIVE
