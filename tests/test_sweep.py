"""Real sweeps on Ray Tune (2 local CPUs) with tiny engine configs on digits, checked through
MLflow's client: records, resume without duplicates, retries and failures."""

import json
import os
import shutil
import socket
import sqlite3
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.sweep import load_sweep
from orchestrator.faults import FAULTS_ENV
from orchestrator.tune import SWEEP_STATE, launch, write_sweep_state
from podd_engine import fileio
from podd_engine.artifact import load_artifact
from podd_engine.data import create_dataset
from podd_engine.provenance import ENGINE_REVISION

pytestmark = pytest.mark.usefixtures("ray_local")
runner = CliRunner()

ENGINE = ("settings: {width: 8, steps: 6, total_inner_steps: 4, window: 2, distill_batch: 16, "
          "real_batch: 64, real_chunk: 64, eval_models: 1, eval_steps: [20]}\n")


def write_spec(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\ndataset: digits\nclass_order: identity\n"
                    f"patch_grid: 4x2\ncheckpoint_every: 3\nlog_every: 2\nmax_concurrent: 2\n"
                    f"storage: {folder / 'ray'}\ntracking_uri: sqlite:///{folder / 'mlflow.db'}\n"
                    + ENGINE + body)
    return path


def sweep_of(path: Path):
    return load_sweep(path, dataset_info=create_dataset)


def runs_of(folder: Path, sweep: str):
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("podd-sweep")
    runs = client.search_runs([experiment.experiment_id], f"tags.`podd.sweep` = '{sweep}'")
    parent = [r for r in runs if r.data.tags["podd.role"] == "sweep"]
    trials = {r.data.tags["podd.trial_key"]: r for r in runs if r.data.tags["podd.role"] == "trial"}
    return client, parent, trials


def steps(client, run, metric="loss"):
    return [m.step for m in client.get_metric_history(run.info.run_id, metric)]


def test_mini_sweep_end_to_end_is_recorded_in_mlflow(tmp_path):
    spec = write_spec(tmp_path, "mini", "ipc: [0.5, 1.0]\nseeds: [0]\n"
                                        "include:\n  - {method: rat-bptt, ipc: 1}\n")
    sweep = sweep_of(spec)
    outcome = launch(sweep, verbose=0)
    assert set(outcome.states.values()) == {"FINISHED"} and len(outcome.states) == 3

    client, parent, trials = runs_of(tmp_path, "mini")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.params["trials"] == "3"
    assert set(trials) == {t.key for t in sweep.trials}
    for trial in sweep.trials:
        run = trials[trial.key]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        params = run.data.params
        assert float(params["ipc"]) == trial.config.ipc
        assert abs(float(params["achieved_ipc"]) - trial.achieved_ipc) < 1e-3
        assert (int(params["poster_height"]), int(params["poster_width"])) == trial.poster_size
        assert params["embedder_used"] == "none" and params["width"] == "8"
        # where it came from (this checkout's commit), on what
        assert params["engine_revision"] == ENGINE_REVISION  # this checkout's code
        assert ENGINE_REVISION.startswith(f"{version('podd-sweep')}+code.")
        assert (params["device_used"], params["torch_version"]) == ("cpu", torch.__version__)
        # and which data: the decoded data set's content, however it was reached
        assert params["data_hash"] == create_dataset(trial.config.dataset).content_hash
        assert steps(client, run) == [2, 3, 5, 6]  # every log_every=2 steps and checkpoints
        accuracy = run.data.metrics["test_accuracy"]
        assert 0.0 <= accuracy <= 1.0 and "test_accuracy_std" in run.data.metrics
        # poster pictures as they evolve (checkpoints at steps 3 and 6) and the final artifact
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert sum(p.endswith(".png") for p in images) == 2
        folder = client.download_artifacts(run.info.run_id, "poster_artifact", str(tmp_path / run.info.run_id))
        artifact = load_artifact(folder)
        assert artifact.config.key() == trial.key
        assert abs(artifact.metadata["metrics"]["test_accuracy"] - accuracy) < 1e-9
    sweep_file = client.download_artifacts(parent[0].info.run_id, "sweep.yaml", str(tmp_path / "p"))
    assert Path(sweep_file).read_text() == spec.read_text()


