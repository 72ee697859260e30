"""Run a sweep's trials on Ray Tune: the driver (the Tuner, resume, the cluster address).

    sweep = load_sweep("sweeps/smoke.yaml", dataset_info=...)
    outcome = launch(sweep)                 # local Ray with this machine's cores
    outcome = launch(sweep, address="auto")  # an existing Ray cluster

Each trial is one `podd_engine.distill` call in a Ray worker (`orchestrator.trainable`). It
reports its loss every `log_every` outer steps and a checkpoint (`orchestrator.checkpoints`)
every `checkpoint_every` steps, and at the end a checkpoint holding the poster artifact. A
retried or resumed trial continues from its last checkpoint. The driver (this process) records
everything in MLflow through `orchestrator.tracking`.

A first Ctrl-C asks the running trials to save a checkpoint at their current step, then stops
the sweep (`orchestrator.interrupt.GracefulStop`); a second one stops at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.driver_lock import DriverLock
from orchestrator.faults import FAULTS_ENV, FaultPlan
from orchestrator.interrupt import (STOP_FILE_PREFIX, GracefulStop, ctrl_c_handled_by,
                                    ctrl_c_interrupts, say, stop_grace_s)
from orchestrator.protocol import DIVERGED, ERROR, EVAL, EVENT, FINAL, error_line, metrics_of
from orchestrator.spec_file import SpecError
from orchestrator.sweep import PlannedTrial, Sweep
from orchestrator.record_writer import RecordWriter
from orchestrator.store import check_tracking_server, prepare_sqlite_store
from orchestrator.tracking import RecordedSweep, SweepRecorder, TrackingCallback
from orchestrator.trainable import create_trainable
from podd_engine.errors import first_line

SWEEP_STATE = "podd_sweep.json"  # next to Tune's experiment state: what this sweep is


def trial_payload(trial: PlannedTrial, sweep: Sweep, stop_file: Path | None = None) -> dict:
    spec = sweep.spec
    config = trial.config
    # the driver's data locations travel with the trial (workers may start elsewhere)
    changes = {}
    for name, env in (("data_root", "PODD_DATA_ROOT"), ("cache_dir", "PODD_CACHE_DIR")):
        value = getattr(config, name) or os.environ.get(env)
        if value:
            changes[name] = str(Path(value).expanduser().resolve())
    config = config.replace(**changes)
    return {"key": trial.key, "name": trial.name, "config": config.to_dict(),
            "workdir": str(Path.cwd()), "threads": max(1, int(spec.resources.cpu)),
            # where Tune persists this trial's checkpoints (trial folders are named by trial)
            "trial_storage": str(sweep.storage_path() / sweep.name / trial.name),
            "log_every": spec.log_every, "checkpoint_every": spec.checkpoint_every,
            # exists once the driver asks running trials to stop (StopRequest)
            "stop_file": str(stop_file) if stop_file is not None else None}


class TrialNames(dict):
    """trial key -> readable name, for Tune's table and trial folders (picklable)."""

    def __call__(self, trial) -> str:
        return self[trial.config["trial"]]

    def keyed(self, results) -> list[tuple[str, Any]]:
        """Tune's results with their trial keys. A trial stopped before its first report (a
        Ctrl-C as the trials start) has no config in its result, which Tune reads back from
        what the trial wrote; its folder is named after it."""
        by_name = {name: key for key, name in self.items()}
        return [(result.config["trial"] if result.config else
                 by_name[Path(result.path).name], result) for result in results]


