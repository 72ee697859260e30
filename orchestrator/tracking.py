"""MLflow records of a sweep, written only by the Ray driver.

One parent run per sweep (tag `podd.sweep`, role `sweep`) and one child run per trial (tags
`podd.sweep` + `podd.trial_key`, the hash of the trial's engine config). A resumed sweep finds
both again by those tags instead of creating duplicates, and does not log a metric or a poster
image twice for a step it already recorded. Only this process writes to the store, so a sqlite
file is safe however many trials run at once.

`SweepRecorder` holds the MLflow logic and knows nothing of Ray; `TrackingCallback` adapts Ray
Tune's callback hooks to it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.protocol import (ARTIFACT_DIR, ATTEMPT, DAMAGED_CHECKPOINTS, DIVERGED, ERROR,
                                   EVENT, INFO, POSTER_PNG, STEP, error_line, metrics_of)
from orchestrator.sweep import PlannedTrial
from orchestrator.store import (ERROR_TAG, EXPERIMENT_KIND_TAG, KEY_TAG, PARENT_TAG, PROVENANCE,
                                PROVENANCE_HISTORY_TAG, ROLE_TAG, SEARCH_TAG, STOPPED_EARLY_TAG,
                                SWEEP_TAG, TERMINAL, artifact_location, runs_filter, search_all)


# Tags a trial run gets at every (re)start: params are write-once, and a retried trial can run
# on another node than its first attempt (the `node_id` param).
NODE_TAG = "podd.node_id"        # the node of the latest attempt
NODES_TAG = "podd.nodes"         # every attempt's node, in order, space-separated
DAMAGED_TAG = "podd.damaged_checkpoints"  # checkpoints skipped as damaged, and why


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's limit on a param value


@dataclass(frozen=True)
class RecordedSweep:
    """What MLflow already holds of a sweep of this name."""

    parent_run_id: str
    fingerprint: str | None  # of its set of trials (Sweep.fingerprint), as first recorded
    trial_runs: int


class SweepRecorder:
    """Parent and child runs of one sweep in one MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment: str, sweep: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self._client = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.runs: dict[str, str] = {}  # trial key -> run id
        self._last_step: dict[tuple[str, str], int] = {}  # (run, metric) -> last logged step
        self._params: dict[str, set[str]] = {}  # run -> param keys already logged
        self._nodes: dict[str, list[str]] = {}  # run -> the node of each attempt so far
        self.failed: dict[str, str] = {}  # trial key -> error line
        self.stopped_early: dict[str, str] = {}  # trial key -> why a search stopped it
        self.done: set[str] = set()  # trials whose runs had FINISHED before this process

    # Tune pickles its callbacks with the experiment and unpickles them when the sweep is
    # resumed: a recorder unpickles as the one this process opened for the same sweep, so a
    # resumed sweep still has exactly one writer with one view of its runs.
    def __reduce__(self):
        return (_recorder_for, (self.tracking_uri, self.experiment, self.sweep))

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # -- the sweep's parent run --
    def recorded_sweep(self) -> RecordedSweep | None:
        """The sweep of this name already in the store, if any (reads only)."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return None
        self.experiment_id = experiment.experiment_id
        found = self._search(runs_filter("sweep", self.sweep))
        if not found:
            return None
        trials = self._search(runs_filter("trial", self.sweep))
        return RecordedSweep(found[0].info.run_id, found[0].data.params.get("fingerprint"),
                             len(trials))

    def open_sweep(self, *, spec_text: str, fingerprint: str, trials: int,
                   params: dict[str, Any]) -> str:
        client = self.client
        experiment = client.get_experiment_by_name(self.experiment)
        self.experiment_id = (experiment.experiment_id if experiment is not None
                              else client.create_experiment(
                                  self.experiment,
                                  artifact_location=artifact_location(self.tracking_uri)))
        if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
            # MLflow 3's UI opens experiments of unknown kind on its GenAI trace views; these
            # are training runs, so it should open on the runs table
            client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG,
                                      "custom_model_development")
        found = self._search(runs_filter("sweep", self.sweep))
        if found:
            self.parent_id = found[0].info.run_id
            client.update_run(self.parent_id, status="RUNNING")
            for run in self._search(runs_filter("trial", self.sweep)):
                self.runs[run.data.tags[KEY_TAG]] = run.info.run_id
        else:
            run = client.create_run(self.experiment_id, run_name=self.sweep,
                                    tags={SWEEP_TAG: self.sweep, ROLE_TAG: "sweep"})
            self.parent_id = run.info.run_id
            client.log_text(self.parent_id, spec_text, "sweep.yaml")
        self._log_params(self.parent_id, {**params, "trials": trials,
                                          "fingerprint": fingerprint})
        _OPEN[(self.tracking_uri, self.experiment, self.sweep)] = self
        return self.parent_id

    def close_sweep(self, status: str) -> None:
        """End the parent run; any trial run still open is marked KILLED (an interrupted sweep
        leaves nothing RUNNING; a resumed one reopens them)."""
        for key, run_id in self.runs.items():
            if self.client.get_run(run_id).info.status not in TERMINAL:
                self.client.set_terminated(run_id, "KILLED")
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)
        _OPEN.pop((self.tracking_uri, self.experiment, self.sweep), None)

    # -- trial runs --
    def trial_started(self, trial: PlannedTrial) -> str:
        """The trial's run, reopened when it exists (a retry or a resumed sweep)."""
        run_id = self.runs.get(trial.key)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=trial.name,
                tags={SWEEP_TAG: self.sweep, ROLE_TAG: "trial", KEY_TAG: trial.key,
                      PARENT_TAG: self.parent_id, "podd.method": trial.config.method,
                      "podd.dataset": trial.config.dataset})
            run_id = self.runs[trial.key] = run.info.run_id
            self._nodes[run_id] = []
        elif self.client.get_run(run_id).info.status == "FINISHED":
            # a killed driver's last experiment snapshot can predate a trial's end, so the
            # resumed sweep replays the trial from its final checkpoint: its run stays as it was
            self.done.add(trial.key)
            return run_id
        else:  # a retry or a resumed sweep: the run is live again, its old error is history
            self.client.update_run(run_id, status="RUNNING")
            self.failed.pop(trial.key, None)
            tags = self.client.get_run(run_id).data.tags
            self._nodes[run_id] = tags.get(NODES_TAG, "").split()
            if ERROR_TAG in tags:
                self.client.set_tag(run_id, "podd.last_error", tags[ERROR_TAG])
                self.client.delete_tag(run_id, ERROR_TAG)
        config = trial.config.to_dict()
        self._log_params(run_id, {**{k: v for k, v in config.items() if v is not None},
                                  "trial_key": trial.key})
        return run_id

    def trial_result(self, key: str, result: dict) -> None:
        if key in self.done:
            return
        run_id = self.runs[key]
        if result.get(EVENT) == ATTEMPT:
            self._attempt_started(run_id, result.get(INFO, {}).get("node_id"))
        elif isinstance(result.get(INFO), dict):
            self._provenance_changes(run_id, result[INFO])
            self._log_params(run_id, result[INFO])
        if result.get(DAMAGED_CHECKPOINTS):
            self._damaged_checkpoints(run_id, str(result[DAMAGED_CHECKPOINTS]))
        self._log_metrics(run_id, metrics_of(result), int(result.get(STEP, 0)))
        if result.get(EVENT) == DIVERGED:
            self.failed[key] = str(result.get(ERROR, DIVERGED))

    def trial_checkpoint(self, key: str, folder: Path, step: int) -> None:
        if key in self.done:
            return
        run_id = self.runs[key]
        png = folder / POSTER_PNG
        if png.exists() and self._new_step(run_id, "poster", step):
            from PIL import Image
            with Image.open(png) as image:
                self.client.log_image(run_id, image.copy(), key="poster", step=step)
            self._logged(run_id, "poster", step)
        if (folder / ARTIFACT_DIR).is_dir():
            self.client.log_artifacts(run_id, str(folder / ARTIFACT_DIR), "poster_artifact")
            if png.exists():
                self.client.log_artifact(run_id, str(png))

    def trial_retried(self, key: str, error: str) -> None:
        if key in self.done:
            return
        run_id = self.runs[key]
        from mlflow.entities import RunTag

        retries = int(self.client.get_run(run_id).data.tags.get("podd.retries", 0)) + 1
        self.client.log_batch(run_id, tags=[RunTag("podd.retries", str(retries)),
                                            RunTag("podd.last_error", error[:5000])])

    def trial_stopped_early(self, key: str, reason: str) -> None:
        """A search stopped the trial (its last results are still to come, then its end)."""
        self.stopped_early[key] = reason

    def search_progress(self, _key: str, summary: dict) -> None:
        """A search's plan so far, on the sweep's parent run: a tag `status` reads, and the
        whole of it as search.json."""
        from orchestrator.search_record import progress_tag

        self.client.set_tag(self.parent_id, SEARCH_TAG, progress_tag(summary))
        self.client.log_text(self.parent_id, json.dumps(summary, indent=1), "search.json")

    def trial_finished(self, key: str, error: str | None = None,
                       error_detail: str | None = None) -> None:
        if key in self.done:
            return
        run_id = self.runs[key]
        if key in self.stopped_early and not error:
            # not a finished run of the schedule: KILLED, with the reason
            self.client.set_tag(run_id, STOPPED_EARLY_TAG, self.stopped_early[key][:5000])
            self.client.set_terminated(run_id, "KILLED")
            self.done.add(key)
            return
        error = error or self.failed.get(key)
        if error:
            self.failed[key] = error
            self.client.set_tag(run_id, ERROR_TAG, error[:5000])
            if error_detail:
                self.client.log_text(run_id, error_detail, "error.txt")
        self.client.set_terminated(run_id, "FAILED" if error else "FINISHED")

    # -- helpers --
    def _attempt_started(self, run_id: str, node_id: str | None) -> None:
        """Record the node of this attempt; the `node_id` param keeps the first one."""
        from mlflow.entities import Param, RunTag

        if not node_id:
            return
        if run_id not in self._nodes:
            self._nodes[run_id] = self.client.get_run(run_id).data.tags.get(NODES_TAG, "").split()
        nodes = self._nodes[run_id] + [node_id]  # kept once written (a retry must not add twice)
        if run_id not in self._params:
            self._params[run_id] = set(self.client.get_run(run_id).data.params)
        first = "node_id" not in self._params[run_id]
        # one write per attempt: a sweep of 200 short trials makes 200 of them
        self.client.log_batch(
            run_id, params=[Param("node_id", node_id)] if first else [],
            tags=[RunTag(NODE_TAG, node_id), RunTag(NODES_TAG, " ".join(nodes)[:5000])])
        self._nodes[run_id] = nodes
        self._params[run_id].add("node_id")

    def _damaged_checkpoints(self, run_id: str, lines: str) -> None:
        """A trial skipped damaged checkpoints when it chose where to resume: say so on the
        console and on its run (the checkpoint folders can be deleted or inspected)."""
        name = self.client.get_run(run_id).info.run_name
        for line in lines.splitlines():
            print(f"warning: trial {name}: skipped damaged checkpoint {line}", file=sys.stderr,
                  flush=True)
        self.client.set_tag(run_id, DAMAGED_TAG, lines[:5000])

    def _search(self, filter_string: str) -> list:
        return search_all(self.client, self.experiment_id, filter_string)

    def _provenance_changes(self, run_id: str, facts: dict[str, Any]) -> None:
        """An attempt that runs other code, torch, device or data than the run's earlier ones
        (a sweep resumed after a `git pull`, on a GPU, on another copy of the data): params
        are write-once and keep the first attempt's, so every value goes in order into a tag
        the report reads. An earlier attempt that logged its facts without these is ""."""
        if not any(key in facts for key in PROVENANCE):
            return
        run = self.client.get_run(run_id)
        recorded = run.data.params
        if "config_key" not in recorded:  # a fact only a built trial logs (Trial.summary)
            return  # the first attempt to log its facts: its params say it all
        history = json.loads(run.data.tags.get(PROVENANCE_HISTORY_TAG) or "{}")
        changed = False
        for key in PROVENANCE:
            if key in facts:
                values = history.get(key) or [recorded.get(key, "")]
                if values[-1] != str(facts[key]):
                    history[key], changed = values + [str(facts[key])], True
        if changed:
            self.client.set_tag(run_id, PROVENANCE_HISTORY_TAG, json.dumps(history)[:5000])

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if run_id not in self._params:
            self._params[run_id] = set(self.client.get_run(run_id).data.params)
        new = [Param(k, _param_value(v)) for k, v in params.items()
               if k not in self._params[run_id]]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=new[start:start + 100])
        self._params[run_id] |= {p.key for p in new}

    def _new_step(self, run_id: str, metric: str, step: int) -> bool:
        """False when `metric` was already logged at `step` or later (a resumed trial replays
        the steps after its last checkpoint). Only asks: `_logged` records the step once the
        write succeeded (a write retried after a failure must not find it taken)."""
        key = (run_id, metric)
        if key not in self._last_step:
            if metric == "poster":
                self._last_step[key] = -1
                artifacts = [a.path for a in self.client.list_artifacts(run_id, "images")]
                for path in artifacts:  # log_image names them images/poster+step+50+...
                    found = re.match(r"poster[+%]step[+%](\d+)[+%]", Path(path).name)
                    if found:
                        self._last_step[key] = max(self._last_step[key], int(found.group(1)))
            else:
                history = self.client.get_metric_history(run_id, metric)
                self._last_step[key] = max((m.step for m in history), default=-1)
        return step > self._last_step[key]

    def _logged(self, run_id: str, metric: str, step: int) -> None:
        self._last_step[(run_id, metric)] = step

    def _log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()
                   if self._new_step(run_id, k, step)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
            for metric in metrics:
                self._logged(run_id, metric.key, step)