def test_failing_trial_is_retried_then_recorded_failed(tmp_path, monkeypatch):
    faults = tmp_path / "faults.json"
    # ipc 1 fails once at step 4 (after its step-3 checkpoint) and recovers; ipc 0.5 always fails
    faults.write_text(json.dumps([
        {"trial": "podd-digits-ipc1-", "step": 4, "kind": "error", "times": 1},
        {"trial": "podd-digits-ipc0.5-", "step": 5, "kind": "oom", "times": 99}]))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    spec = write_spec(tmp_path, "faulty", "ipc: [0.5, 1.0]\nmax_failures: 1\n")
    result = runner.invoke(app, ["launch", str(spec), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "1 trial(s) failed" in result.stderr and "injected out-of-memory" in result.stderr

    client, parent, trials = runs_of(tmp_path, "faulty")
    assert parent[0].info.status == "FAILED"
    by_ipc = {float(r.data.params["ipc"]): r for r in trials.values()}
    recovered, failed = by_ipc[1.0], by_ipc[0.5]
    assert recovered.info.status == "FINISHED" and recovered.data.tags["podd.retries"] == "1"
    assert steps(client, recovered) == [2, 3, 5, 6]  # resumed from step 3, nothing twice
    assert failed.info.status == "FAILED"
    assert "injected out-of-memory at step 5" in failed.data.tags["podd.error"]
    assert failed.data.tags["podd.retries"] == "1"  # max_failures 1: one retry, then FAILED
    fired = (tmp_path / "faults.json.fired")
    assert (fired / "1-" f"{failed.info.run_name}").read_text() == "2"
    # each attempt's node is recorded (params are write-once: node_id keeps the first)
    for run in (recovered, failed):
        attempts = run.data.tags["podd.nodes"].split()
        assert len(attempts) == 2 and run.data.tags["podd.node_id"] == attempts[-1]
        assert run.data.params["node_id"] == attempts[0]


@pytest.mark.parametrize("kind, reason", [
    ("nan-poster", "not finite"),
    ("inf-poster", "not finite"),
    ("nan-loss", "the real-batch loss or the poster gradient is not finite (loss nan)")])
def test_diverging_trial_stops_with_the_reason_and_is_not_retried(tmp_path, monkeypatch, kind,
                                                                 reason):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"trial": "podd", "step": 2, "kind": kind, "times": 9}]))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    outcome = launch(sweep_of(write_spec(tmp_path, "nan", "ipc: 1.0\nmax_failures: 3\n")),
                     verbose=0)
    assert list(outcome.states.values()) == ["FAILED"]
    client, parent, trials = runs_of(tmp_path, "nan")
    (run,) = trials.values()
    # found by the engine at the next outer step, which it does not finish
    assert run.info.status == "FAILED"
    assert run.data.tags["podd.error"].startswith("diverged, stopped: outer step 3: ")
    assert reason in run.data.tags["podd.error"]
    assert "podd.retries" not in run.data.tags
    assert "test_accuracy" not in run.data.metrics  # stopped, no budget burnt on evaluation
    assert steps(client, run) == [2]


