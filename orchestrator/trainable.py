"""The trainable: one PoDD trial in a Ray worker, its engine events turned into Tune reports
(`orchestrator.protocol`) and checkpoints (`orchestrator.checkpoints`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.checkpoints import (DamagedCheckpoint, final_report_from, read_checkpoint_state,
                                      scan_checkpoints, write_checkpoint)
from orchestrator.faults import FaultPlan
from orchestrator.interrupt import StopRequest
from orchestrator.protocol import (ARTIFACT_DIR, ATTEMPT, CHECKPOINT, DAMAGED_CHECKPOINTS,
                                   DIVERGED, ERROR, EVAL, FINAL, INFO, POSTER_PNG, SETUP, STEP,
                                   STOPPED, report)


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
            write_checkpoint(Path(folder), state, metrics[STEP],
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
        setup = report(SETUP, self.last_step, {"started_at_step": self.last_step}, **{INFO: info})
        if self.damaged:
            setup[DAMAGED_CHECKPOINTS] = "\n".join(d.line() for d in self.damaged)
        self._report(setup)
        if self.stop.requested():  # asked to stop while it was starting: nothing new to save
            self._report(report(STOPPED, self.last_step))
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
            event = STOPPED if stopping else CHECKPOINT if checkpoint else STEP
            logged = report(event, metrics.step, {
                "loss": statistics.fmean(m.loss for m in self.window),
                "real_accuracy": statistics.fmean(m.real_accuracy for m in self.window),
                "grad_norm": self.window[-1].grad_norm,
                "seconds_per_step": statistics.fmean(m.seconds for m in self.window)})
            self.window = []
            if checkpoint:
                self._report(logged, distiller.state_dict(), distiller.poster)
            else:
                self._report(logged)
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
            self._report(report(EVAL, step, _eval_metrics(result)))

    @property
    def final_step(self) -> int:
        from podd_engine.methods import get_method

        c = self.trial.config
        return get_method(c.method).final_step(c.steps)

    def finish(self, result) -> None:
        from ray import tune
        from podd_engine.pipeline import save_result

        with tempfile.TemporaryDirectory(prefix="podd-final-") as folder:
            folder = Path(folder)
            save_result(result, folder / ARTIFACT_DIR)
            shutil.copyfile(folder / ARTIFACT_DIR / "poster.png", folder / POSTER_PNG)
            write_checkpoint(folder, None, self.final_step, None)
            summary = json.loads((folder / ARTIFACT_DIR / "poster.json").read_text())
            final = report(FINAL, self.final_step, {
                **_eval_metrics(self.final_eval or result.evaluation),
                "trial_seconds": summary["metrics"].get("seconds", 0.0)})
            tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))


def _node_id() -> str:
    """The Ray node this trial runs on (which machine of a cluster)."""
    import ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker (an engine test)
        return "local"


def _eval_metrics(result) -> dict[str, float]:
    return {k: v for k, v in result.summary().items() if k.startswith("test_accuracy")}


def create_trainable(faults: FaultPlan, payloads: dict[str, dict], resources: dict):
    """What Tune runs: `run_trial` with the sweep's payloads and a trial's resources, whose
    restore survives a checkpoint that Tune's record names but storage no longer holds.

    Tune keeps a trial's newest `num_to_keep` checkpoints and deletes older ones as new ones
    come, while its record of the newest (the experiment snapshot) is written apart from that:
    a driver killed between the two leaves a record naming a deleted checkpoint, and Tune's own
    restore then fails the trial. Here such a restore is skipped instead, and `run_trial`
    resumes from the newest intact checkpoint in the trial's storage (`scan_checkpoints`),
    which is never older than the one the record named."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    # wrap_function keeps the function's name (run_trial): Tuner.restore checks it
    function_trainable = wrap_function(
        tune.with_parameters(make_trainable(faults), payloads=payloads))

    class RunTrial(function_trainable):
        def restore(self, checkpoint_path):
            checkpoint = getattr(checkpoint_path, "checkpoint", checkpoint_path)
            if isinstance(checkpoint, tune.Checkpoint) and not _on_storage(checkpoint):
                print(f"warning: Tune's record names checkpoint {checkpoint.path}, which is no "
                      f"longer in storage; the trial resumes from the newest one there",
                      file=sys.stderr)
                return None
            return super().restore(checkpoint_path)

    return tune.with_resources(RunTrial, resources)


def _on_storage(checkpoint) -> bool:
    from pyarrow.fs import FileType

    return checkpoint.filesystem.get_file_info(checkpoint.path).type != FileType.NotFound


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
        tune.report(report(ATTEMPT, 0, **{INFO: {"node_id": _node_id()}}))
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
                finished = final_report_from(Path(folder))
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
            tune.report(report(DIVERGED, session.last_step,
                               **{ERROR: f"diverged, stopped: {exc}"}))
            return
        session.finish(result)

    return run_trial
