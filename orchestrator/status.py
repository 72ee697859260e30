"""Reading a sweep's records back from MLflow: which trials ran, how they ended, how well.

Used by `podd-sweep status`; reads only, and never creates a store that is not there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from orchestrator.store import ERROR_TAG, KEY_TAG, ROLE_TAG, SWEEP_TAG, open_store, search_all


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
