"""The driver's MLflow recorder on a real sqlite store, without Ray: what a resumed sweep does to
runs that already ended, and where a failed trial's error text comes from."""

from pathlib import Path
from types import SimpleNamespace

from mlflow import MlflowClient

from orchestrator.spec import load_sweep
from orchestrator.tracking import SweepRecorder, _error_text
from podd_engine.data import create_dataset


def one_trial(tmp_path: Path):
    spec = tmp_path / "rec.yaml"
    spec.write_text("name: rec\ndataset: digits\nclass_order: identity\npatch_grid: 4x2\n"
                    "ipc: [0.5, 1.0]\nsettings: {width: 8, steps: 6}\n")
    return spec, load_sweep(spec, dataset_info=create_dataset).trials


def open_recorder(tmp_path: Path, spec: Path, trials) -> SweepRecorder:
    recorder = SweepRecorder(f"sqlite:///{tmp_path / 'mlflow.db'}", "podd-sweep", "rec")
    recorder.open_sweep(spec_text=spec.read_text(), fingerprint="f", trials=len(trials), params={})
    return recorder


def test_a_run_that_finished_is_left_alone_when_its_trial_is_replayed(tmp_path):
    spec, (done, running) = one_trial(tmp_path)
    first = open_recorder(tmp_path, spec, [done, running])
    for trial in (done, running):
        first.trial_started(trial)
        first.trial_result(trial.key, {"step": 4, "loss": 1.0})
    first.trial_finished(done.key)
    client = MlflowClient(first.tracking_uri)
    ended = client.get_run(first.runs[done.key]).info

    # a killed driver: the next one replays both trials (its snapshot predates the first's end)
    second = open_recorder(tmp_path, spec, [done, running])
    for trial in (done, running):
        second.trial_started(trial)
        second.trial_result(trial.key, {"step": 6, "loss": 0.5, "started_at_step": 6})
        second.trial_finished(trial.key)

    again = client.get_run(second.runs[done.key]).info
    assert (again.status, again.end_time) == ("FINISHED", ended.end_time)
    assert [m.step for m in client.get_metric_history(again.run_id, "loss")] == [4]
    resumed = client.get_run(second.runs[running.key])
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")] == [4, 6]
    assert [m.step for m in client.get_metric_history(resumed.info.run_id,
                                                      "started_at_step")] == [6]


def test_error_text_is_read_from_the_local_error_file_before_storage_has_it(tmp_path):
    local = tmp_path / "error.txt"
    local.write_text("Failure # 1\nTraceback ...\ntorch.OutOfMemoryError: injected at step 5\n")
    not_synced = SimpleNamespace(error_file=str(local), get_error=lambda: None)
    assert _error_text(not_synced).splitlines()[-1].endswith("injected at step 5")

    def unreachable():
        raise OSError("storage gone")

    assert _error_text(SimpleNamespace(error_file=str(tmp_path / "missing"),
                                       get_error=unreachable)) == \
        "the trial failed without a message"
    assert _error_text(SimpleNamespace(error_file=None, get_error=lambda: "RuntimeError: x")) == \
        "RuntimeError: x"