def test_resume_an_interrupted_sweep_without_duplicates(tmp_path, monkeypatch):
    faults = tmp_path / "faults.json"
    # first launch: the ipc-1 trial's worker dies at step 4 and may not retry (max_failures 0),
    # which leaves the sweep unfinished like a crash would
    faults.write_text(json.dumps([{"trial": "podd-digits-ipc1-", "step": 4, "kind": "exit"}]))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    spec = write_spec(tmp_path, "resumable", "ipc: [0.5, 1.0]\nmax_failures: 0\n")
    first = launch(sweep_of(spec), verbose=0)
    assert sorted(first.states.values()) == ["FAILED", "FINISHED"]
    client, _, before = runs_of(tmp_path, "resumable")
    done = next(r for r in before.values() if r.info.status == "FINISHED")

    second = launch(sweep_of(spec), verbose=0)  # the same command again
    assert second.resumed and set(second.states.values()) == {"FINISHED"}
    client, parent, after = runs_of(tmp_path, "resumable")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert set(after) == set(before)  # one run per trial, reused
    done_key = done.data.tags["podd.trial_key"]
    assert after[done_key].info.end_time == done.info.end_time  # not run again
    resumed = next(r for k, r in after.items() if k != done_key)
    assert resumed.info.status == "FINISHED" and steps(client, resumed) == [2, 3, 5, 6]
    assert "podd.error" not in resumed.data.tags
    assert len([a for a in client.list_artifacts(resumed.info.run_id, "images")
                if a.path.endswith(".png")]) == 2


def failed_after_one_checkpoint(folder: Path, name: str, monkeypatch) -> tuple[Path, Path]:
    """A one-trial sweep whose worker dies at step 4, after its step-3 checkpoint, and may not
    retry: the spec and that checkpoint, the one Tune's record names."""
    faults = folder / "faults.json"
    faults.write_text(json.dumps([{"trial": "podd", "step": 4, "kind": "exit"}]))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    spec = write_spec(folder, name, "ipc: 1.0\nmax_failures: 0\n")
    assert list(launch(sweep_of(spec), verbose=0).states.values()) == ["FAILED"]
    (checkpoint,) = (folder / "ray" / name).glob("*/checkpoint_*")
    return spec, checkpoint


def test_a_damaged_checkpoint_is_skipped_and_reported(tmp_path, monkeypatch, capsys):
    spec, checkpoint = failed_after_one_checkpoint(tmp_path, "damaged", monkeypatch)
    state = checkpoint / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk

    capsys.readouterr()
    again = launch(sweep_of(spec), verbose=0)  # Tune's record points at the damaged one
    assert list(again.states.values()) == ["FINISHED"]  # started over instead of failing
    warning = f"skipped damaged checkpoint {checkpoint}: state.pt does not match its sha256"
    assert warning in capsys.readouterr().err
    client, _, trials = runs_of(tmp_path, "damaged")
    (run,) = trials.values()
    assert run.data.tags["podd.damaged_checkpoints"].startswith(f"{checkpoint}: state.pt")
    assert steps(client, run) == [2, 3, 5, 6]


def test_a_checkpoint_pruned_after_tunes_last_snapshot_resumes_from_the_newest(
        tmp_path, monkeypatch):
    spec, recorded = failed_after_one_checkpoint(tmp_path, "pruned", monkeypatch)
    # what a driver killed at the wrong moment leaves: Tune's record names a checkpoint that
    # num_to_keep has since deleted, and storage holds a newer one the record never saw
    recorded.rename(recorded.with_name("checkpoint_000007"))

    again = launch(sweep_of(spec), verbose=0)
    assert list(again.states.values()) == ["FINISHED"]
    client, _, trials = runs_of(tmp_path, "pruned")
    (run,) = trials.values()
    assert steps(client, run) == [2, 3, 5, 6]  # resumed at step 3, nothing redone
    assert steps(client, run, "started_at_step") == [0, 3]


def test_changed_spec_under_the_same_name_is_refused(tmp_path):
    spec = write_spec(tmp_path, "same", "ipc: 1.0\n")
    launch(sweep_of(spec), verbose=0)
    spec.write_text(spec.read_text().replace("ipc: 1.0", "ipc: [0.5, 1.0]"))
    result = runner.invoke(app, ["launch", str(spec)])
    assert result.exit_code == 2
    assert "sweep 'same' already exists" in result.stderr and "new name" in result.stderr
    assert "delete" not in result.stderr  # deleting the Ray folder is no way to start over


