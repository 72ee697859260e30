"""Run a sweep's trials on Ray Tune: the trainable, the Tuner, resume, the cluster address.

    sweep = load_sweep("sweeps/smoke.yaml", dataset_info=...)
    outcome = launch(sweep)                 # local Ray with this machine's cores
    outcome = launch(sweep, address="auto")  # an existing Ray cluster

Each trial is one `podd_engine.distill` call in a Ray worker. It reports its loss every
`log_every` outer steps and a checkpoint (distiller state + the poster as a PNG) every
`checkpoint_every` steps, and at the end a checkpoint holding the poster artifact. A retried or
resumed trial continues from its last checkpoint. The driver (this process) records everything
in MLflow through `orchestrator.tracking`.

A first Ctrl-C asks the running trials to save a checkpoint at their current step, then stops
the sweep (`orchestrator.interrupt.GracefulStop`); a second one stops at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.interrupt import (STOP_FILE_PREFIX, GracefulStop, StopRequest,
                                    ctrl_c_handled_by, say, stop_grace_s)
from orchestrator.spec import PlannedTrial, SpecError, Sweep
from orchestrator.tracking import (ARTIFACT_DIR, ATTEMPT, DAMAGED_CHECKPOINTS, EVENT, INFO,
                                   POSTER_PNG, STOPPED, RecordedSweep, SweepRecorder,
                                   TrackingCallback, error_line)

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
SWEEP_STATE = "podd_sweep.json"  # next to Tune's experiment state: what this sweep is
FAULTS_ENV = "PODD_SWEEP_FAULTS"  # a JSON file of faults to inject (tests, docs/reliability.md)


# ----------------------------------------------------------------------------- the trainable

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(folder: Path, state: dict | None, step: int,
                     poster_png: bytes | None) -> None:
    """A trial checkpoint: the distiller state, its sha256 and step, and the poster picture."""
    from podd_engine.fileio import atomic_torch_save, atomic_write_bytes

    progress: dict[str, Any] = {"step": step}
    if state is not None:
        atomic_torch_save(state, folder / STATE_FILE)
        progress["sha256"] = _sha256(folder / STATE_FILE)
    if poster_png is not None:
        atomic_write_bytes(poster_png, folder / POSTER_PNG)
    atomic_write_bytes(json.dumps(progress).encode(), folder / PROGRESS_FILE)


def _read_progress(folder: Path) -> dict:
    """The checkpoint's progress record; ValueError when it is not valid JSON (a torn write)."""
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    if not isinstance(progress, dict):
        raise ValueError(f"{PROGRESS_FILE} is not a JSON object")
    return progress


def verify_checkpoint_state(folder: Path) -> bool:
    """False when the folder holds no state; raises when the state is damaged or unrecorded."""
    progress_path = folder / PROGRESS_FILE
    if not (folder / STATE_FILE).exists():
        return False
    if not progress_path.exists():
        raise RuntimeError(f"checkpoint {folder} has {STATE_FILE} but no {PROGRESS_FILE}: it "
                           f"was not written by podd-sweep or is incomplete")
    try:
        expected = _read_progress(folder).get("sha256")
    except ValueError:
        raise RuntimeError(f"checkpoint {progress_path} is not valid JSON (truncated?): delete "
                           f"that checkpoint folder to resume from the one before") from None
    if expected != _sha256(folder / STATE_FILE):
        raise RuntimeError(f"checkpoint {folder / STATE_FILE} is corrupt (sha256 mismatch): "
                           f"delete that checkpoint folder to resume from the one before")
    return True


def read_checkpoint_state(folder: Path) -> dict | None:
    """The distiller state saved in a checkpoint folder, after checking its checksum."""
    import torch

    if not verify_checkpoint_state(folder):
        return None
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)


# Fault kinds that damage the numbers of a running distillation: they need a distiller (step >= 1)
# and are found by the engine's own finiteness checks at the next outer step.
NUMERIC_FAULTS = ("nan", "nan-poster", "inf-poster", "nan-loss")
FAULT_KINDS = ("error", "oom", "exit", *NUMERIC_FAULTS)