_OPEN: dict[tuple[str, str, str], SweepRecorder] = {}


def _recorder_for(tracking_uri: str, experiment: str, sweep: str) -> SweepRecorder:
    return _OPEN.get((tracking_uri, experiment, sweep)) or SweepRecorder(tracking_uri, experiment,
                                                                          sweep)


class TrackingCallback(tune.Callback):
    """Ray Tune's hooks, handed to the sweep's `RecordWriter` (runs on the driver): Tune's
    loop never waits for MLflow."""

    def __init__(self, writer):
        self.writer = writer

    @staticmethod
    def _key(trial) -> str:
        return trial.config["trial"]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.writer.submit("trial_started", self._key(trial))

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.writer.submit("trial_result", self._key(trial), result)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        step = int((trial.last_result or {}).get(STEP, 0))
        with checkpoint.as_directory() as folder:
            self.writer.checkpoint(self._key(trial), Path(folder), step)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.writer.submit("trial_retried", self._key(trial), error_line(_error_text(trial)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.writer.submit("trial_finished", self._key(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        text = _error_text(trial)
        self.writer.submit("trial_finished", self._key(trial), error_line(text), text)


def _error_text(trial) -> str:
    """The trial's error trace. Tune appends it to the trial's local error file before calling
    the callbacks, and copies that file to the storage path only at its next sync, so the local
    file is read first (`trial.get_error()` reads storage and can still find nothing there)."""
    local = getattr(trial, "error_file", None)
    if local and Path(local).is_file():
        text = Path(local).read_text().strip()
        if text:
            return text
    try:
        error = trial.get_error()
    except Exception:  # storage unreachable (a lost node)
        error = None
    return str(error) if error else "the trial failed without a message"
