"""What became of a trial of a search: finished with its test accuracy, stopped early by the
search's scheduler, failed (and whether the failure is the method's, which fails its
configuration, or the machinery's, which fails nothing), or not ended at all. One rule, asked
by the searcher as trials end and by the launch's summary from Tune's results at its end (both
in orchestrator/search_tune.py), so the two cannot disagree; the planner
(orchestrator/search.py) judges configurations on the outcomes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.protocol import DIVERGED, FINAL

FINISHED, STOPPED_EARLY, FAILED = "finished", "stopped-early", "failed"
# Why a trial ended without an accuracy, where the trial itself did not say.
CRASHED = "the trial failed (after its retries)"
NO_ACCURACY = "finished without a test accuracy"
NAN_ACCURACY = "finished with test accuracy NaN"


@dataclass(frozen=True)
class Outcome:
    """What became of a trial: its final test accuracy, or why it has none."""

    state: str  # FINISHED | STOPPED_EARLY | FAILED
    accuracy: float | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return {"state": self.state, "accuracy": self.accuracy, "reason": self.reason}

    @classmethod
    def from_dict(cls, values: Mapping) -> "Outcome":
        return cls(values["state"], values.get("accuracy"), values.get("reason", ""))

    @property
    def fails_configuration(self) -> bool:
        """Stopped early below the baseline's curve, diverged, or finished with a NaN test
        accuracy: the method failed that seed, and no other seed can rescue its configuration
        (the mean of the survivors would be the mean of the lucky ones; `report` judges it so
        too). A crash is the machinery's, and fails nothing."""
        return self.state == STOPPED_EARLY or (
            self.state == FAILED and self.reason.startswith((DIVERGED, NAN_ACCURACY)))


def outcome_of(event: str | None, accuracy: float | None, *, crashed: bool = False,
               error: str = "", stopped_early: str | None = None) -> Outcome | None:
    """What became of a trial, from the last event it reported (`event`, with its test
    `accuracy` and `error` line), whether Tune gave up on it (`crashed`), and why the search's
    scheduler stopped it (`stopped_early`, None if it did not). None: it has not ended (a
    Ctrl-C or `podd-sweep stop` ended it, and it resumes with the sweep). The searcher decides
    as it goes and the launch's summary at the end: both ask this."""
    if event == DIVERGED:  # first: the method's own failure, whatever Tune made of it after
        return Outcome(FAILED, reason=error or DIVERGED)
    if crashed:
        return Outcome(FAILED, reason=CRASHED)
    if event == FINAL:
        if accuracy is None:
            return Outcome(FAILED, reason=NO_ACCURACY)
        if math.isnan(accuracy):
            return Outcome(FAILED, reason=NAN_ACCURACY)
        return Outcome(FINISHED, accuracy)
    if stopped_early is not None:
        return Outcome(STOPPED_EARLY, reason=stopped_early)
    return None
