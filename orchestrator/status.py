"""Reading a sweep's records back from MLflow: which trials ran, how they ended, how well.

Used by `podd-sweep status`; reads only, and never creates a store that is not there.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.spec import DEFAULT_TRACKING_URI, absolute_tracking_uri
from orchestrator.tracking import ERROR_TAG, KEY_TAG, ROLE_TAG, SWEEP_TAG, search_all


def resolve_tracking_uri(override: str | None = None) -> str:
    return absolute_tracking_uri(override or os.environ.get("MLFLOW_TRACKING_URI")
                                 or DEFAULT_TRACKING_URI)


def open_store(tracking_uri: str | None, experiment: str):
    """(client, experiment id) of an existing store and experiment, else a ValueError that
    says what to do."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ValueError(f"no MLflow store at {uri.removeprefix('sqlite:///')}: run "
                         f"`podd-sweep launch SPEC` here first, or pass --tracking-uri")
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment {experiment!r} in {uri}: use --experiment with one of "
                         f"{', '.join(names) or '(none: the store is empty)'}")
    return client, found.experiment_id


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

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(t.status for t in self.trials)
        if self.planned > len(self.trials):
            counts["NOT STARTED"] = self.planned - len(self.trials)
        return dict(counts)


def sweep_status(tracking_uri: str | None, experiment: str,
                 sweep: str | None = None) -> list[SweepStatus]:
    client, experiment_id = open_store(tracking_uri, experiment)
    parents = search_all(client, experiment_id, f"tags.`{ROLE_TAG}` = 'sweep'")
    if sweep is not None:
        chosen = [p for p in parents if p.data.tags.get(SWEEP_TAG) == sweep]
        if not chosen:
            known = sorted(p.data.tags.get(SWEEP_TAG, "?") for p in parents)
            raise ValueError(f"no sweep {sweep!r} in experiment {experiment!r}: known sweeps are "
                             f"{', '.join(known) or '(none)'}")
        parents = chosen
    out = []
    for parent in parents:
        name = parent.data.tags[SWEEP_TAG]
        entry = SweepStatus(name, parent.info.status, int(parent.data.params.get("trials", 0)))
        for run in search_all(client, experiment_id, f"tags.`{SWEEP_TAG}` = '{name}' and "
                                                     f"tags.`{ROLE_TAG}` = 'trial'"):
            history = client.get_metric_history(run.info.run_id, "test_accuracy")
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
            entry.trials.append(TrialStatus(
                run.info.run_name, run.data.tags.get(KEY_TAG, ""), run.info.status,
                max(steps + [m.step for m in history], default=0),
                max((m.value for m in history), default=None), run.data.tags.get(ERROR_TAG),
                run.info.run_id))
        entry.trials.sort(key=lambda t: t.name)
        out.append(entry)
    return out
