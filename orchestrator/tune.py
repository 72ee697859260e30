"""Run a sweep's trials on Ray Tune: the trainable, the Tuner, resume, the cluster address.

    sweep = load_sweep("sweeps/smoke.yaml", dataset_info=...)
    outcome = launch(sweep)                 # local Ray with this machine's cores
    outcome = launch(sweep, address="auto")  # an existing Ray cluster

Each trial is one `podd_engine.distill` call in a Ray worker. It reports its loss every
`log_every` outer steps and a checkpoint (distiller state + the poster as a PNG) every
`checkpoint_every` steps, and at the end a checkpoint holding the poster artifact. A retried or
resumed trial continues from its last checkpoint. The driver (this process) records everything
in MLflow through `orchestrator.tracking`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import PlannedTrial, SpecError, Sweep
from orchestrator.tracking import (ARTIFACT_DIR, EVENT, INFO, POSTER_PNG, SweepRecorder,
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


def verify_checkpoint_state(folder: Path) -> bool:
    """False when the folder holds no state; raises when the state is damaged or unrecorded."""
    progress_path = folder / PROGRESS_FILE
    if not (folder / STATE_FILE).exists():
        return False
    if not progress_path.exists():
        raise RuntimeError(f"checkpoint {folder} has {STATE_FILE} but no {PROGRESS_FILE}: it "
                           f"was not written by podd-sweep or is incomplete")
    expected = json.loads(progress_path.read_text()).get("sha256")
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


@dataclass
class FaultPlan:
    """Faults injected into trials, for tests and reliability drills. The file named by the
    environment variable PODD_SWEEP_FAULTS (on the driver) holds a JSON list of
    {"trial": NAME-SUBSTRING, "step": N, "kind": error|oom|nan|exit, "times": K}: the K first
    times a matching trial reaches outer step N, it fails that way."""

    path: str | None = None

    def maybe_fail(self, trial_name: str, step: int, distiller=None) -> None:
        if not self.path or not Path(self.path).exists():
            return
        for index, fault in enumerate(json.loads(Path(self.path).read_text())):
            if fault.get("trial", "") not in trial_name or int(fault.get("step", 0)) != step:
                continue
            fired = Path(f"{self.path}.fired") / f"{index}-{trial_name}"
            fired.parent.mkdir(parents=True, exist_ok=True)
            count = int(fired.read_text()) if fired.exists() else 0
            if count >= int(fault.get("times", 1)):
                continue
            fired.write_text(str(count + 1))
            kind = fault.get("kind", "error")
            if kind == "nan" and distiller is not None:
                import torch
                with torch.no_grad():
                    distiller.poster.fill_(float("nan"))
            elif kind == "oom":
                import torch
                raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")
            elif kind == "exit":
                os._exit(17)  # the worker process dies, as when a node is lost
            else:
                raise RuntimeError(f"injected fault at step {step}")


class TrialSession:
    """Turns the engine's events into Tune reports and checkpoints."""

    def __init__(self, payload: dict, faults: FaultPlan):
        self.payload = payload
        self.name = payload["name"]
        self.faults = faults
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
        info["node_id"] = _node_id()
        self.faults.maybe_fail(self.name, 0)
        # started_at_step: 0 for a fresh trial, the checkpoint's step for a resumed one
        self._report({EVENT: "setup", "step": self.last_step, INFO: info,
                      "started_at_step": self.last_step})

    def step(self, metrics, distiller) -> None:
        self.last_step = metrics.step
        self.window.append(metrics)
        self.faults.maybe_fail(self.name, metrics.step, distiller)
        checkpoint = metrics.step % self.checkpoint_every == 0
        if len(self.window) >= self.log_every or checkpoint:
            report = {EVENT: "checkpoint" if checkpoint else "step", "step": metrics.step,
                      "loss": statistics.fmean(m.loss for m in self.window),
                      "real_accuracy": statistics.fmean(m.real_accuracy for m in self.window),
                      "grad_norm": self.window[-1].grad_norm,
                      "seconds_per_step": statistics.fmean(m.seconds for m in self.window)}
            self.window = []
            if checkpoint:
                self._report(report, distiller.state_dict(), distiller.poster)
            else:
                self._report(report)

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


def newest_checkpoint(trial_storage: Path) -> Path | None:
    """The trial's most advanced intact checkpoint in its storage folder.

    Tune restores a trial from the checkpoint its last experiment snapshot recorded; after a
    killed driver that can be a few checkpoints behind the newest one persisted, which would
    redo those steps. Every checkpoint records its step (and its state's sha256), so the newest
    intact one is found directly; damaged or half-copied ones are skipped."""
    best, best_step = None, -1
    for folder in sorted(trial_storage.glob("checkpoint_*")) if trial_storage.is_dir() else []:
        try:
            step = int(json.loads((folder / PROGRESS_FILE).read_text())["step"])
            if (folder / ARTIFACT_DIR / "poster.json").exists():
                step += 1  # the final checkpoint outranks a state saved at the same step
            else:
                verify_checkpoint_state(folder)  # raises when damaged (no need to load it)
        except Exception:
            continue
        if step > best_step:
            best, best_step = folder, step
    return best


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
        session = TrialSession(payload, faults)
        resume = None
        checkpoint = tune.get_checkpoint()
        # the newest intact checkpoint in storage can be newer than Tune's record of it
        newest = newest_checkpoint(Path(payload["trial_storage"]))
        with (contextlib.nullcontext(str(newest)) if newest is not None else
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

def trial_payload(trial: PlannedTrial, sweep: Sweep) -> dict:
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
            "log_every": spec.log_every, "checkpoint_every": spec.checkpoint_every}


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