@dataclass
class FaultPlan:
    """Faults injected into trials, for tests and reliability drills. The file named by the
    environment variable PODD_SWEEP_FAULTS (on the driver) holds a JSON list of
    {"trial": NAME-SUBSTRING, "step": N, "kind": KIND, "times": K}: the K first times a matching
    trial reaches outer step N, it fails that way. KIND: `error` (an engine exception), `oom`
    (torch.OutOfMemoryError), `exit` (the worker process dies), `nan-poster` (or `nan`) and
    `inf-poster` (the poster's pixels become NaN / +inf), `nan-loss` (the real-batch loss of
    the following steps is NaN)."""

    path: str | None = None

    def maybe_fail(self, trial_name: str, step: int, distiller=None) -> None:
        if not self.path or not Path(self.path).exists():
            return
        for index, fault in enumerate(json.loads(Path(self.path).read_text())):
            if fault.get("trial", "") not in trial_name or int(fault.get("step", 0)) != step:
                continue
            kind = fault.get("kind", "error")
            if kind not in FAULT_KINDS:
                raise ValueError(f"{self.path}: fault {index}: unknown kind {kind!r}; one of "
                                 f"{', '.join(FAULT_KINDS)}")
            if kind in NUMERIC_FAULTS and distiller is None:
                raise ValueError(f"{self.path}: fault {index}: kind {kind!r} needs a running "
                                 f"distillation: give a step of 1 or more")
            fired = Path(f"{self.path}.fired") / f"{index}-{trial_name}"
            fired.parent.mkdir(parents=True, exist_ok=True)
            count = int(fired.read_text()) if fired.exists() else 0
            if count >= int(fault.get("times", 1)):
                continue
            fired.write_text(str(count + 1))
            _inject(kind, step, distiller)


def _inject(kind: str, step: int, distiller) -> None:
    import torch

    if kind in ("nan", "nan-poster", "inf-poster"):
        with torch.no_grad():
            distiller.poster.fill_(float("inf") if kind == "inf-poster" else float("nan"))
    elif kind == "nan-loss":
        _poison_real_batches(distiller)
    elif kind == "oom":
        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")
    elif kind == "exit":
        os._exit(17)  # the worker process dies, as when a node is lost
    else:
        raise RuntimeError(f"injected fault at step {step}")


def _poison_real_batches(distiller) -> None:
    """From the next outer step on, the real images the poster is scored on are NaN, so the
    real-batch loss is NaN: what a diverged loss looks like to the engine. The engine's own
    check must catch it (nothing here raises). Replaces the batch source of this one distiller
    only: the data set's tensors, memory-mapped and shared, stay untouched."""
    import torch

    draw = distiller._real_batch

    def poisoned() -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = draw()
        return torch.full_like(images, float("nan")), labels

    distiller._real_batch = poisoned