@dataclass
class SweepOutcome:
    sweep: str
    experiment_dir: Path
    tracking_uri: str
    parent_run_id: str | None
    resumed: bool
    states: dict[str, str] = field(default_factory=dict)  # trial name -> FINISHED|FAILED|...
    errors: dict[str, str] = field(default_factory=dict)  # trial name -> error line
    accuracy: dict[str, float] = field(default_factory=dict)  # trial name -> test accuracy
    tracking_gave_up: str | None = None  # why the record stopped (the store stayed away)
    search: dict | None = None  # a search's answer so far (orchestrator/search.py, compacted)
    tune_trials: dict[str, int] = field(default_factory=dict)  # trial key -> Tune trials of it

    @property
    def failed(self) -> list[str]:
        return [name for name, state in self.states.items() if state == "FAILED"]

    @property
    def unfinished(self) -> list[str]:
        return [name for name, state in self.states.items() if state == "UNFINISHED"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for state in self.states.values():
            out[state] += 1
        return dict(out)


# -- what a sweep of this name already is: its state file and its MLflow records

NEW_NAME = "give the changed sweep a new name"  # the one fix for a name that is taken


def write_sweep_state(sweep: Sweep, experiment_dir: Path, tracking_uri: str) -> None:
    """What a later launch checks before resuming (the same trials, the same MLflow store).
    Written atomically: a crash mid-write leaves the previous file or none, never half of one."""
    from podd_engine.fileio import atomic_write_text

    atomic_write_text(json.dumps({"fingerprint": sweep.fingerprint(), "tracking_uri": tracking_uri,
                                  "experiment": sweep.spec.experiment, "spec": sweep.source}),
                      experiment_dir / SWEEP_STATE)


def read_sweep_state(sweep: Sweep, path: Path) -> dict[str, str]:
    """The sweep state recorded at `path`; a SpecError (one line) when it cannot be read."""
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not all(isinstance(state.get(k), str)
                                                  for k in ("fingerprint", "tracking_uri")):
            raise ValueError("no fingerprint or tracking_uri in it")
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise SpecError(f"{sweep.source}: name: the state file of sweep {sweep.name!r}, {path}, "
                        f"is unreadable ({error_line(str(exc))}): if this spec is the one the sweep "
                        f"was started with, delete that file to resume it (it is written "
                        f"again); otherwise {NEW_NAME}") from None
    return state


def _check_resumable(sweep: Sweep, state: dict[str, str], tracking_uri: str) -> None:
    if state["fingerprint"] != sweep.fingerprint():
        raise SpecError(f"{sweep.source}: name: sweep {sweep.name!r} already exists in "
                        f"{sweep.storage_path()} with different trials; {NEW_NAME}")
    if state["tracking_uri"] != tracking_uri:
        raise SpecError(f"{sweep.source}: tracking_uri: sweep {sweep.name!r} is recorded in "
                        f"{state['tracking_uri']}; resume it with --tracking-uri "
                        f"{state['tracking_uri']} (or give the sweep a new name)")


def _check_resume_request(sweep: Sweep, experiment_dir: Path, resume: bool | None,
                          can_restore: bool) -> None:
    if resume is True and not can_restore:
        raise SpecError(f"{sweep.source}: name: there is no interrupted sweep {sweep.name!r} "
                        f"in {experiment_dir.parent} to resume; run without --resume to start it")
    if resume is False and can_restore:
        raise SpecError(f"{sweep.source}: name: sweep {sweep.name!r} already exists in "
                        f"{experiment_dir.parent}; resume it, or {NEW_NAME}")


def _check_recorded(sweep: Sweep, recorded: RecordedSweep | None, experiment_dir: Path,
                    ray_results_exist: bool, tracking_uri: str) -> None:
    """MLflow's record of a sweep of this name must be this sweep, resumed. Anything else would
    mix two sweeps in one parent run: trials whose key already has a FINISHED run are not
    recorded again (their new results would be dropped), reopened runs would mix two
    histories, and the parent's params (write-once) would describe the old spec."""
    if recorded is None:
        return
    where = f"MLflow ({tracking_uri}, experiment {sweep.spec.experiment})"
    if recorded.fingerprint is not None and recorded.fingerprint != sweep.fingerprint():
        raise SpecError(f"{sweep.source}: name: sweep {sweep.name!r} is already recorded in "
                        f"{where} with different trials; {NEW_NAME}")
    if not ray_results_exist and recorded.trial_runs:
        raise SpecError(f"{sweep.source}: name: sweep {sweep.name!r} is already recorded in "
                        f"{where} ({recorded.trial_runs} trial runs) but its Ray results "
                        f"({experiment_dir}) are gone, so it cannot be resumed and running it "
                        f"again would mix new results into those runs; give the sweep a new "
                        f"name")


def _open_recorder(sweep: Sweep, tracking_uri: str, experiment_dir: Path,
                   ray_results_exist: bool) -> SweepRecorder:
    """The sweep's MLflow recorder with its parent run open; a store that cannot be reached is
    one line naming it, not MLflow's traceback."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    recorder = SweepRecorder(tracking_uri, sweep.spec.experiment, sweep.name)
    try:
        _check_recorded(sweep, recorder.recorded_sweep(), experiment_dir, ray_results_exist,
                        tracking_uri)
        # the spec that runs: the file, or (with command-line overrides) the file's mapping
        # with them applied, headed by both
        recorder.open_sweep(spec_text=sweep.resolved_text(),
                            fingerprint=sweep.fingerprint(), trials=len(sweep.trials),
                            params={"spec": sweep.source, "storage": str(experiment_dir),
                                    **({"overrides": " ".join(sweep.overrides)}
                                       if sweep.overrides else {})})
    except MlflowException as exc:
        raise SpecError(f"{sweep.source}: tracking_uri: cannot record the sweep in MLflow at "
                        f"{tracking_uri}: {error_line(str(exc))}") from None
    except (SQLAlchemyError, sqlite3.Error) as exc:  # the store's own errors, as one line
        raise SpecError(f"{sweep.source}: tracking_uri: the MLflow store {tracking_uri} cannot "
                        f"be used: {first_line(exc)}: check the file, or point --tracking-uri "
                        f"at another store") from None
    return recorder


# -- Ray

def _start_ray(address: str | None, verbose: int) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); without either, start a local Ray with
    this machine's cores. ("local", not None: ray.init(address=None) would join a cluster
    that `ray start` left running on this machine.)"""
    import ray

    where = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        ray.init(address=where, include_dashboard=False, log_to_driver=verbose > 0,
                 configure_logging=verbose > 0)
    except Exception as exc:  # unreachable address, authentication, version mismatch
        hint = (" (a cluster with token authentication needs RAY_AUTH_MODE=token and its "
                "token in ~/.ray/auth_token or RAY_AUTH_TOKEN here)"
                if "auth" in str(exc).lower() else "")
        raise SpecError(f"--address: cannot join the Ray cluster at {where}: "
                        f"{error_line(str(exc))}{hint}") from None


# -- the sweep

def launch(sweep: Sweep, *, address: str | None = None, tracking_uri: str | None = None,
           resume: bool | None = None, verbose: int = 1) -> SweepOutcome:
    """Run (or resume) a sweep; returns what became of every trial.

    resume None: continue an interrupted sweep of the same name if there is one, else start;
    True: there must be one to continue; False: it is an error if one exists.
    A first Ctrl-C stops it gracefully (`GracefulStop`), a second raises KeyboardInterrupt;
    either way Ray, if this call started it, is shut down and no MLflow run is left RUNNING.
    A sweep another driver is running is refused (`SweepRunning`, one line).
    """
    uri = sweep.tracking_uri(tracking_uri)
    experiment_dir = sweep.storage_path() / sweep.name
    can_restore = tune.Tuner.can_restore(str(experiment_dir))
    _check_resume_request(sweep, experiment_dir, resume, can_restore)
    if (experiment_dir / SWEEP_STATE).exists():
        _check_resumable(sweep, read_sweep_state(sweep, experiment_dir / SWEEP_STATE), uri)
    ray_results_exist = experiment_dir.is_dir()
    check_tracking_server(uri)  # in seconds, before Ray starts
    lock = DriverLock(sweep.storage_path(), sweep.name)  # one driver per sweep
    lock.acquire()
    try:
        with ctrl_c_interrupts():
            return _run(sweep, address, uri, experiment_dir, can_restore, ray_results_exist,
                        verbose)
    finally:
        lock.release()


def _run(sweep: Sweep, address: str | None, uri: str, experiment_dir: Path, can_restore: bool,
         ray_results_exist: bool, verbose: int) -> SweepOutcome:
    import ray

    grace_s = stop_grace_s()

    if uri.startswith(("http://", "https://")):
        # the writer retries an unanswered store itself (record_writer), with its own
        # backoff and limit: MLflow's client should give up on a request within seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    # Tune snapshots its experiment state whenever a trial has written num_to_keep checkpoints
    # (that is what makes resume exact) and warns when short trials do so often: expected here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    owns_ray = not ray.is_initialized()
    recorder: SweepRecorder | None = None
    writer: RecordWriter | None = None
    stop = GracefulStop(experiment_dir / f"{STOP_FILE_PREFIX}{uuid.uuid4().hex[:12]}", grace_s)
    stop.activate()
    status = "KILLED"
    try:
        if owns_ray:
            _start_ray(address, verbose)
        _check_resources_fit(sweep, ray.nodes())
        prepare_sqlite_store(uri)  # created whole, or a half-created one said so
        recorder = _open_recorder(sweep, uri, experiment_dir, ray_results_exist)
        writer = RecordWriter(recorder, {t.key: t for t in sweep.trials}, experiment_dir,
                              on_give_up=stop.request)
        if replayed := writer.replay():  # what an earlier launch could not record
            say(f"recorded {replayed} event(s) an earlier launch of {sweep.name} had left")
        outcome = SweepOutcome(sweep.name, experiment_dir, uri, recorder.parent_id, can_restore)
        names = TrialNames({t.key: t.name for t in sweep.trials})
        tuner = _make_tuner(sweep, experiment_dir, uri, can_restore, names,
                            [TrackingCallback(writer), stop], verbose, writer)
        with ctrl_c_handled_by(stop):
            results = tuner.fit()
        keyed = names.keyed(results)
        _collect(outcome, keyed, names, searching=sweep.spec.search != "grid")
        if sweep.spec.search != "grid":
            from orchestrator.search_tune import search_summary
            outcome.search = search_summary(sweep, keyed)
        status = "FAILED" if outcome.failed else ("KILLED" if outcome.unfinished else "FINISHED")
    except BaseException:
        _wind_up(stop, recorder, writer, "KILLED", owns_ray, unwinding=True)
        raise
    finish(stop, recorder, writer, status, owns_ray)
    if writer is not None and writer.gave_up:
        outcome.tracking_gave_up = writer.gave_up
    return outcome


def _search(sweep: Sweep, writer: RecordWriter | None, trials: int) -> dict:
    """The TuneConfig fields of a `search: lowest-passing` sweep: the planner as Tune's
    searcher (at most every trial of the grid), early stopping as its scheduler."""
    from orchestrator.search_tune import EarlyStopAgainstBaseline, LowestPassingSearcher

    spec = sweep.spec
    searcher = LowestPassingSearcher(sweep.search_problems(), criterion=spec.criterion,
                                     parallel_probes=spec.parallel_probes, writer=writer)
    scheduler = (EarlyStopAgainstBaseline(searcher, spec.early_stop.margin_points / 100)
                 if spec.early_stop is not None else None)
    return {"search_alg": searcher, "scheduler": scheduler, "num_samples": trials}


def _make_tuner(sweep: Sweep, experiment_dir: Path, tracking_uri: str, can_restore: bool,
                names: TrialNames, callbacks: list, verbose: int,
                writer: RecordWriter | None = None):
    stop_file = next(c.stop_file for c in callbacks if isinstance(c, GracefulStop))
    # the grid is over trial keys (short in Tune's table); the configs travel by object store
    payloads = {t.key: trial_payload(t, sweep, stop_file) for t in sweep.trials}
    trainable = create_trainable(FaultPlan(os.environ.get(FAULTS_ENV)), payloads,
                                 {"cpu": sweep.spec.resources.cpu, "gpu": sweep.spec.resources.gpu})
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if not (experiment_dir / SWEEP_STATE).exists():  # a new sweep, or a state file deleted
        write_sweep_state(sweep, experiment_dir, tracking_uri)
    # Tune does not save the param space in tuner.pkl: a restore without it, of a driver
    # killed after tuner.pkl was written but before any trial was, generates one trial with
    # an empty config. Given again, it is used only where no searcher state was saved. A
    # search has none: its searcher (restored with its state) hands out the trials.
    searching = sweep.spec.search != "grid"
    param_space = {} if searching else {"trial": tune.grid_search(list(payloads))}
    search = _search(sweep, writer, len(payloads)) if searching else {}
    if can_restore:
        # the restored experiment brings back its pickled callbacks, which unpickle as the ones
        # of this launch (same sweep, same store: _check_resumable)
        return tune.Tuner.restore(str(experiment_dir), trainable, param_space=param_space,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        # a worker process runs trial after trial: torch and the engine are imported, and the
        # data set mapped, once per slot rather than once per trial
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.spec.max_concurrent,
                                    reuse_actors=True,
                                    trial_name_creator=names,
                                    trial_dirname_creator=names, **search),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(sweep.storage_path()),
            failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks, verbose=verbose))