def test_a_used_name_is_refused_when_its_ray_results_were_deleted(tmp_path):
    """Deleting a sweep's Ray folder does not make its name free: MLflow still holds its runs,
    which a new sweep of that name would be mixed into."""
    spec = write_spec(tmp_path, "reused", "ipc: 1.0\n")
    original = spec.read_text()
    launch(sweep_of(spec), verbose=0)
    _, (parent,), trials = runs_of(tmp_path, "reused")
    shutil.rmtree(tmp_path / "ray" / "reused")

    spec.write_text(original.replace("ipc: 1.0", "ipc: [0.5, 1.0]"))  # a changed sweep
    changed = runner.invoke(app, ["launch", str(spec), "--quiet"])
    assert changed.exit_code == 2, changed.output
    assert changed.stderr.count("\n") == 1 and "is already recorded in MLflow" in changed.stderr
    assert "with different trials; give the changed sweep a new name" in changed.stderr

    spec.write_text(original)  # the same sweep: it cannot be resumed without its Ray results
    same = runner.invoke(app, ["launch", str(spec), "--quiet"])
    assert same.exit_code == 2, same.output
    assert f"({tmp_path / 'ray' / 'reused'}) are gone" in same.stderr
    assert "give the sweep a new name" in same.stderr

    _, (after,), trials_after = runs_of(tmp_path, "reused")  # nothing was touched
    assert (after.info.status, after.info.end_time) == ("FINISHED", parent.info.end_time)
    assert after.data.params == parent.data.params and set(trials_after) == set(trials)
    assert not (tmp_path / "ray" / "reused").exists()
    renamed = write_spec(tmp_path, "reused-2", "ipc: [0.5, 1.0]\n")
    assert runner.invoke(app, ["launch", str(renamed), "--quiet"]).exit_code == 0


def test_the_sweep_state_file_is_written_atomically_and_a_torn_one_is_one_error(tmp_path,
                                                                               monkeypatch):
    spec = write_spec(tmp_path, "torn", "ipc: 1.0\n")
    sweep = sweep_of(spec)
    folder = tmp_path / "ray" / "torn"
    write_sweep_state(sweep, folder, "sqlite:///first.db")
    first = (folder / SWEEP_STATE).read_text()
    assert json.loads(first)["fingerprint"] == sweep.fingerprint()

    class DiesBeforeTheRename:  # the os module as podd_engine.fileio sees it
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(*args):
            raise OSError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(fileio, "os", DiesBeforeTheRename())
        with pytest.raises(OSError, match="killed"):
            write_sweep_state(sweep, folder, "sqlite:///second.db")
    assert (folder / SWEEP_STATE).read_text() == first  # the old file, whole
    assert [p.name for p in folder.iterdir()] == [SWEEP_STATE]  # no temporary file left

    (folder / SWEEP_STATE).write_text(first[: len(first) // 2])  # torn by another writer
    result = runner.invoke(app, ["launch", str(spec), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert f"the state file of sweep 'torn', {folder / SWEEP_STATE}, is unreadable" in \
        result.stderr
    assert "delete that file to resume it" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, ray_address, joined", [
    (None, None, "local"),  # a local Ray, never a `ray start` cluster found on the machine
    (None, "127.0.0.1:6390", "127.0.0.1:6390"),
    ("auto", "127.0.0.1:6390", "auto")])
def test_a_ray_started_by_launch_is_shut_down_when_mlflow_fails(tmp_path, monkeypatch, address,
                                                                ray_address, joined):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `launch`
    monkeypatch.setattr(ray, "init", lambda address=None, **options: calls.append(address))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = write_spec(tmp_path, "unrecorded", "ipc: 1.0\n")
    extra = ["--address", address] if address else []
    # a tracking server that is down is found before Ray starts (in seconds)
    server = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["launch", str(spec), "--quiet", "--tracking-uri", server] + extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: the MLflow tracking server {server} does not answer")
    assert calls == []
    # ... and the dry run says so (it starts nothing either way)
    result = runner.invoke(app, ["launch", str(spec), "--dry-run", "--tracking-uri", server])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"warning: the MLflow tracking server {server} does not "
                                    f"answer") and "(launch refuses to start)" in result.stderr
    # a store that fails once Ray is up (a sqlite file that is not MLflow's): Ray is shut down
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    result = runner.invoke(app, ["launch", str(spec), "--quiet", "--tracking-uri",
                                 f"sqlite:///{foreign}"] + extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and str(foreign) in result.stderr
    assert calls == [joined, "shutdown"]


def test_ctrl_c_while_launch_starts_is_one_line_and_exit_130(tmp_path, monkeypatch):
    import orchestrator.tune as tune_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "launch", interrupted)
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path, "cc", "ipc: 1.0\n"))])
    assert result.exit_code == 130
    assert result.stderr == "interrupted: stopped at once; run the same command again to " \
                            "resume\n"


