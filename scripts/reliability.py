"""Reliability drills for `podd-sweep launch`: each runs a real sweep of tiny trials (digits),
does something bad to it, checks that nothing computed was lost and nothing recorded twice,
and appends its result to docs/results/reliability.jsonl (docs/reliability.md explains them).

    python scripts/reliability.py killed-driver   # kill -9 the driver mid-sweep, run it again
    python scripts/reliability.py kill-anytime    # kill -9 it at five moments, each then rerun
    python scripts/reliability.py ctrl-c          # SIGINT mid-sweep, run it again
    python scripts/reliability.py crash           # an error, an OOM, NaN/inf posters, a NaN loss
    python scripts/reliability.py cluster         # ray start head + worker; kill the worker
    python scripts/reliability.py mlflow-server   # a tracking server + a headless browser
    python scripts/reliability.py server-outage   # the tracking server away 30 s, then for good
    python scripts/reliability.py load --trials 200

Every drill prints what it checked; the exit code is 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("PODD_RELIABILITY_RESULTS",
                              ROOT / "docs" / "results" / "reliability.jsonl"))
CLI = str(Path(sys.executable).with_name("podd-sweep"))

ENGINE = ("{width: 8, steps: %(steps)d, total_inner_steps: 4, window: 2, distill_batch: 16, "
          "real_batch: 64, real_chunk: 64, eval_models: 1, eval_steps: [%(eval_steps)d]}")


def write_spec(folder: Path, name: str, *, seeds: int = 2, ipcs=(0.5, 1.0), steps: int = 60,
               checkpoint_every: int = 10, extra: str = "", tracking_uri: str | None = None,
               cpu: float = 1, eval_steps: int = 20, max_failures: int = 1) -> Path:
    spec = folder / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\ndataset: digits\nmethod: podd\nipc: {list(ipcs)}\npatch_grid: 4x2\n"
        f"class_order: identity\nseeds: {list(range(seeds))}\n"
        f"settings: {ENGINE % {'steps': steps, 'eval_steps': eval_steps}}\n"
        f"resources: {{cpu: {cpu}}}\nmax_concurrent: 2\nmax_failures: {max_failures}\n"
        f"checkpoint_every: {checkpoint_every}\nlog_every: 5\nstorage: {folder / 'ray'}\n"
        f"tracking_uri: {tracking_uri or 'sqlite:///' + str(folder / 'mlflow.db')}\n" + extra)
    return spec


def start_launch(spec: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    log = open(spec.with_suffix(".log"), "ab")
    return subprocess.Popen([CLI, "launch", str(spec), "--quiet", *args], cwd=spec.parent,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)


def run_launch(spec: Path, *args: str, timeout: float = 900, env: dict | None = None) -> int:
    return start_launch(spec, *args, env=env).wait(timeout=timeout)


def client_for(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(uri)


def trial_runs(uri: str, sweep: str) -> list:
    client = client_for(uri)
    experiment = client.get_experiment_by_name("podd-sweep")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id],
                              f"tags.`podd.sweep` = '{sweep}' and tags.`podd.role` = 'trial'")


def loss_steps(uri: str, run) -> list[int]:
    return [m.step for m in client_for(uri).get_metric_history(run.info.run_id, "loss")]


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid`: a launch started with start_new_session and all it
    started (its local Ray too)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(predicate, timeout: float, what: str, poll: float = 1.0,
               launch: subprocess.Popen | None = None, spec: Path | None = None):
    """Poll until `predicate` holds; a `launch` that ends first fails at once, with its log's
    tail (a launch refused in one line must not look like a slow one)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if launch is not None and launch.poll() is not None:
            tail = spec.with_suffix(".log").read_text()[-600:] if spec else ""
            raise RuntimeError(f"launch exited with code {launch.returncode} while waiting for "
                               f"{what}: {tail}")
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Checks:
    def __init__(self, drill: str):
        self.drill = drill
        self.results: list[dict] = []
        self.facts: dict = {}

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))

    def record(self, command: str) -> bool:
        passed = all(r["ok"] for r in self.results)
        entry = {"drill": self.drill, "passed": passed,
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
                 "command": command, "facts": self.facts, "checks": self.results}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"{self.drill}: {'PASSED' if passed else 'FAILED'} -> {RESULTS}")
        return passed