def _check_resumable(sweep: Sweep, experiment_dir: Path, tracking_uri: str) -> None:
    state_path = experiment_dir / SWEEP_STATE
    if not state_path.exists():
        return
    state = json.loads(state_path.read_text())
    if state["fingerprint"] != sweep.fingerprint():
        raise SpecError(f"{sweep.source}: name: sweep {sweep.name!r} already exists in "
                        f"{experiment_dir.parent} with different trials; give the changed "
                        f"sweep a new name, or delete {experiment_dir} to start it over")
    if state["tracking_uri"] != tracking_uri:
        raise SpecError(f"{sweep.source}: tracking_uri: sweep {sweep.name!r} is recorded in "
                        f"{state['tracking_uri']}; resume it with --tracking-uri "
                        f"{state['tracking_uri']} (or give the sweep a new name)")


def launch(sweep: Sweep, *, address: str | None = None, tracking_uri: str | None = None,
           resume: bool | None = None, verbose: int = 1) -> SweepOutcome:
    """Run (or resume) a sweep; returns what became of every trial.

    resume None: continue an interrupted sweep of the same name if there is one, else start;
    True: there must be one to continue; False: it is an error if one exists.
    """
    import ray
    from ray import tune

    uri = sweep.tracking_uri(tracking_uri)
    experiment_dir = sweep.storage_path() / sweep.name
    can_restore = tune.Tuner.can_restore(str(experiment_dir))
    if resume is True and not can_restore:
        raise SpecError(f"{sweep.source}: name: there is no interrupted sweep {sweep.name!r} "
                        f"in {experiment_dir.parent} to resume; run without --resume to start it")
    if resume is False and can_restore:
        raise SpecError(f"{sweep.source}: name: sweep {sweep.name!r} already exists in "
                        f"{experiment_dir.parent}; resume it, or delete {experiment_dir}")
    if can_restore:
        _check_resumable(sweep, experiment_dir, uri)

    # Tune snapshots its experiment state whenever a trial has written num_to_keep checkpoints
    # (that is what makes resume exact) and warns when short trials do so often: expected here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started_ray = False
    if not ray.is_initialized():
        where = address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=where, include_dashboard=False, log_to_driver=verbose > 0,
                     configure_logging=verbose > 0)
        except Exception as exc:  # unreachable address, authentication, version mismatch
            hint = (" (a cluster with token authentication needs RAY_AUTH_MODE=token and its "
                    "token in ~/.ray/auth_token or RAY_AUTH_TOKEN here)"
                    if "auth" in str(exc).lower() else "")
            raise SpecError(f"--address: cannot join the Ray cluster at {where or 'local'}: "
                            f"{_first_line(exc)}{hint}") from None
        started_ray = True
    try:
        _check_resources_fit(sweep, ray.nodes())
    except SpecError:
        if started_ray:
            ray.shutdown()
        raise

    recorder = SweepRecorder(uri, sweep.spec.experiment, sweep.name)
    parent = recorder.open_sweep(spec_text=Path(sweep.source).read_text(),
                                 fingerprint=sweep.fingerprint(), trials=len(sweep.trials),
                                 params={"spec": sweep.source, "storage": str(experiment_dir)})
    # the grid is over trial keys (short in Tune's table); the configs travel by object store
    payloads = {t.key: trial_payload(t, sweep) for t in sweep.trials}
    trainable = tune.with_resources(
        tune.with_parameters(make_trainable(FaultPlan(os.environ.get(FAULTS_ENV))),
                             payloads=payloads),
        {"cpu": sweep.spec.resources.cpu, "gpu": sweep.spec.resources.gpu})
    names = TrialNames({t.key: t.name for t in sweep.trials})
    callback = TrackingCallback(recorder, sweep.trials)
    outcome = SweepOutcome(sweep.name, experiment_dir, uri, parent, can_restore)
    status = "KILLED"
    try:
        if can_restore:
            # the restored experiment brings back its pickled TrackingCallback, whose recorder
            # unpickles as the one opened above (same sweep, same store: _check_resumable)
            tuner = tune.Tuner.restore(str(experiment_dir), trainable,
                                       resume_unfinished=True, resume_errored=True)
        else:
            experiment_dir.mkdir(parents=True, exist_ok=True)
            (experiment_dir / SWEEP_STATE).write_text(json.dumps(
                {"fingerprint": sweep.fingerprint(), "tracking_uri": uri,
                 "experiment": sweep.spec.experiment, "spec": sweep.source}))
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(list(payloads))},
                # a worker process runs trial after trial: torch and the engine are imported,
                # and the data set mapped, once per slot rather than once per trial
                tune_config=tune.TuneConfig(max_concurrent_trials=sweep.spec.max_concurrent,
                                            reuse_actors=True,
                                            trial_name_creator=names,
                                            trial_dirname_creator=names),
                run_config=tune.RunConfig(
                    name=sweep.name, storage_path=str(sweep.storage_path()),
                    failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    callbacks=[callback], verbose=verbose))
        results = tuner.fit()
        _collect(outcome, results, names)
        status = "FAILED" if outcome.failed else ("KILLED" if outcome.unfinished else "FINISHED")
    finally:
        recorder.close_sweep(status)
        if started_ray:
            ray.shutdown()
    return outcome


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
