"""The kill drill (`python scripts/reliability.py kill-anytime`): the driver of a tiny sweep,
with its whole process group (its local Ray too), is killed with SIGKILL at each of the
moments a user may pick: while the new store is created, while Ray starts, mid-trial, during a
trial's final evaluation and during the wind-up. After every kill the same `launch` runs
again (and is killed at the next moment). After each kill no trial has two MLflow runs; the
record must end as if nothing happened: the last launch exits 0, one MLflow run per trial,
none RUNNING, no metric step twice, trials that had finished at any kill not rerun.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from reliability import (Checks, client_for, command_of, common_end_checks, loss_steps,
                         session_pids, start_launch, trial_runs, write_spec)

STEPS = 40
EVAL_STEPS = 400  # a final evaluation long enough to be caught in the act


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its session: the local Ray too)."""
    for pid in session_pids(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _wait(process: subprocess.Popen, moment, timeout: float) -> bool:
    """Poll until `moment()` is true (True), or the launch ended first (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if moment():
            return True
        time.sleep(0.1)
    raise TimeoutError("the moment never came")


def drill_kill_anytime() -> bool:
    checks = Checks("kill-anytime")
    folder = Path(tempfile.mkdtemp(prefix="podd-kill-"))
    store = folder / "mlflow.db"
    uri = f"sqlite:///{store}"
    name = "kill-anytime"
    spec = write_spec(folder, name, seeds=2, steps=STEPS, checkpoint_every=5,
                      eval_steps=EVAL_STEPS)

    def runs():
        return trial_runs(uri, name) if store.exists() else []

    def ray_processes(process) -> bool:
        return any("gcs_server" in command_of(pid) for pid in session_pids(process.pid))

    def mid_trial() -> bool:
        return any(10 <= max(loss_steps(uri, r), default=0) <= STEPS - 10 for r in runs())

    def final_evaluation() -> bool:
        return any(r.info.status == "RUNNING" and max(loss_steps(uri, r), default=0) == STEPS
                   for r in runs())

    def all_finished() -> bool:
        found = runs()
        return len(found) == 4 and all(r.info.status == "FINISHED" for r in found)

    moments = [  # in the order a first launch meets them: Ray, then the store, then trials
        ("ray-start", lambda p: ray_processes(p) and not runs()),
        ("store-creation", lambda p: bool(list(folder.glob(".mlflow.db.creating-*")))),
        ("mid-trial", lambda p: mid_trial()),
        ("final-evaluation", lambda p: final_evaluation()),
        ("wind-up", lambda p: all_finished()),
    ]
    finished_before: dict[str, int] = {}  # run id -> end time, of runs FINISHED at a kill
    hit = []
    for moment, reached in moments:
        process = start_launch(spec)
        if _wait(process, lambda: reached(process), 600):
            finished_before |= {r.info.run_id: r.info.end_time for r in runs()
                                if r.info.status == "FINISHED"}
            _kill_all(process)
            hit.append(moment)
            checks.check(f"killed during {moment}", True)
        else:
            log = spec.with_suffix(".log").read_text(errors="replace")
            checks.check(f"killed during {moment}", process.returncode == 0,
                         f"the launch ended first (exit {process.returncode}): not killed"
                         + (f"; its log ends: {log[-1500:]}" if process.returncode else ""))
        keys = [r.data.tags["podd.trial_key"] for r in runs()]
        checks.check(f"after the kill during {moment}: at most one MLflow run per trial",
                     len(keys) == len(set(keys)), f"{len(keys)} runs, {len(set(keys))} trials")
        time.sleep(1)
    checks.facts["moments_hit"] = hit
    started = time.time()
    process = start_launch(spec)
    code = process.wait(timeout=900)
    checks.facts["last_launch_s"] = round(time.time() - started, 1)
    log = spec.with_suffix(".log").read_text(errors="replace") if code else ""
    checks.check("the same command then finishes (exit 0)", code == 0,
                 f"exit code {code}" + (f"; its log ends: {log[-1500:]}" if code else ""))
    checks.check("at least four of the five moments were hit", len(hit) >= 4, f"{hit}")
    found = common_end_checks(checks, uri, name, 4)
    by_id = {r.info.run_id: r for r in found}
    checks.check("trials finished before any kill were not rerun (end times unchanged)",
                 all(i in by_id and by_id[i].info.end_time == t
                     for i, t in finished_before.items()), f"{len(finished_before)} finished")
    client = client_for(uri)
    parent = client.search_runs([client.get_experiment_by_name("podd-sweep").experiment_id],
                                f"tags.`podd.sweep` = '{name}' and tags.`podd.role` = 'sweep'")
    checks.check("one sweep run, FINISHED", [p.info.status for p in parent] == ["FINISHED"],
                 f"{[p.info.status for p in parent]}")
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".mlflow.db.creating")]
    checks.check("no half-created store left", not leftovers, f"{leftovers}")
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record("python scripts/reliability.py kill-anytime")
