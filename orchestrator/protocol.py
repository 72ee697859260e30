"""What a trial tells the driver, through Ray Tune's reports: one home for the words both
sides use (the trainable writes them, the recorder and the Ctrl-C handler read them).

A report is a dict: `{EVENT: event, STEP: outer step, METRICS: {name: number}, ...}`. Every
number under METRICS is recorded in MLflow at that step (no list of known fields: a new
measurement is recorded the day a trial reports it). INFO carries facts about the trial once
it is built (logged as params), DAMAGED_CHECKPOINTS the checkpoints it had to skip, ERROR why
it stopped. Imports nothing heavy (no Ray, no torch).
"""

from __future__ import annotations

from typing import Any

EVENT = "podd_event"
ATTEMPT = "attempt"        # the first report of every attempt at a trial: where it runs
SETUP = "setup"            # the trial is built: INFO holds its facts
STEP = "step"              # the outer step a report is about (also the event of a logged step)
CHECKPOINT = "checkpoint"  # a logged step that carries a checkpoint
EVAL = "eval"              # an evaluation during distillation
FINAL = "final"            # the finished trial: final evaluation and artifact
DIVERGED = "diverged"      # the loss or poster became NaN/inf: stopped, not retried
STOPPED = "stopped"        # the answer to a stop request (Ctrl-C): a checkpoint at its step
EVENTS = (ATTEMPT, SETUP, STEP, CHECKPOINT, EVAL, FINAL, DIVERGED, STOPPED)

METRICS = "podd_metrics"   # {name: number}: every one is recorded at the report's step
INFO = "podd_info"         # trial facts known once the trial is built (logged as params)
DAMAGED_CHECKPOINTS = "podd_damaged_checkpoints"  # "FOLDER: REASON" per line
ERROR = "error"            # why a trial stopped (diverged)

POSTER_PNG = "poster.png"  # in a checkpoint: the poster as a picture
ARTIFACT_DIR = "artifact"  # in the final checkpoint: the poster artifact


def report(event: str, step: int, metrics: dict[str, float] | None = None,
           **fields: Any) -> dict[str, Any]:
    """A trial's report to the driver."""
    if event not in EVENTS:
        raise ValueError(f"unknown trial event {event!r}: one of {', '.join(EVENTS)}")
    return {EVENT: event, STEP: step, METRICS: dict(metrics or {}), **fields}


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The numbers a report carries (booleans are not measurements)."""
    values = result.get(METRICS) or {}
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def error_line(text: str) -> str:
    """The line of a traceback that says what went wrong (its last non-empty line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
