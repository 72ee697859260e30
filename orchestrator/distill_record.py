"""One `podd-sweep distill` recorded in MLflow as a sweep trial is: a run under the sweep
`distill` (one parent for every single distillation of the experiment), with the same params,
per-step metrics, poster pictures, final accuracies and artifact, so the MLflow UI, `status`
and `report` see it beside the sweeps' trials. Written in-process, without Ray.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path

from orchestrator.protocol import (ARTIFACT_DIR, FINAL, INFO, POSTER_PNG, STEP, error_line,
                                   report)
from orchestrator.sweep import PlannedTrial
from orchestrator.store import check_tracking_server, prepare_sqlite_store, resolve_tracking_uri
from orchestrator.tracking import SweepRecorder

SWEEP = "distill"
LOG_EVERY = 10  # outer steps between logged losses, as a sweep's default


class DistillRecord:
    """Open with the config before distilling; `step` per outer step, then `finish` with the
    result, or `fail` (an error) / `interrupted` (Ctrl-C): the run never stays RUNNING."""

    def __init__(self, tracking_uri: str | None, experiment: str, config):
        self.uri = resolve_tracking_uri(tracking_uri)
        check_tracking_server(self.uri)
        prepare_sqlite_store(self.uri)
        self.recorder = SweepRecorder(self.uri, experiment, SWEEP)
        self.recorder.open_sweep(spec_text=json.dumps(config.to_dict(), indent=1),
                                 fingerprint=SWEEP, trials=0, params={})
        self.trial = PlannedTrial(config, {})
        self.run_id = self.recorder.trial_started(self.trial)
        self.window: list = []

    def step(self, metrics) -> None:
        self.window.append(metrics)
        if len(self.window) >= LOG_EVERY:
            self.recorder.trial_result(self.trial.key, report(STEP, metrics.step, {
                "loss": statistics.fmean(m.loss for m in self.window),
                "real_accuracy": statistics.fmean(m.real_accuracy for m in self.window),
                "grad_norm": self.window[-1].grad_norm,
                "seconds_per_step": statistics.fmean(m.seconds for m in self.window)}))
            self.window = []

    def finish(self, result, final_step: int) -> None:
        from podd_engine.pipeline import save_result

        summary = result.summary()
        info = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                for k, v in summary.items() if not k.startswith("test_accuracy")}
        info["embedder_used"] = info.pop("order_embedder", None) or "none"
        metrics = {k: v for k, v in summary.items() if k.startswith("test_accuracy")}
        with tempfile.TemporaryDirectory(prefix="podd-record-") as folder:
            folder = Path(folder)
            save_result(result, folder / ARTIFACT_DIR)
            shutil.copyfile(folder / ARTIFACT_DIR / "poster.png", folder / POSTER_PNG)
            self.recorder.trial_checkpoint(self.trial.key, folder, final_step)
        self.recorder.trial_result(self.trial.key, report(FINAL, final_step, metrics,
                                                          **{INFO: info}))
        self.recorder.trial_finished(self.trial.key)
        self.recorder.close_sweep("FINISHED")

    def fail(self, error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}"
        self.recorder.trial_finished(self.trial.key, error_line(text), text)
        self.recorder.close_sweep("FAILED")

    def interrupted(self) -> None:
        self.recorder.close_sweep("KILLED")  # the open run is marked KILLED
