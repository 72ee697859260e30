"""Reading a sweep's records back from MLflow: which trials ran, how they ended, how well.

Used by `podd-sweep status`; reads only, and never creates a store that is not there.

MLflow keeps saying RUNNING for a sweep whose driver was SIGKILLed or whose machine went
down: nothing was left to close the runs. Where the sweep's storage folder is readable here,
its driver lock (orchestrator/driver_lock.py) tells: no live driver holds it, so the sweep
and its running trials show as INTERRUPTED, and launching the spec again resumes them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.driver_lock import running_driver
from orchestrator.store import (ERROR_TAG, KEY_TAG, SEARCH_TAG, STOPPED_EARLY_TAG, SWEEP_TAG,
                                run_records)
from podd_engine.errors import UserError

# a trial's progress: the furthest step logged, and its best test accuracy so far
PROGRESS_METRICS = ("loss", "test_accuracy")
INTERRUPTED = "INTERRUPTED"  # recorded as RUNNING, but no driver runs it any more


@dataclass
class TrialStatus:
    name: str
    key: str
    status: str
    step: int
    best_accuracy: float | None
    error: str | None
    run_id: str


@dataclass
class SweepStatus:
    name: str
    status: str
    planned: int
    trials: list[TrialStatus] = field(default_factory=list)
    search: dict | None = None  # a search's progress (orchestrator/search.py, compacted)
    resume: str = ""  # the launch command that resumes it, as it was launched

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(t.status for t in self.trials)
        if self.planned > len(self.trials):
            # a search runs only the trials it needs: the rest are not (yet) needed
            counts["NOT NEEDED" if self.search and self.search_done else "NOT STARTED"] = \
                self.planned - len(self.trials)
        return dict(counts)

    @property
    def search_done(self) -> bool:
        return bool(self.search) and all(s["done"] for s in self.search["searches"])

    def to_dict(self) -> dict:
        """For `status --json`: the sweep, its counts and every trial."""
        return {"sweep": self.name, "status": self.status, "resume": self.resume,
                "planned": self.planned,
                "counts": self.counts, "search": self.search,
                "trials": [dataclasses.asdict(t) for t in self.trials]}

    def highlights(self, best: int = 10) -> list[TrialStatus]:
        """What a long sweep's status shows: every trial that has not finished (running, failed,
        killed) and the `best` finished ones by test accuracy, in name order."""
        finished = [t for t in self.trials if t.status == "FINISHED"]
        top = sorted(finished, key=lambda t: -(t.best_accuracy or 0.0))[:best]
        keep = {id(t) for t in top} | {id(t) for t in self.trials if t.status != "FINISHED"}
        return [t for t in self.trials if id(t) in keep]


def driver_gone(parent) -> bool:
    """True when `parent` (a sweep's run) says RUNNING but its driver is known to be gone: its
    storage folder is readable on this machine and no live driver holds its lock. False
    when a driver runs it, or when the folder is elsewhere (another machine, cloud storage)
    and this machine cannot tell."""
    storage = parent.params.get("storage")  # the sweep's Ray folder, STORAGE/NAME
    if parent.status != "RUNNING" or not storage:
        return False
    folder = Path(storage).parent
    return folder.is_dir() and running_driver(folder, parent.tags[SWEEP_TAG]) is None


def resume_command(parent) -> str:
    """`podd-sweep launch SPEC OVERRIDES` as the sweep was launched (a relative spec path is
    the launching folder's)."""
    spec = parent.params.get("spec", "SPEC")
    return " ".join(filter(None, ["podd-sweep launch", shlex.quote(spec),
                                  parent.params.get("overrides")]))


def sweep_status(tracking_uri: str | None, experiment: str,
                 sweep: str | None = None) -> list[SweepStatus]:
    parents = run_records(tracking_uri, experiment, role="sweep")
    if sweep is not None:
        chosen = [p for p in parents if p.tags.get(SWEEP_TAG) == sweep]
        if not chosen:
            known = sorted(p.tags.get(SWEEP_TAG, "?") for p in parents)
            raise UserError(f"no sweep {sweep!r} in experiment {experiment!r}: known sweeps are "
                             f"{', '.join(known) or '(none)'}")
        parents = chosen
    out = []
    for parent in sorted(parents, key=lambda p: p.tags[SWEEP_TAG]):
        name = parent.tags[SWEEP_TAG]
        search = json.loads(parent.tags[SEARCH_TAG]) if SEARCH_TAG in parent.tags else None
        gone = driver_gone(parent)
        entry = SweepStatus(name, INTERRUPTED if gone else parent.status,
                            int(parent.params.get("trials", 0)), search=search,
                            resume=resume_command(parent))
        for run in run_records(tracking_uri, experiment, sweep=name, peaks=PROGRESS_METRICS):
            stopped = run.tags.get(STOPPED_EARLY_TAG)
            state = ("STOPPED-EARLY" if stopped else
                     INTERRUPTED if gone and run.status == "RUNNING" else run.status)
            entry.trials.append(TrialStatus(
                run.name, run.tags.get(KEY_TAG, ""), state,
                max((run.steps.get(k, 0) for k in PROGRESS_METRICS), default=0),
                run.peaks.get("test_accuracy"), stopped or run.tags.get(ERROR_TAG),
                run.run_id))
        entry.trials.sort(key=lambda t: t.name)
        out.append(entry)
    return out


def recorded_searches(tracking_uri: str | None, experiment: str,
                      sweeps: Sequence[str] = ()) -> list[dict]:
    """Every search recorded on the sweeps' parent runs (compacted, orchestrator/search.py),
    each with its sweep's name and criterion; only those of `sweeps` when named."""
    out = []
    for parent in run_records(tracking_uri, experiment, role="sweep"):
        name = parent.tags.get(SWEEP_TAG)
        if SEARCH_TAG not in parent.tags or (sweeps and name not in sweeps):
            continue
        recorded = json.loads(parent.tags[SEARCH_TAG])
        out += [{**search, "sweep": name, "criterion": recorded["criterion"]}
                for search in recorded["searches"]]
    return out