def test_status_and_report_read_a_real_sweep(tmp_path):
    spec = write_spec(tmp_path, "watch", "ipc: 1.0\nseeds: [0, 1]\n"
                                         "include:\n  - {method: rat-bptt}\n")
    launch(sweep_of(spec), verbose=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["status", "watch", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "sweep watch (finished): 4 finished" in result.output
    assert result.output.count("FINISHED") == 4 and "%" in result.output
    as_json = runner.invoke(app, ["status", "watch", "--tracking-uri", uri, "--json"])
    (entry,) = json.loads(as_json.stdout)
    assert (entry["sweep"], entry["status"], entry["counts"]) == ("watch", "FINISHED",
                                                                 {"FINISHED": 4})
    assert all(t["step"] == 6 and 0 < t["best_accuracy"] <= 1 and t["run_id"]
               for t in entry["trials"])
    # a trial evaluated again straight from its MLflow run: the same protocol, the same result
    trial = entry["trials"][0]
    again = runner.invoke(app, ["evaluate", trial["run_id"], "--tracking-uri", uri,
                                "--device", "cpu"])
    assert again.exit_code == 0, again.output
    recorded = MlflowClient(uri).get_run(trial["run_id"]).data.metrics["test_accuracy"]
    assert json.loads(again.stdout)["test_accuracy"] == pytest.approx(recorded)
    unknown = runner.invoke(app, ["evaluate", "0" * 32, "--tracking-uri", uri])
    assert unknown.exit_code == 2 and f"no run {'0' * 32} in" in unknown.stderr
    report = runner.invoke(app, ["report", "--dataset", "digits", "--tracking-uri", uri,
                                 "--format", "json"])
    assert report.exit_code in (0, 1), report.output  # a verdict either way
    (data,) = json.loads(report.stdout)["datasets"]
    (schedule,) = data["schedules"]  # one sweep, one schedule
    # the report words it "2 rat-bptt 1-IPC runs" (earlier "run(s)")
    assert schedule["baseline"]["source"].startswith("measured: 2 rat-bptt 1-IPC runs at this "
                                                     "schedule")
    assert [r["ipc"] for r in schedule["verdict"]["per_ipc"]] == [1.0]
    assert {r["method"] for r in data["runs"]} == {"podd", "rat-bptt"}
    assert all(0 < r["test_accuracy"] <= 1 and r["ipc_by_bytes"] > 0.99 for r in data["runs"])
    missing = runner.invoke(app, ["status", "nope", "--tracking-uri",
                                  f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert missing.exit_code == 2 and "known sweeps are watch" in missing.stderr
    no_store = runner.invoke(app, ["status", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert no_store.exit_code == 2 and "no MLflow store at" in no_store.stderr
    assert not (tmp_path / "x.db").exists()


def test_ui_serves_the_sweep_runs_and_poster(tmp_path):
    """`podd-sweep ui` starts the MLflow UI on the store: its API lists the sweep's runs and
    serves a trial's poster PNG."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    launch(sweep_of(write_spec(tmp_path, "shown", "ipc: 1.0\n")), verbose=0)
    client, parent, trials = runs_of(tmp_path, "shown")
    (run,) = trials.values()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).with_name("podd-sweep")
    server = subprocess.Popen([str(cli), "ui", "--port", str(port), "--tracking-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        page = urllib.request.urlopen(base + "/", timeout=10).read()
        assert b"<html" in page.lower()
        request = urllib.request.Request(
            base + "/api/2.0/mlflow/runs/search", method="POST",
            data=json.dumps({"experiment_ids": [run.info.experiment_id]}).encode(),
            headers={"Content-Type": "application/json"})
        listed = json.loads(urllib.request.urlopen(request, timeout=10).read())["runs"]
        assert {r["info"]["run_id"] for r in listed} == {run.info.run_id, parent[0].info.run_id}
        png = urllib.request.urlopen(
            f"{base}/get-artifact?path=poster.png&run_uuid={run.info.run_id}", timeout=10).read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_resources_no_node_has_are_refused_before_anything_is_recorded(tmp_path):
    spec = write_spec(tmp_path, "greedy", "ipc: 1.0\nresources: {cpu: 1, gpu: 1}\n")
    result = runner.invoke(app, ["launch", str(spec)])
    assert result.exit_code == 2, result.output
    assert "resources.gpu: each trial asks for 1 GPU(s) but no node of the Ray cluster has " \
           "more than 0: set resources.gpu: 0" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray" / "greedy").exists()


def test_graceful_stop_waits_for_each_running_trial_then_ends_tunes_loop(tmp_path, monkeypatch):
    """The first Ctrl-C's protocol, with stand-in trials (tests/test_drills.py runs the real
    one): the request goes out as a file, Tune's loop ends once every running trial answered
    (or the grace period is over), a second Ctrl-C stops at once."""
    from types import SimpleNamespace

    import orchestrator.interrupt as interrupt
    from orchestrator.interrupt import GracefulStop, StopRequest

    ended = []
    monkeypatch.setattr(interrupt, "_end_tune_loop", lambda: ended.append(True))
    stop = GracefulStop(tmp_path / "stop", grace_s=60)
    with pytest.raises(KeyboardInterrupt):  # before Tune's loop runs: at once
        stop.on_sigint(2, None)
    trials = [SimpleNamespace(trial_id=i, status=s) for i, s in
              (("a", "RUNNING"), ("b", "RUNNING"), ("c", "PENDING"), ("d", "TERMINATED"))]
    stop.setup()
    stop.on_step_end(0, trials)
    assert not StopRequest(str(stop.stop_file)).requested()  # nothing asked before Ctrl-C
    stop.on_sigint(2, None)
    stop.on_step_end(1, trials)
    assert StopRequest(str(stop.stop_file)).requested() and not ended
    stop.on_trial_result(1, trials, trials[0], {"podd_event": "stopped"})
    stop.on_trial_result(1, trials, trials[1], {"podd_event": "checkpoint"})
    stop.on_step_end(2, trials)
    assert not ended  # b has not answered yet
    stop.on_trial_result(2, trials, trials[1], {"podd_event": "stopped"})
    stop.on_step_end(3, trials)
    stop.on_step_end(4, trials)
    assert ended == [True]  # once
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C
        stop.on_sigint(2, None)
    stop.close()
    assert not stop.stop_file.exists()

    late = GracefulStop(tmp_path / "late", grace_s=0)  # a trial that never answers
    late.setup()
    late.on_sigint(2, None)
    late.on_step_end(0, trials)
    assert ended == [True, True]


def test_a_ctrl_c_during_the_wind_up_still_closes_the_runs(tmp_path):
    """Tune's loop ended by a first Ctrl-C, a second one 0.2 s later lands in the wind-up
    (waiting for the MLflow writer, say), where Ctrl-C's own handler is gone: the runs are
    still closed, KILLED, and the interrupt goes on to the CLI's one line."""
    from orchestrator.interrupt import GracefulStop
    from orchestrator.tune import finish

    class Writer:
        gave_up = None

        def __init__(self):
            self.flushes = 0

        def flush(self, timeout=None):
            self.flushes += 1
            if self.flushes == 1:
                raise KeyboardInterrupt  # the second Ctrl-C, mid-wait
            return True

        def close(self):
            pass

    class Recorder:
        parent_id = "parent"

        def __init__(self):
            self.closed = []

        def close_sweep(self, status):
            self.closed.append(status)

    recorder = Recorder()
    with pytest.raises(KeyboardInterrupt):
        finish(GracefulStop(tmp_path / "stop"), recorder, Writer(), "FINISHED", owns_ray=False)
    assert recorder.closed == ["KILLED"]  # not the status the loop had reached
    recorder = Recorder()  # no Ctrl-C: closed once, with the sweep's own status
    writer = Writer()
    writer.flushes = 1
    finish(GracefulStop(tmp_path / "stop"), recorder, writer, "FINISHED", owns_ray=False)
    assert recorder.closed == ["FINISHED"]


def test_evaluations_during_distillation_are_recorded_at_their_steps(tmp_path):
    # eval_every: the trial evaluates its poster at step 3 as well as at the end (step 6)
    spec = write_spec(tmp_path, "interim", "ipc: 1.0\nseeds: [0]\n")
    spec.write_text(spec.read_text().replace("eval_steps: [20]}", "eval_steps: [20], "
                                                                  "eval_every: 3}"))
    outcome = launch(sweep_of(spec), verbose=0)
    assert set(outcome.states.values()) == {"FINISHED"}
    client, _, trials = runs_of(tmp_path, "interim")
    (run,) = trials.values()
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [3, 6]
    assert all(0 <= m.value <= 1 for m in history)
    assert run.data.metrics["test_accuracy"] == history[-1].value  # the final one is the figure


def test_a_driver_killed_before_any_trial_was_saved_resumes_every_trial(tmp_path):
    """Tune writes tuner.pkl when the Tuner is made, before any trial is saved, and keeps no
    param space in it: a launch killed in between must still run the whole grid next time
    (once it ran a single trial with an empty config: KeyError 'trial')."""
    from orchestrator.interrupt import GracefulStop
    from orchestrator.record_writer import RecordWriter
    from orchestrator.tracking import TrackingCallback
    from orchestrator.tune import TrialNames, _make_tuner

    sweep = sweep_of(write_spec(tmp_path, "early", "ipc: [0.5, 1.0]\nseeds: [0]\n"))
    experiment_dir = sweep.storage_path() / sweep.name
    names = TrialNames({t.key: t.name for t in sweep.trials})
    # the callbacks a launch makes (pickled into tuner.pkl; restored as the next launch's)
    writer = RecordWriter(None, {}, tmp_path, on_give_up=print)
    _make_tuner(sweep, experiment_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", False, names,
                [TrackingCallback(writer), GracefulStop(experiment_dir / ".stop", 5.0)], 0)
    assert (experiment_dir / "tuner.pkl").exists()
    assert not list(experiment_dir.glob("experiment_state*"))  # killed here
    outcome = launch(sweep, verbose=0)
    assert outcome.resumed and len(outcome.states) == 2
    assert set(outcome.states.values()) == {"FINISHED"}
    client, parent, trials = runs_of(tmp_path, "early")
    assert set(trials) == {t.key for t in sweep.trials}