def finish(stop: GracefulStop, recorder: SweepRecorder | None, writer: RecordWriter | None,
           status: str, owns_ray: bool) -> None:
    """The wind-up after Tune's loop, where a Ctrl-C (a second one, just after a first that
    stopped every trial at once) raises wherever it is: the runs are still closed, KILLED."""
    try:
        _wind_up(stop, recorder, writer, status, owns_ray, unwinding=False)
    except KeyboardInterrupt:
        _wind_up(stop, recorder, writer, "KILLED", owns_ray, unwinding=True)
        raise


def _wind_up(stop: GracefulStop, recorder: SweepRecorder | None, writer: RecordWriter | None,
             status: str, owns_ray: bool, *, unwinding: bool) -> None:
    """Record what is left, close the sweep's MLflow runs (none left RUNNING) and the Ray
    this launch started. While an error or a Ctrl-C is on its way out, a failure here is one
    warning line (the error to see is that one); an away store keeps its journal."""
    import ray

    stop.close()
    try:
        recorded = writer is None or writer.flush(timeout=None if not unwinding else 30)
        if writer is not None:
            writer.close()
        if recorder is not None and recorder.parent_id is not None and recorded:
            recorder.close_sweep(status)
        elif not recorded:
            why = writer.gave_up or "the MLflow store took too long to record the last events"
            say(f"warning: {why}; what is not recorded yet is kept beside the sweep "
                f"and recorded when the same command runs again")
    except Exception as exc:
        if not unwinding:
            raise
        say(f"warning: could not mark the sweep's MLflow runs {status}: "
            f"{error_line(str(exc))}")
    finally:
        if owns_ray:
            ray.shutdown()