class TrialSession:
    """Turns the engine's events into Tune reports and checkpoints."""

    def __init__(self, payload: dict, faults: FaultPlan, stop: StopRequest | None = None,
                 damaged: list[DamagedCheckpoint] | None = None):
        self.payload = payload
        self.name = payload["name"]
        self.faults = faults
        self.stop = stop or StopRequest(None)
        self.damaged = damaged or []  # checkpoints skipped when choosing where to resume
        self.log_every = int(payload["log_every"])
        self.checkpoint_every = int(payload["checkpoint_every"])
        self.trial = None
        self.window: list = []
        self.final_eval = None
        self.last_step = 0

    def _render(self, poster) -> bytes:
        from podd_engine.artifact import render_poster_png

        t = self.trial
        return render_poster_png(poster.detach().cpu(), t.geometry, t.preprocessing,
                                 t.ordering.grid, t.dataset.class_names)

    def _report(self, metrics: dict, state: dict | None = None, poster=None) -> None:
        from ray import tune

        if state is None and poster is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="podd-ckpt-") as folder:
            write_checkpoint(Path(folder), state, metrics["step"],
                             self._render(poster) if poster is not None else None)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def start(self, trial) -> None:
        self.trial = trial
        info = trial.summary()
        info["class_order"] = json.dumps(info["class_order"])
        # the text encoder PoCO actually used ("none" when the ordering needed none)
        info["embedder_used"] = info.pop("order_embedder", None) or "none"
        self.faults.maybe_fail(self.name, 0)
        # started_at_step: 0 for a fresh trial, the checkpoint's step for a resumed one
        setup = {EVENT: "setup", "step": self.last_step, INFO: info,
                 "started_at_step": self.last_step}
        if self.damaged:
            setup[DAMAGED_CHECKPOINTS] = "\n".join(d.line() for d in self.damaged)
        self._report(setup)
        if self.stop.requested():  # asked to stop while it was starting: nothing new to save
            self._report({EVENT: STOPPED, "step": self.last_step})
            self._wait_to_be_ended()

    def step(self, metrics, distiller) -> None:
        self.last_step = metrics.step
        self.window.append(metrics)
        self.faults.maybe_fail(self.name, metrics.step, distiller)
        # a stop request (Ctrl-C on the driver) is answered with a checkpoint of this step, so
        # the resumed trial redoes nothing; it also carries the losses not logged yet
        stopping = self.stop.requested()
        checkpoint = metrics.step % self.checkpoint_every == 0 or stopping
        if len(self.window) >= self.log_every or checkpoint:
            event = STOPPED if stopping else "checkpoint" if checkpoint else "step"
            report = {EVENT: event, "step": metrics.step,
                      "loss": statistics.fmean(m.loss for m in self.window),
                      "real_accuracy": statistics.fmean(m.real_accuracy for m in self.window),
                      "grad_norm": self.window[-1].grad_norm,
                      "seconds_per_step": statistics.fmean(m.seconds for m in self.window)}
            self.window = []
            if checkpoint:
                self._report(report, distiller.state_dict(), distiller.poster)
            else:
                self._report(report)
        if stopping:
            self._wait_to_be_ended()

    @staticmethod
    def _wait_to_be_ended() -> None:
        """After its stop report a trial must do nothing more until the driver ends Tune's loop
        and kills its actor: returning would make Tune count it finished, raising would make
        it count as failed (and retry it), and more steps would be work no one records."""
        while True:
            time.sleep(1.0)

    def evaluated(self, step: int, result) -> None:
        if step == self.final_step:
            self.final_eval = result  # reported with the final artifact
        else:
            self._report({EVENT: "eval", "step": step, **_eval_metrics(result)})

    @property
    def final_step(self) -> int:
        c = self.trial.config
        return c.steps if c.method != "random-real" else 0

    def finish(self, result) -> None:
        from ray import tune
        from podd_engine.pipeline import save_result

        with tempfile.TemporaryDirectory(prefix="podd-final-") as folder:
            folder = Path(folder)
            save_result(result, folder / ARTIFACT_DIR)
            shutil.copyfile(folder / ARTIFACT_DIR / "poster.png", folder / POSTER_PNG)
            write_checkpoint(folder, None, self.final_step, None)
            summary = json.loads((folder / ARTIFACT_DIR / "poster.json").read_text())
            metrics = {EVENT: "final", "step": self.final_step,
                       **_eval_metrics(self.final_eval or result.evaluation),
                       "trial_seconds": summary["metrics"].get("seconds", 0.0)}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _node_id() -> str:
    """The Ray node this trial runs on (which machine of a cluster)."""
    import ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker (an engine test)
        return "local"


def _eval_metrics(result) -> dict[str, float]:
    return {k: v for k, v in result.summary().items() if k.startswith("test_accuracy")}


@dataclass(frozen=True)
class DamagedCheckpoint:
    """A checkpoint folder that cannot be resumed from, and why."""

    folder: Path
    reason: str

    def line(self) -> str:
        return f"{self.folder}: {self.reason}"


