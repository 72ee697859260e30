"""The tracking-server outage drill (`python scripts/reliability.py server-outage`): a sweep
records to a real `mlflow server` (sqlite backend, loopback port) that goes away mid-sweep.

1. Away for half a minute, then back: the trials keep running meanwhile (their checkpoints keep
   coming), the driver retries, the launch ends with exit 0 and every run holds every logged
   step exactly once.
2. Away for longer than PODD_SWEEP_TRACKING_GRACE_S: the launch stops cleanly (trials
   checkpointed, exit 130, one warning line) and, once the server is back, the same command
   completes the record: every run FINISHED, every logged step exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reliability import (Checks, _http_ok, client_for, common_end_checks, free_port, loss_steps,
                         start_launch, trial_runs, wait_until, write_spec)

STEPS = 1500  # about 60 s a trial on 2 busy cores: under way through the outage
LOG_EVERY = 5
CHECKPOINT_EVERY = 100


class Server:
    """`mlflow server` on a loopback port over one sqlite file, stoppable and restartable."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        self.process = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_until(lambda: _http_ok(self.uri + "/health"), 180, "the MLflow server")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)


def _checkpoint_steps(folder: Path, name: str) -> int:
    """The furthest step any trial has checkpointed, read from Ray's storage (no MLflow)."""
    best = 0
    for progress in (folder / "ray" / name).glob("*/checkpoint_*/progress.json"):
        try:
            best = max(best, int(json.loads(progress.read_text())["step"]))
        except (ValueError, KeyError, OSError):
            continue
    return best


def _every_step_once(checks: Checks, uri: str, name: str) -> None:
    """Every trial's loss history covers each outer step exactly once: each point is the mean
    over the steps since the previous one, so its steps must rise, at most LOG_EVERY apart,
    up to the last step. (Not the multiples of LOG_EVERY: a trial stopped at step 1269 logs
    that step, and its resumed attempt logs 1274, 1279, ... until a checkpoint realigns it.)"""
    problems = []
    for run in trial_runs(uri, name):
        steps = loss_steps(uri, run)
        gaps = [b - a for a, b in zip([0] + steps, steps)]
        if not steps or steps[-1] != STEPS or min(gaps) < 1 or max(gaps) > LOG_EVERY:
            twice = sorted({s for s in steps if steps.count(s) > 1})
            holes = [(a, b) for a, b in zip([0] + steps, steps) if b - a > LOG_EVERY]
            problems.append(f"{run.info.run_name}: last step {steps[-1] if steps else None}, "
                            f"holes {holes[:5]}, twice {twice[:5]}")
    checks.check("every run's loss history covers each outer step exactly once", not problems,
                 "; ".join(problems))


def _outage(checks: Checks, folder: Path, server: Server, name: str, *, away_s: float,
            grace_s: float | None) -> None:
    spec = write_spec(folder, name, seeds=1, steps=STEPS, checkpoint_every=CHECKPOINT_EVERY)
    env = {"PODD_SWEEP_TRACKING_GRACE_S": str(grace_s)} if grace_s else {}
    process = start_launch(spec, "--tracking-uri", server.uri, env=env)
    wait_until(lambda: _checkpoint_steps(folder, name) >= CHECKPOINT_EVERY, 600,
               "trials under way")
    server.stop()
    stopped = time.time()
    before = _checkpoint_steps(folder, name)
    if grace_s is None:  # away for a while, then back
        time.sleep(away_s)
        during = _checkpoint_steps(folder, name)
        checks.check(f"{name}: trials kept running while the server was away",
                     during > before, f"checkpointed step {before} -> {during} in {away_s:g} s")
        server.start()
        code = process.wait(timeout=900)
        checks.check(f"{name}: the launch finishes once the server is back (exit 0)", code == 0,
                     f"exit code {code}")
    else:  # away for good: the launch stops cleanly, the next one completes the record
        code = process.wait(timeout=grace_s + 600)
        checks.facts[f"{name}_stop_s"] = round(time.time() - stopped, 1)
        checks.check(f"{name}: the launch stops with exit 130 when the server stays away",
                     code == 130, f"exit code {code} after {checks.facts[f'{name}_stop_s']} s")
        log = spec.with_suffix(".log").read_text()
        why = [line.strip() for line in log.splitlines() if "did not answer for" in line]
        checks.check(f"{name}: it says why", bool(why), why[-1] if why else log[-300:])
        at_stop = _checkpoint_steps(folder, name)
        server.start()
        code = start_launch(spec, "--tracking-uri", server.uri).wait(timeout=900)
        checks.check(f"{name}: the same command completes the record (exit 0)", code == 0,
                     f"exit code {code}")
        restarts = [m.value for r in trial_runs(server.uri, name) for m in
                    client_for(server.uri).get_metric_history(r.info.run_id, "started_at_step")]
        checks.check(f"{name}: the stopped trials resumed from their checkpoints, not step 0",
                     at_stop > 0 and max(restarts, default=0) > 0,
                     f"checkpointed step {at_stop} at the stop; restarts at {restarts}")
    common_end_checks(checks, server.uri, name, 2)
    _every_step_once(checks, server.uri, name)


def drill_server_outage() -> bool:
    checks = Checks("server-outage")
    folder = Path(tempfile.mkdtemp(prefix="podd-outage-"))
    server = Server(folder)
    server.start()
    try:
        _outage(checks, folder, server, "outage-away", away_s=30, grace_s=None)
        _outage(checks, folder, server, "outage-long", away_s=0, grace_s=20)
    finally:
        if server.process is not None and server.process.poll() is None:
            server.stop()
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record("python scripts/reliability.py server-outage")