def _check_resources_fit(sweep: Sweep, nodes: list[dict]) -> None:
    """A trial asking for more CPUs or GPUs than any node of the cluster has would wait
    forever: say so before the sweep starts."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    wanted = {"CPU": sweep.spec.resources.cpu, "GPU": sweep.spec.resources.gpu}
    for resource, amount in wanted.items():
        most = max((node.get(resource, 0.0) for node in alive), default=0.0)
        if amount > most:
            field_name = f"resources.{resource.lower()}"
            fix = ("set resources.gpu: 0 to run on CPUs, or join a cluster with GPUs "
                   "(--address)" if resource == "GPU" else
                   f"ask for at most {most:g}, or join a bigger cluster (--address)")
            raise SpecError(f"{sweep.source}: {field_name}: each trial asks for {amount:g} "
                            f"{resource}(s) but no node of the Ray cluster has more than "
                            f"{most:g}: {fix}")


def _collect(outcome: SweepOutcome, keyed: list[tuple[str, Any]], names: TrialNames,
             searching: bool = False) -> None:
    for key, result in keyed:
        name = names[key]
        outcome.tune_trials[key] = outcome.tune_trials.get(key, 0) + 1
        metrics = result.metrics or {}
        if result.error is not None:
            outcome.states[name] = "FAILED"
            outcome.errors[name] = error_line(str(result.error))
        elif metrics.get(EVENT) == DIVERGED:
            outcome.states[name] = "FAILED"
            outcome.errors[name] = str(metrics.get(ERROR))
        elif metrics.get(EVENT) == FINAL:
            outcome.states[name] = "FINISHED"
            if "test_accuracy" in metrics_of(metrics):
                outcome.accuracy[name] = metrics_of(metrics)["test_accuracy"]
        elif searching and metrics.get(EVENT) == EVAL:  # the scheduler ended it there
            outcome.states[name] = "STOPPED-EARLY"
        else:
            outcome.states[name] = "UNFINISHED"