@dataclass
class CheckpointScan:
    newest: Path | None = None  # the most advanced intact checkpoint
    damaged: list[DamagedCheckpoint] = field(default_factory=list)  # skipped, with the reason

    def is_damaged(self, folder: str | os.PathLike) -> bool:
        resolved = Path(folder).resolve()
        return any(d.folder.resolve() == resolved for d in self.damaged)


class _Damaged(Exception):
    """Why a checkpoint folder cannot be resumed from."""


def _resume_rank(folder: Path) -> int:
    """How far a checkpoint lets its trial get: its step, plus one for a final checkpoint (it
    outranks a state saved at the same step). Raises _Damaged with the reason."""
    if not (folder / PROGRESS_FILE).exists():
        raise _Damaged(f"no {PROGRESS_FILE} (an incomplete copy)")
    try:
        progress = _read_progress(folder)
        step = int(progress["step"])
    except (ValueError, KeyError, TypeError):
        raise _Damaged(f"{PROGRESS_FILE} is unreadable (truncated or not written by "
                       f"podd-sweep)") from None
    if (folder / ARTIFACT_DIR / "poster.json").exists():
        return step + 1
    if not (folder / STATE_FILE).exists():
        raise _Damaged(f"{PROGRESS_FILE} (step {step}) but no {STATE_FILE} (an incomplete copy)")
    if progress.get("sha256") != _sha256(folder / STATE_FILE):
        raise _Damaged(f"{STATE_FILE} does not match its sha256 (corrupt or truncated)")
    return step


def scan_checkpoints(trial_storage: Path) -> CheckpointScan:
    """The trial's most advanced intact checkpoint in its storage folder, and the damaged ones.

    Tune restores a trial from the checkpoint its last experiment snapshot recorded; after a
    killed driver that can be a few checkpoints behind the newest one persisted, which would
    redo those steps. Every checkpoint records its step (and its state's sha256), so the newest
    intact one is found directly. Damaged or half-copied ones are skipped and listed, so that
    the trial can report them (a warning and an MLflow tag, `orchestrator.tracking`)."""
    scan, best_step = CheckpointScan(), -1
    for folder in sorted(trial_storage.glob("checkpoint_*")) if trial_storage.is_dir() else []:
        try:
            step = _resume_rank(folder)
        except _Damaged as why:
            scan.damaged.append(DamagedCheckpoint(folder, str(why)))
            continue
        if step > best_step:
            scan.newest, best_step = folder, step
    return scan


def newest_checkpoint(trial_storage: Path) -> Path | None:
    """The trial's most advanced intact checkpoint (`scan_checkpoints`)."""
    return scan_checkpoints(trial_storage).newest


def _final_metrics_from(folder: Path) -> dict | None:
    """A checkpoint that already holds the final artifact: the trial had finished."""
    meta = folder / ARTIFACT_DIR / "poster.json"
    if not meta.exists():
        return None
    metrics = json.loads(meta.read_text())["metrics"]
    step = json.loads((folder / PROGRESS_FILE).read_text())["step"]
    # started_at_step = step: a trial replayed from its final checkpoint redoes no step
    return {EVENT: "final", "step": step, "trial_seconds": metrics.get("seconds", 0.0),
            "started_at_step": step,
            **{k: v for k, v in metrics.items() if k.startswith("test_accuracy")}}


