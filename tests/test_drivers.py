"""One driver per sweep: a second `launch` of a running sweep is refused with one line naming
the running one, and a driver killed with SIGKILL does not leave the sweep locked. Real
processes, real Ray, a real sqlite store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.driver_lock import STALE_S, DriverLock, SweepRunning

CLI = str(Path(sys.executable).with_name("podd-sweep"))


def spec(folder: Path, steps: int = 40) -> Path:
    path = folder / "two.yaml"
    path.write_text(f"name: two\ndataset: digits\nipc: [0.5, 1.0]\npatch_grid: 4x2\n"
                    f"class_order: identity\nseeds: [0]\nresources: {{cpu: 1}}\n"
                    f"settings: {{width: 8, steps: {steps}, total_inner_steps: 4, window: 2, "
                    f"distill_batch: 16, real_batch: 64, real_chunk: 64, eval_models: 1, "
                    f"eval_steps: [20]}}\ncheckpoint_every: 5\nmax_concurrent: 2\n"
                    f"storage: {folder / 'ray'}\ntracking_uri: sqlite:///{folder / 'mlflow.db'}\n")
    return path


def launch(path: Path) -> subprocess.Popen:
    return subprocess.Popen([CLI, "launch", str(path), "--quiet"], cwd=path.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_the_lock_is_taken_once_and_a_dead_holders_lock_is_free(tmp_path):
    first = DriverLock(tmp_path, "s")
    first.acquire()
    with pytest.raises(SweepRunning, match=rf"sweep s is already running \(process {os.getpid()}"):
        DriverLock(tmp_path, "s").acquire()
    lock = tmp_path / ".s.launch.lock"
    assert lock.exists()
    first.release()
    assert not lock.exists()
    # a lock left by a process that died (same host): free
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    held = {"token": "x", "host": socket.gethostname(), "pid": int(dead), "since": "then"}
    lock.write_text(json.dumps(held))
    again = DriverLock(tmp_path, "s")
    again.acquire()
    assert json.loads(lock.read_text())["token"] == again.token
    again.release()


def test_another_hosts_lock_is_free_only_once_its_holder_stopped_refreshing_it(tmp_path):
    """Another machine on the same storage: its process cannot be asked, so the lock's age
    tells (the holder refreshes it every REFRESH_S)."""
    lock = tmp_path / ".s.launch.lock"
    lock.write_text(json.dumps({"token": "x", "host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(SweepRunning, match="process 1 on elsewhere since then"):
        DriverLock(tmp_path, "s").acquire()
    old = time.time() - STALE_S - 5
    os.utime(lock, (old, old))
    taker = DriverLock(tmp_path, "s")
    taker.acquire()
    assert json.loads(lock.read_text())["token"] == taker.token
    taker.release()


def test_a_second_driver_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    path = spec(tmp_path)
    first = launch(path)
    lock = tmp_path / "ray" / ".two.launch.lock"
    wait_for(lock.exists, 120, "the first driver's lock")
    second = launch(path)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sweep two is already running "
                                                   f"(process {first.pid} on ")
    # the first one dies without cleaning up (SIGKILL, its whole process group)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert lock.exists()  # left behind, but its holder is gone
    third = launch(path)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, (out, err)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("podd-sweep").experiment_id],
                              "tags.`podd.role` = 'trial'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert not lock.exists()  # released at the end


def test_stop_asks_a_running_sweep_to_stop_gracefully_from_another_shell(tmp_path):
    path = spec(tmp_path, steps=1500)
    first = launch(path)
    wait_for(lambda: list((tmp_path / "ray" / "two").glob("*/checkpoint_*")), 300,
             "a first checkpoint")
    stop = subprocess.run([CLI, "stop", str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.startswith(f"asked sweep two (process {first.pid}) to stop")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, (out, err)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("podd-sweep").experiment_id],
                              "tags.`podd.role` = 'trial'")
    assert runs and {r.info.status for r in runs} <= {"KILLED", "FINISHED"}
    again = subprocess.run([CLI, "stop", "two", "--storage", str(tmp_path / "ray")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("error: sweep two is not running")


def test_a_background_launch_can_be_stopped_while_it_starts(tmp_path):
    """bash starts a background job (`podd-sweep launch ... &`) with SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler: `stop` (which sends SIGINT) before
    Tune's loop began was lost, and the sweep ran to its end."""
    path = spec(tmp_path, steps=400)
    first = subprocess.Popen([CLI, "launch", str(path), "--quiet"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(lambda: (tmp_path / "ray" / ".two.launch.lock").exists(), 120, "the driver lock")
    stop = subprocess.run([CLI, "stop", str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert stop.returncode == 0, stop.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, (out, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:") and "Traceback" not in err, err[-2000:]