def common_end_checks(checks: Checks, uri: str, sweep: str, expected_trials: int,
                      expect_status: str = "FINISHED") -> list:
    runs = trial_runs(uri, sweep)
    keys = [r.data.tags["podd.trial_key"] for r in runs]
    checks.check("one MLflow run per trial", len(runs) == expected_trials == len(set(keys)),
                 f"{len(runs)} runs, {len(set(keys))} keys, {expected_trials} trials")
    statuses = sorted({r.info.status for r in runs})
    why = {r.info.run_name: r.data.tags.get("podd.error", "") for r in runs
           if r.info.status != expect_status}  # a failing check says why
    checks.check(f"every run {expect_status}", statuses == [expect_status],
                 f"{statuses}" + (f"; {why}" if why else ""))
    duplicated = [r.info.run_name for r in runs
                  if len(loss_steps(uri, r)) != len(set(loss_steps(uri, r)))]
    checks.check("no metric step recorded twice", not duplicated, f"{duplicated}")
    return runs


# ----------------------------------------------------------------------------- drills

def drill_interrupt(kind: str) -> bool:
    """kill -9 (killed-driver) or SIGINT (ctrl-c) the driver while some trials are finished and
    others are mid-way, then run the same command again.

    ctrl-c also interrupts a launch while it starts, and stops the resumed launch with two
    quick Ctrl-Cs before the last launch finishes the sweep."""
    checks = Checks(kind)
    folder = Path(tempfile.mkdtemp(prefix=f"podd-{kind}-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # ctrl-c runs three launches after the start-up one: fewer trials keep it in CI time.
    # Its trials are as long as killed-driver's: the moment it waits for (one trial done,
    # another between steps 25 and steps - 30, read from MLflow, which the driver now writes
    # in the background) lasted about a second at 100 steps and was missed under load
    seeds, steps = (3, 150) if kind == "killed-driver" else (2, 300)
    spec = write_spec(folder, kind, seeds=seeds, steps=steps, checkpoint_every=10)
    if kind == "ctrl-c":
        interrupt_start_up(checks, spec)
        interrupt_as_tune_starts(checks, spec, uri)
    process = start_launch(spec)

    def midway():
        runs = trial_runs(uri, kind)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        # past step 25 and short of its last steps (not already evaluating its poster)
        running = [r for r in runs if r.info.status == "RUNNING" and
                   25 <= max(loss_steps(uri, r), default=0) <= steps - 30]
        return (finished, running) if finished and running else None

    finished, running = wait_until(midway, 600, "a finished trial and one mid-way",
                                   launch=process, spec=spec)
    before = {r.info.run_id: r.info.end_time for r in finished}
    if kind == "killed-driver":
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        checks.check("driver killed with SIGKILL", process.returncode == -signal.SIGKILL)
    else:
        interrupted = time.time()
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=300)
        checks.facts["stop_s"] = round(time.time() - interrupted, 1)
        checks.check("first Ctrl-C stops gracefully with exit code 130", code == 130,
                     f"exit code {code} after {checks.facts['stop_s']} s")
        check_stopped_runs(checks, uri, kind)
    steps_at_stop = {r.info.run_id: max(loss_steps(uri, r), default=0)
                     for r in trial_runs(uri, kind) if r.info.status != "FINISHED"}
    checks.facts["steps_at_stop"] = sorted(steps_at_stop.values())
    time.sleep(3)  # a killed driver's local Ray notices that it is gone
    if kind == "ctrl-c":
        interrupt_twice(checks, spec, uri, steps_at_stop)
    started = time.time()
    code = run_launch(spec)
    checks.facts["resume_wall_s"] = round(time.time() - started, 1)
    checks.check("the same command resumes and finishes (exit 0)", code == 0, f"exit code {code}")
    runs = common_end_checks(checks, uri, kind, 2 * seeds)
    by_id = {r.info.run_id: r for r in runs}
    checks.check("trials finished before the stop were not rerun",
                 all(by_id[i].info.end_time == t for i, t in before.items() if i in by_id),
                 f"{len(before)} finished before")
    client = client_for(uri)
    for run_id, step in steps_at_stop.items():
        starts = [m.step for m in client.get_metric_history(run_id, "started_at_step")]
        name = by_id[run_id].info.run_name
        if kind == "ctrl-c":
            # the first Ctrl-C made the trial save a checkpoint at the step it had reached
            # (and log its loss there): the resumed trial started exactly at that step
            checks.check(f"{name} resumed at the step where Ctrl-C stopped it",
                         step in starts, f"stopped at step {step}, (re)started at {starts}")
        else:
            resumed_from = max(starts, default=0)
            # at most one checkpoint interval (10) plus one logging interval (5) is redone
            checks.check(f"{name} resumed from its checkpoint",
                         step - resumed_from < 10 + 5 and (resumed_from > 0 or step < 10),
                         f"{step} steps logged at the stop, resumed at step {resumed_from}")
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record(f"python scripts/reliability.py {kind}")


def check_stopped_runs(checks: Checks, uri: str, sweep: str) -> None:
    """After a Ctrl-C: nothing RUNNING, the interrupted trial runs and the parent KILLED."""
    runs = trial_runs(uri, sweep)
    left_running = [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    checks.check("no run left RUNNING after Ctrl-C", not left_running, f"{left_running}")
    killed = [r.info.run_name for r in runs if r.info.status == "KILLED"]
    checks.check("interrupted runs marked KILLED", len(killed) >= 1, f"{len(killed)} KILLED")
    parent = client_for(uri).search_runs(
        [runs[0].info.experiment_id],
        f"tags.`podd.sweep` = '{sweep}' and tags.`podd.role` = 'sweep'")
    statuses = [p.info.status for p in parent]
    checks.check("the sweep's parent run marked KILLED", statuses == ["KILLED"], f"{statuses}")


def _log_since(log: Path, offset: int) -> str:
    """What a launch wrote to its log after `offset` bytes (st_size before it started: bytes,
    not characters; the tables before it hold multi-byte box-drawing characters)."""
    return log.read_bytes()[offset:].decode(errors="replace")


def _one_line_exit(log: str, says: str = "interrupted: stopped at once") -> tuple[bool, str]:
    """A launch stopped at once ends with one line saying so, and prints no traceback."""
    lines = [line for line in log.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last.startswith(says) and "Traceback" not in log, last


def interrupt_start_up(checks: Checks, spec: Path) -> None:
    """Ctrl-C while launch starts: once its local Ray's raylet is up, seconds before Tune's
    loop runs (a fixed delay would land after it on a faster machine, or in the imports on a
    slower one)."""
    log = spec.with_suffix(".log")
    offset = log.stat().st_size if log.exists() else 0
    process = start_launch(spec)
    wait_until(lambda: any("raylet" in command_of(pid) for pid in session_pids(process.pid)),
               120, "the launch's Ray to start", poll=0.05, launch=process, spec=spec)
    os.killpg(process.pid, signal.SIGINT)
    code = process.wait(timeout=120)
    ok, last = _one_line_exit(_log_since(log, offset))
    checks.check("Ctrl-C during start-up: exit 130, one line, no traceback", code == 130 and ok,
                 f"exit code {code}: {last!r}")


def interrupt_as_tune_starts(checks: Checks, spec: Path, uri: str) -> None:
    """Ctrl-C once Tune's loop has begun (this launch has written to its experiment folder)
    and before any trial has reported a step: trials that never reported come back from Tune
    without their config (seen 2026-12-06: the launch ended in a TypeError traceback)."""
    log = spec.with_suffix(".log")
    offset = log.stat().st_size if log.exists() else 0
    started = time.time()
    process = start_launch(spec)
    experiment = spec.parent / "ray" / spec.stem

    def tune_began() -> bool:
        return any(f.stat().st_mtime > started for f in experiment.glob("*") if f.exists())

    wait_until(tune_began, 120, "Tune's loop to begin", poll=0.05, launch=process, spec=spec)
    reported = sum(bool(loss_steps(uri, r)) for r in trial_runs(uri, spec.stem))
    os.killpg(process.pid, signal.SIGINT)
    code = process.wait(timeout=300)
    ok, last = _one_line_exit(_log_since(log, offset), says="interrupted:")
    checks.facts["trials_reporting_at_the_tune_start_ctrl_c"] = reported
    checks.check("Ctrl-C as Tune's loop begins: exit 130, one line, no traceback",
                 code == 130 and ok, f"exit code {code}: {last!r}")


def interrupt_twice(checks: Checks, spec: Path, uri: str, steps_at_stop: dict) -> None:
    """The resumed launch gets two Ctrl-Cs in quick succession: it stops at once."""
    log = spec.with_suffix(".log")
    offset = log.stat().st_size
    process = start_launch(spec)

    def resumed_and_going():
        return any(r.info.status == "RUNNING" and
                   max(loss_steps(uri, r), default=0) > steps_at_stop.get(r.info.run_id, 0) + 5
                   for r in trial_runs(uri, spec.stem))

    wait_until(resumed_and_going, 300, "a resumed trial 5 steps on", launch=process, spec=spec)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.2)
    interrupted = time.time()
    os.killpg(process.pid, signal.SIGINT)
    code = process.wait(timeout=120)
    checks.facts["second_ctrl_c_exit_s"] = round(time.time() - interrupted, 1)
    ok, last = _one_line_exit(_log_since(log, offset))
    checks.check("two Ctrl-Cs: exit 130 at once, one line, no traceback", code == 130 and ok,
                 f"exit code {code} {checks.facts['second_ctrl_c_exit_s']} s after the second: "
                 f"{last!r}")
    left_running = [r.info.run_name for r in trial_runs(uri, spec.stem)
                    if r.info.status == "RUNNING"]
    tail = " | ".join(_log_since(log, offset).strip().splitlines()[-4:])
    checks.check("no run left RUNNING after two Ctrl-Cs", not left_running,
                 f"{left_running}" + (f"; the launch's last lines: {tail}" if left_running else ""))
    time.sleep(3)


def drill_crash() -> bool:
    """An engine error (retried, recovers), an out-of-memory (retried, fails for good), and a
    NaN poster, an inf poster and a NaN loss (each stops its trial at once) in five trials; the
    sixth carries on."""
    checks = Checks("crash")
    folder = Path(tempfile.mkdtemp(prefix="podd-crash-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = write_spec(folder, "crash", seeds=3, steps=30)
    faults = folder / "faults.json"
    faults.write_text(json.dumps([
        {"trial": "ipc0.5-4x2-identity-fixed-s0", "step": 15, "kind": "error", "times": 1},
        {"trial": "ipc0.5-4x2-identity-fixed-s1", "step": 15, "kind": "oom", "times": 99},
        {"trial": "ipc1-4x2-identity-fixed-s0", "step": 12, "kind": "nan-poster", "times": 99},
        {"trial": "ipc1-4x2-identity-fixed-s1", "step": 12, "kind": "nan-loss", "times": 99},
        {"trial": "ipc0.5-4x2-identity-fixed-s2", "step": 12, "kind": "inf-poster", "times": 99}]))
    code = run_launch(spec, env={"PODD_SWEEP_FAULTS": str(faults)})
    log = spec.with_suffix(".log").read_text()
    checks.check("launch exits non-zero", code == 1, f"exit code {code}")
    checks.check("summary names what failed", "4 trial(s) failed" in log
                 and "injected out-of-memory" in log and "diverged, stopped" in log)
    runs = {r.info.run_name: r for r in trial_runs(uri, "crash")}
    by = {name.split("-")[2] + "-" + name.split("-")[-2]: r for name, r in runs.items()}
    error, oom, clean = by["ipc0.5-s0"], by["ipc0.5-s1"], by["ipc1-s2"]
    checks.check("engine error: retried from its checkpoint and finished",
                 error.info.status == "FINISHED" and error.data.tags.get("podd.retries") == "1"
                 and loss_steps(uri, error) == sorted(set(loss_steps(uri, error))),
                 f"{error.info.status}, retries {error.data.tags.get('podd.retries')}")
    checks.check("out-of-memory: retried max_failures times, then FAILED with the error",
                 oom.info.status == "FAILED" and oom.data.tags.get("podd.retries") == "1"
                 and "injected out-of-memory" in oom.data.tags.get("podd.error", ""),
                 oom.data.tags.get("podd.error", ""))
    for what, run, reason in (("NaN poster", by["ipc1-s0"], "not finite"),
                              ("NaN loss", by["ipc1-s1"], "(loss nan)"),
                              ("inf poster", by["ipc0.5-s2"], "not finite")):
        error_text = run.data.tags.get("podd.error", "")
        checks.check(f"{what}: stopped at once (no retry, no evaluation), FAILED with the reason",
                     run.info.status == "FAILED" and "podd.retries" not in run.data.tags
                     and error_text.startswith("diverged, stopped: outer step 13")
                     and reason in error_text and "test_accuracy" not in run.data.metrics,
                     error_text)
    checks.check("the other trial carried on", clean.info.status == "FINISHED")
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record("python scripts/reliability.py crash")


def drill_cluster() -> bool:
    """A head node and a worker node started with `ray start` (1 CPU each); the sweep runs on
    both; the worker is killed mid-sweep; its trials are rescheduled and finish."""
    checks = Checks("cluster")
    folder = Path(tempfile.mkdtemp(prefix="podd-cluster-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    # the cluster uses Ray's token authentication, as a user's would; `ray start` does not
    # make a token, so the drill writes its own (never the user's ~/.ray/auth_token) and
    # both nodes and the driver read it
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**os.environ, "RAY_ADDRESS": "", **auth}
    # both nodes keep their files (and so their processes' command lines) under the drill's
    # folder: the drill stops exactly its own cluster, never another Ray on the machine
    head = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=1",
                           f"--temp-dir={folder / 'head-tmp'}",
                           "--include-dashboard=false", "--disable-usage-stats"],
                          capture_output=True, text=True, env=env)
    checks.check("ray start --head", head.returncode == 0, head.stderr[-300:])
    address = f"127.0.0.1:{port}"
    worker_dir = folder / "worker-tmp"
    worker = subprocess.run([ray, "start", f"--address={address}", "--num-cpus=1",
                             f"--temp-dir={worker_dir}", "--disable-usage-stats"],
                            capture_output=True, text=True, env=env)
    checks.check("ray start --address (worker node)", worker.returncode == 0,
                 worker.stderr[-300:])
    try:
        steps = 120
        spec = write_spec(folder, "cluster", seeds=4, steps=steps, checkpoint_every=10,
                          max_failures=3)
        process = start_launch(spec, "--address", address, env=auth)
        # the worker node: its raylet (killed below) and its node id
        raylets = [p for p in _processes("raylet") if str(worker_dir) in p[1]]
        dead = {arg.split("=", 1)[1] for _, cmd in raylets for arg in cmd.split()
                if arg.startswith("--node_id=")}

        def on_worker_midway():
            """Trials on the worker node, RUNNING and mid-way by their recorded steps. MLflow
            is written in the background, so the record lags the trials: one recorded near its
            end may finish before the kill lands; one recorded mid-way cannot."""
            runs = trial_runs(uri, "cluster")
            nodes = {r.data.params["node_id"][:12] for r in runs if "node_id" in r.data.params}
            midway = {r.info.run_name for r in runs if r.info.status == "RUNNING"
                      and r.data.tags.get("podd.node_id") in dead
                      and 5 <= max(loss_steps(uri, r), default=0) <= steps // 2}
            return (nodes, midway) if len(nodes) >= 2 and midway else None

        nodes_seen, midway = wait_until(on_worker_midway, 300,
                                        "trials on two nodes, one mid-way on the worker",
                                        poll=0.3, launch=process, spec=spec)
        checks.check("trials placed on both nodes", len(nodes_seen) >= 2, f"{sorted(nodes_seen)}")
        # the node dies as a machine does: its raylet and every process it started (a trial's
        # worker left alive could still finish and report to the driver directly)
        doomed = _descendants({pid for pid, _ in raylets})
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        checks.check("worker node killed mid-sweep", bool(raylets),
                     f"{len(raylets)} raylet, {len(doomed) - len(raylets)} of its processes")
        code = process.wait(timeout=900)
        checks.check("the sweep completes (exit 0)", code == 0, f"exit code {code}")
        runs = common_end_checks(checks, uri, "cluster", 8)
        # launch --address joins the user's cluster and must leave it as it found it
        alive = subprocess.run([ray, "status", f"--address={address}"], capture_output=True,
                               text=True, env=env)
        checks.check("the user's cluster is still running after launch ends",
                     alive.returncode == 0, f"`ray status` exit {alive.returncode}"
                     + ("" if alive.returncode == 0 else f": {alive.stderr[-300:]}"))
        retried = [r for r in runs if "podd.retries" in r.data.tags]
        # every attempt's node, in order (tag podd.nodes; the node_id param keeps the first)
        attempts = {r.info.run_name: r.data.tags.get("podd.nodes", "").split() for r in retried}
        # an attempt that died before it reported (still starting) left no node: every
        # retried trial's last attempt must be on a live node, and every trial mid-way on the
        # dead node when it was killed must have been retried
        moved = [name for name, nodes in attempts.items() if nodes and nodes[-1] not in dead]
        stranded = [name for name in midway if name not in moved]
        checks.facts.update(nodes=sorted(nodes_seen), dead=[n[:12] for n in dead],
                            retried={name: [n[:12] for n in nodes]
                                     for name, nodes in attempts.items()})
        checks.check("the trials running on the dead node were rescheduled on the other node "
                     "and finished there",
                     len(dead) == 1 and bool(retried) and len(moved) == len(retried)
                     and not stranded,
                     f"{len(retried)} retried, {len(moved)} finished on a live node, "
                     f"{len(stranded)} of the {len(midway)} mid-way on the dead node not; "
                     f"dead {checks.facts['dead']}, "
                     f"attempts {checks.facts['retried']}")
    finally:
        _stop_processes_under(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record("python scripts/reliability.py cluster")


def _processes(name: str) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if name in cmd.split(" ")[0]:
                out.append((int(entry.name), cmd))
    return out


def _descendants(roots: set[int]) -> set[int]:
    """`roots` and every process below them."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the field after the command name, which may hold spaces and parentheses
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1]
                                              .split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _stop_processes_under(folder: Path) -> None:
    """SIGKILL the processes whose command line names `folder` (a drill's own Ray nodes: their
    GCS, raylets and helpers; their workers exit with their raylet). `ray stop` would stop
    every Ray of the machine, a user's running sweep included."""
    for pid, _ in [p for p in _processes("") if str(folder) in p[1]]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drill_mlflow_server(screenshots: Path) -> bool:
    """`mlflow server` (sqlite backend, served artifacts) on a loopback port; a sweep logs to it
    with --tracking-uri http://...; headless Chromium opens the UI, the sweep's runs, the
    compare view and a poster image, and saves screenshots that must not be blank."""
    checks = Checks("mlflow-server")
    folder = Path(tempfile.mkdtemp(prefix="podd-server-"))
    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(folder / "server.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _http_ok(uri + "/health"), 120, "the MLflow server")
        spec = write_spec(folder, "served", seeds=1, steps=12, checkpoint_every=4)
        code = run_launch(spec, "--tracking-uri", uri)
        checks.check("sweep logged to the tracking server (exit 0)", code == 0, f"exit {code}")
        runs = common_end_checks(checks, uri, "served", 2)
        screenshots.mkdir(parents=True, exist_ok=True)
        shots = browse_ui(uri, runs, screenshots)
        for name, path in shots.items():
            checks.check(f"screenshot '{name}' is not blank", _not_blank(path), str(path))
        checks.facts["screenshots"] = {k: str(v.relative_to(ROOT)) if v.is_relative_to(ROOT)
                                       else str(v) for k, v in shots.items()}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record("python scripts/reliability.py mlflow-server")


def _http_ok(url: str) -> bool:
    import urllib.request
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def browse_ui(uri: str, runs: list, folder: Path) -> dict[str, Path]:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver")
                                      or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    wait = WebDriverWait(driver, 60)
    experiment_id = runs[0].info.experiment_id
    shots = {}
    try:
        def shot(name: str, url: str, text: str) -> None:
            driver.get(url)
            shots[name] = folder / f"mlflow-{name}.png"
            try:
                wait.until(expected_conditions.presence_of_element_located(
                    (By.XPATH, f"//*[contains(text(), '{text}')]")))
                time.sleep(2)  # let the page finish drawing
            finally:  # a screenshot either way: it shows what the page did instead
                driver.save_screenshot(str(shots[name]))

        shot("runs", f"{uri}/#/experiments/{experiment_id}/runs", "served")
        ids = json.dumps([r.info.run_id for r in runs])
        shot("compare", f"{uri}/#/compare-runs?runs={ids}&experiments=[\"{experiment_id}\"]",
             "achieved_ipc")
        run = runs[0]
        shot("poster", f"{uri}/#/experiments/{experiment_id}/runs/{run.info.run_id}"
                       f"/artifacts/poster.png", "poster.png")
    finally:
        driver.quit()
    return shots


def _not_blank(path: Path) -> bool:
    from PIL import Image, ImageStat
    with Image.open(path) as image:
        stat = ImageStat.Stat(image.convert("L"))
    return path.exists() and stat.stddev[0] > 5  # a blank page is one flat colour


def drill_load(trials: int) -> bool:
    """`trials` tiny trials, 2 at a time: every one recorded once, `report` works on them."""
    import resource
    checks = Checks("load")
    folder = Path(tempfile.mkdtemp(prefix="podd-load-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = write_spec(folder, "load", seeds=trials // 2, steps=2, checkpoint_every=2,
                      extra="include:\n  - {method: rat-bptt, ipc: 1, seeds: [0, 1]}\n")
    started = time.time()
    code = run_launch(spec, timeout=3600)
    wall = time.time() - started
    driver_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    checks.check("launch exits 0", code == 0, f"exit code {code}")
    runs = common_end_checks(checks, uri, "load", trials + 2)
    report = subprocess.run([CLI, "report", "--tracking-uri", uri, "--format", "json"],
                            capture_output=True, text=True, cwd=folder)
    verdict = json.loads(report.stdout)["datasets"][0]["verdict"] if report.stdout else {}
    checks.check("report works on it", report.returncode in (0, 1) and "message" in verdict,
                 verdict.get("message", report.stderr[-200:]))
    checks.facts.update(trials=len(runs), wall_s=round(wall, 1),
                        s_per_trial=round(wall / max(1, len(runs)), 2),
                        driver_peak_rss_gib=round(driver_rss, 2))
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record(f"python scripts/reliability.py load --trials {trials}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drill", choices=["killed-driver", "kill-anytime", "ctrl-c", "crash",
                                          "cluster", "mlflow-server", "server-outage", "load",
                                          "random-kills"])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--spec", type=Path, default=Path("sweeps/smoke.yaml"),
                        help="random-kills: the sweep to run (relative to the repository)")
    parser.add_argument("--kills", type=int, default=3, help="random-kills: how many")
    parser.add_argument("--seed", type=int, default=0, help="random-kills: the kill times")
    parser.add_argument("--screenshots", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    if args.drill in ("killed-driver", "ctrl-c"):
        ok = drill_interrupt(args.drill)
    elif args.drill == "kill-anytime":
        from reliability_kill import drill_kill_anytime

        ok = drill_kill_anytime()
    elif args.drill == "server-outage":
        from reliability_server import drill_server_outage

        ok = drill_server_outage()
    elif args.drill == "random-kills":
        from reliability_random_kills import drill_random_kills

        ok = drill_random_kills(args.spec, args.kills, args.seed)
    elif args.drill == "crash":
        ok = drill_crash()
    elif args.drill == "cluster":
        ok = drill_cluster()
    elif args.drill == "mlflow-server":
        ok = drill_mlflow_server(args.screenshots)
    else:
        ok = drill_load(args.trials)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