def make_trainable(faults: FaultPlan):
    def run_trial(params: dict, payloads: dict[str, dict]) -> None:
        """One PoDD trial in a Ray worker: params["trial"] is its key."""
        import torch
        from ray import tune

        from podd_engine.config import TrialConfig
        from podd_engine.pipeline import distill
        from podd_engine.rat_bptt import NonFiniteError

        from podd_engine.allocator import tune_glibc_malloc

        tune_glibc_malloc()  # trials are long training loops (podd_engine/allocator.py)
        payload = payloads[params["trial"]]
        if Path(payload["workdir"]).is_dir():  # relative data paths mean the driver's folder
            os.chdir(payload["workdir"])
        torch.set_num_threads(max(1, int(payload["threads"])))
        config = TrialConfig.from_dict(payload["config"])
        # first of all, where this attempt runs: before the seconds of building the trial, in
        # which its node may die too (a retry may run elsewhere; every attempt is recorded)
        tune.report({EVENT: ATTEMPT, "step": 0, INFO: {"node_id": _node_id()}})
        # the newest intact checkpoint in storage can be newer than Tune's record of it;
        # Tune's own is used when storage holds none (a node that cannot see it) unless it is
        # one of the damaged ones
        scan = scan_checkpoints(Path(payload["trial_storage"]))
        session = TrialSession(payload, faults, StopRequest(payload.get("stop_file")),
                               scan.damaged)
        resume = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None and scan.is_damaged(checkpoint.path):
            checkpoint = None
        with (contextlib.nullcontext(str(scan.newest)) if scan.newest is not None else
              checkpoint.as_directory() if checkpoint is not None else
              contextlib.nullcontext(None)) as folder:
            if folder is not None:
                finished = _final_metrics_from(Path(folder))
                if finished is not None:  # it had finished: report it (and its artifact) again
                    with tempfile.TemporaryDirectory(prefix="podd-final-") as copy:
                        # a copy: Tune may number the new checkpoint like the one read here
                        shutil.copytree(folder, copy, dirs_exist_ok=True)
                        tune.report(finished, checkpoint=tune.Checkpoint.from_directory(copy))
                    return
                resume = read_checkpoint_state(Path(folder))
        session.last_step = int(resume["step"]) if resume else 0
        try:
            result = distill(config, on_start=session.start, on_step=session.step,
                             on_eval=session.evaluated, resume=resume)
        except NonFiniteError as exc:  # retrying would diverge again: stop with the reason
            tune.report({EVENT: "diverged", "step": session.last_step,
                         "error": f"diverged, stopped: {exc}"})
            return
        session.finish(result)

    return run_trial


# ----------------------------------------------------------------------------- the driver

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
                        f"is unreadable ({_first_line(exc)}): if this spec is the one the sweep "
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

    recorder = SweepRecorder(tracking_uri, sweep.spec.experiment, sweep.name)
    try:
        _check_recorded(sweep, recorder.recorded_sweep(), experiment_dir, ray_results_exist,
                        tracking_uri)
        recorder.open_sweep(spec_text=Path(sweep.source).read_text(),
                            fingerprint=sweep.fingerprint(), trials=len(sweep.trials),
                            params={"spec": sweep.source, "storage": str(experiment_dir)})
    except MlflowException as exc:
        raise SpecError(f"{sweep.source}: tracking_uri: cannot record the sweep in MLflow at "
                        f"{tracking_uri}: {_first_line(exc)}") from None
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
                        f"{_first_line(exc)}{hint}") from None


# -- the sweep

def launch(sweep: Sweep, *, address: str | None = None, tracking_uri: str | None = None,
           resume: bool | None = None, verbose: int = 1) -> SweepOutcome:
    """Run (or resume) a sweep; returns what became of every trial.

    resume None: continue an interrupted sweep of the same name if there is one, else start;
    True: there must be one to continue; False: it is an error if one exists.
    A first Ctrl-C stops it gracefully (`GracefulStop`), a second raises KeyboardInterrupt;
    either way Ray, if this call started it, is shut down and no MLflow run is left RUNNING.
    """
    import ray

    uri = sweep.tracking_uri(tracking_uri)
    experiment_dir = sweep.storage_path() / sweep.name
    can_restore = tune.Tuner.can_restore(str(experiment_dir))
    _check_resume_request(sweep, experiment_dir, resume, can_restore)
    if (experiment_dir / SWEEP_STATE).exists():
        _check_resumable(sweep, read_sweep_state(sweep, experiment_dir / SWEEP_STATE), uri)
    ray_results_exist = experiment_dir.is_dir()
    grace_s = stop_grace_s()

    # Tune snapshots its experiment state whenever a trial has written num_to_keep checkpoints
    # (that is what makes resume exact) and warns when short trials do so often: expected here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    owns_ray = not ray.is_initialized()
    recorder: SweepRecorder | None = None
    stop = GracefulStop(experiment_dir / f"{STOP_FILE_PREFIX}{uuid.uuid4().hex[:12]}", grace_s)
    stop.activate()
    status = "KILLED"
    try:
        if owns_ray:
            _start_ray(address, verbose)
        _check_resources_fit(sweep, ray.nodes())
        recorder = _open_recorder(sweep, uri, experiment_dir, ray_results_exist)
        outcome = SweepOutcome(sweep.name, experiment_dir, uri, recorder.parent_id, can_restore)
        names = TrialNames({t.key: t.name for t in sweep.trials})
        tuner = _make_tuner(sweep, experiment_dir, uri, can_restore, names,
                            [TrackingCallback(recorder, sweep.trials), stop], verbose)
        with ctrl_c_handled_by(stop):
            results = tuner.fit()
        _collect(outcome, results, names)
        status = "FAILED" if outcome.failed else ("KILLED" if outcome.unfinished else "FINISHED")
    except BaseException:
        _wind_up(stop, recorder, "KILLED", owns_ray, unwinding=True)
        raise
    _wind_up(stop, recorder, status, owns_ray, unwinding=False)
    return outcome


