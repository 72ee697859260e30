"""Real sweeps on Ray Tune (2 local CPUs) with tiny engine configs on digits, checked through
MLflow's client: records, resume without duplicates, retries and failures."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.spec import load_sweep
from orchestrator.tune import FAULTS_ENV, launch
from podd_engine.artifact import load_artifact
from podd_engine.data import create_dataset

pytestmark = pytest.mark.usefixtures("ray_local")
runner = CliRunner()

ENGINE = ("settings: {width: 8, steps: 6, total_inner_steps: 4, window: 2, distill_batch: 16, "
          "real_batch: 64, real_chunk: 64, eval_models: 1, eval_steps: [20]}\n")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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


def test_diverging_trial_stops_with_the_reason_and_is_not_retried(tmp_path, monkeypatch):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"trial": "podd", "step": 2, "kind": "nan", "times": 9}]))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    outcome = launch(sweep_of(write_spec(tmp_path, "nan", "ipc: 1.0\nmax_failures: 3\n")),
                     verbose=0)
    assert list(outcome.states.values()) == ["FAILED"]
    client, parent, trials = runs_of(tmp_path, "nan")
    (run,) = trials.values()
    assert run.info.status == "FAILED" and "diverged, stopped" in run.data.tags["podd.error"]
    assert "not finite" in run.data.tags["podd.error"]
    assert "podd.retries" not in run.data.tags
    assert "test_accuracy" not in run.data.metrics  # stopped, no budget burnt on evaluation


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


def test_changed_spec_under_the_same_name_is_refused(tmp_path):
    spec = write_spec(tmp_path, "same", "ipc: 1.0\n")
    launch(sweep_of(spec), verbose=0)
    spec.write_text(spec.read_text().replace("ipc: 1.0", "ipc: [0.5, 1.0]"))
    result = runner.invoke(app, ["launch", str(spec)])
    assert result.exit_code == 2
    assert "sweep 'same' already exists" in result.stderr and "new name" in result.stderr


def test_status_and_report_read_a_real_sweep(tmp_path):
    spec = write_spec(tmp_path, "watch", "ipc: 1.0\nseeds: [0, 1]\n"
                                         "include:\n  - {method: rat-bptt}\n")
    launch(sweep_of(spec), verbose=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["status", "watch", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "sweep watch (finished): 4 finished" in result.output
    assert result.output.count("FINISHED") == 4 and "%" in result.output
    report = runner.invoke(app, ["report", "--dataset", "digits", "--tracking-uri", uri,
                                 "--format", "json"])
    assert report.exit_code in (0, 1), report.output  # a verdict either way
    (data,) = json.loads(report.stdout)["datasets"]
    assert data["baseline"]["source"].startswith("measured: 2 rat-bptt 1-IPC run(s)")
    assert [r["ipc"] for r in data["verdict"]["per_ipc"]] == [1.0]
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