def _make_tuner(sweep: Sweep, experiment_dir: Path, tracking_uri: str, can_restore: bool,
                names: TrialNames, callbacks: list, verbose: int):
    stop_file = next(c.stop_file for c in callbacks if isinstance(c, GracefulStop))
    # the grid is over trial keys (short in Tune's table); the configs travel by object store
    payloads = {t.key: trial_payload(t, sweep, stop_file) for t in sweep.trials}
    trainable = tune.with_resources(
        tune.with_parameters(make_trainable(FaultPlan(os.environ.get(FAULTS_ENV))),
                             payloads=payloads),
        {"cpu": sweep.spec.resources.cpu, "gpu": sweep.spec.resources.gpu})
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if not (experiment_dir / SWEEP_STATE).exists():  # a new sweep, or a state file deleted
        write_sweep_state(sweep, experiment_dir, tracking_uri)
    if can_restore:
        # the restored experiment brings back its pickled callbacks, which unpickle as the ones
        # of this launch (same sweep, same store: _check_resumable)
        return tune.Tuner.restore(str(experiment_dir), trainable,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(payloads))},
        # a worker process runs trial after trial: torch and the engine are imported, and the
        # data set mapped, once per slot rather than once per trial
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.spec.max_concurrent,
                                    reuse_actors=True,
                                    trial_name_creator=names,
                                    trial_dirname_creator=names),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(sweep.storage_path()),
            failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks, verbose=verbose))


def _wind_up(stop: GracefulStop, recorder: SweepRecorder | None, status: str, owns_ray: bool,
             *, unwinding: bool) -> None:
    """Close the sweep's MLflow runs (none left RUNNING) and the Ray this launch started.
    While an error or a Ctrl-C is on its way out, a failure here is one warning line: the
    error the user must see is that one (and the next launch closes the runs anyway)."""
    import ray

    stop.close()
    try:
        if recorder is not None and recorder.parent_id is not None:
            recorder.close_sweep(status)
    except Exception as exc:
        if not unwinding:
            raise
        say(f"warning: could not mark the sweep's MLflow runs {status}: {_first_line(exc)}")
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


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _collect(outcome: SweepOutcome, results, names: TrialNames) -> None:
    for result in results:
        name = names[result.config["trial"]]
        metrics = result.metrics or {}
        if result.error is not None:
            outcome.states[name] = "FAILED"
            outcome.errors[name] = error_line(str(result.error))
        elif metrics.get(EVENT) == "diverged":
            outcome.states[name] = "FAILED"
            outcome.errors[name] = str(metrics.get("error"))
        elif metrics.get(EVENT) == "final":
            outcome.states[name] = "FINISHED"
            if "test_accuracy" in metrics:
                outcome.accuracy[name] = metrics["test_accuracy"]
        else:
            outcome.states[name] = "UNFINISHED"
