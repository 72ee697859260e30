"""The driver's MLflow recorder on a real sqlite store, without Ray: what a resumed sweep does to
runs that already ended, and where a failed trial's error text comes from."""

import json
from pathlib import Path
from types import SimpleNamespace

from mlflow import MlflowClient

from orchestrator.sweep import load_sweep
from orchestrator.protocol import EVAL, FINAL, SETUP, STEP, report
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
        first.trial_result(trial.key, report(STEP, 4, {"loss": 1.0}))
    first.trial_finished(done.key)
    client = MlflowClient(first.tracking_uri)
    ended = client.get_run(first.runs[done.key]).info

    # a killed driver: the next one replays both trials (its snapshot predates the first's end)
    second = open_recorder(tmp_path, spec, [done, running])
    for trial in (done, running):
        second.trial_started(trial)
        second.trial_result(trial.key, report(STEP, 6, {"loss": 0.5, "started_at_step": 6}))
        second.trial_finished(trial.key)

    again = client.get_run(second.runs[done.key]).info
    assert (again.status, again.end_time) == ("FINISHED", ended.end_time)
    assert [m.step for m in client.get_metric_history(again.run_id, "loss")] == [4]
    resumed = client.get_run(second.runs[running.key])
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")] == [4, 6]
    assert [m.step for m in client.get_metric_history(resumed.info.run_id,
                                                      "started_at_step")] == [6]


def test_each_attempt_records_its_node_and_damaged_checkpoints_are_tagged(tmp_path, capsys):
    spec, (trial, _) = one_trial(tmp_path)
    recorder = open_recorder(tmp_path, spec, [trial])
    recorder.trial_started(trial)
    capsys.readouterr()  # MLflow's notes on creating the store
    recorder.trial_result(trial.key, {"podd_event": "attempt", "step": 0,
                                      "podd_info": {"node_id": "node-a"}})
    recorder.trial_result(trial.key, {"podd_event": "setup", "step": 0,
                                      "podd_info": {"width": 8}})
    # the retry runs on another node and skipped a damaged checkpoint
    recorder.trial_started(trial)
    recorder.trial_result(trial.key, {"podd_event": "attempt", "step": 0,
                                      "podd_info": {"node_id": "node-b"}})
    recorder.trial_result(trial.key, {"podd_event": "setup", "step": 3,
                                      "podd_info": {"width": 8},
                                      "podd_damaged_checkpoints": "/r/checkpoint_000001: bad"})
    run = MlflowClient(recorder.tracking_uri).get_run(recorder.runs[trial.key])
    assert run.data.params["node_id"] == "node-a"  # params are write-once: the first attempt
    assert run.data.tags["podd.node_id"] == "node-b"
    assert run.data.tags["podd.nodes"] == "node-a node-b"
    assert run.data.tags["podd.damaged_checkpoints"] == "/r/checkpoint_000001: bad"
    assert capsys.readouterr().err == (f"warning: trial {trial.name}: skipped damaged "
                                       f"checkpoint /r/checkpoint_000001: bad\n")


def test_the_recorded_sweep_is_read_without_writing(tmp_path):
    spec, trials = one_trial(tmp_path)
    fresh = SweepRecorder(f"sqlite:///{tmp_path / 'mlflow.db'}", "podd-sweep", "rec")
    assert fresh.recorded_sweep() is None
    recorder = open_recorder(tmp_path, spec, trials)
    recorder.trial_started(trials[0])
    recorded = SweepRecorder(recorder.tracking_uri, "podd-sweep", "rec").recorded_sweep()
    assert (recorded.parent_run_id, recorded.fingerprint, recorded.trial_runs) == \
        (recorder.parent_id, "f", 1)
    assert SweepRecorder(recorder.tracking_uri, "podd-sweep", "other").recorded_sweep() is None


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


def test_status_progress_is_the_same_from_sqlite_and_from_mlflows_client(tmp_path, monkeypatch):
    import sqlite3

    import orchestrator.store as store_module
    from orchestrator.status import sweep_status

    spec, trials = one_trial(tmp_path)
    recorder = open_recorder(tmp_path, spec, trials)
    for trial, accuracies in zip(trials, ([0.30, 0.55, 0.50], [0.20])):
        recorder.trial_started(trial)
        for step in range(0, 7, 2):
            recorder.trial_result(trial.key, report(STEP, step, {"loss": 2.0 - step / 10}))
        for step, accuracy in zip((6, 8, 9), accuracies):
            recorder.trial_result(trial.key, report(EVAL, step, {"test_accuracy": accuracy}))
    recorder.trial_finished(trials[0].key)

    def progress():
        (sweep,) = sweep_status(recorder.tracking_uri, "podd-sweep", "rec")
        return sorted((t.status, t.step, t.best_accuracy) for t in sweep.trials)

    fast = progress()

    def unknown_schema(*args):
        raise sqlite3.DatabaseError("no such table")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "_sqlite_run_records", unknown_schema)
        slow = progress()
    # the best accuracy so far, not the latest; the furthest step of loss or accuracy
    assert fast == slow == [("FINISHED", 9, 0.55), ("RUNNING", 6, 0.20)]


def test_status_of_a_long_sweep_shows_unfinished_and_best_trials_unless_all(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.cli_sweeps import STATUS_ROWS

    spec = tmp_path / "long.yaml"
    spec.write_text("name: rec\ndataset: digits\nclass_order: identity\npatch_grid: 4x2\n"
                    f"ipc: 1.0\nseeds: {list(range(STATUS_ROWS + 5))}\nsettings: {{width: 8, steps: 6}}\n")
    trials = load_sweep(spec, dataset_info=create_dataset).trials
    recorder = open_recorder(tmp_path, spec, trials)
    for i, trial in enumerate(trials):
        recorder.trial_started(trial)
        recorder.trial_result(trial.key, report(FINAL, 6, {"test_accuracy": i / 100}))
        if i != 3:
            recorder.trial_finished(trial.key, error="boom" if i == 4 else None)
    uri = ["--tracking-uri", recorder.tracking_uri]
    short = CliRunner().invoke(app, ["status", "rec", *uri])
    assert short.exit_code == 0, short.output
    rows = [line for line in short.stdout.splitlines() if "podd-digits" in line]
    best = {t.name for t in trials[-10:]}
    assert len(rows) == 12 and {r.split()[1] for r in rows} == best | {trials[3].name,
                                                                        trials[4].name}
    assert f"{len(trials) - 12} more finished trials not shown" in short.stdout
    every = CliRunner().invoke(app, ["status", "rec", "--all", *uri])
    assert len([line for line in every.stdout.splitlines() if "podd-digits" in line]) == \
        len(trials)


def test_every_reported_measurement_is_recorded_and_nothing_else(tmp_path):
    """No list of known fields: a measurement a trial starts to report is recorded; the
    numbers Ray Tune adds to every result are not."""
    spec, (trial, _) = one_trial(tmp_path)
    recorder = open_recorder(tmp_path, spec, [trial])
    recorder.trial_started(trial)
    recorder.trial_result(trial.key, {**report(STEP, 2, {"brand_new_measure": 1.5,
                                                         "flag": True}),
                                      "time_this_iter_s": 0.3, "training_iteration": 4})
    run = MlflowClient(recorder.tracking_uri).get_run(recorder.runs[trial.key])
    assert run.data.metrics == {"brand_new_measure": 1.5}


def test_artifacts_live_beside_the_store_not_in_the_working_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # launch run from another folder than the store's
    store = tmp_path / "store"
    store.mkdir()
    spec, (trial, _) = one_trial(tmp_path)
    recorder = SweepRecorder(f"sqlite:///{store / 'mlflow.db'}", "podd-sweep", "rec")
    recorder.open_sweep(spec_text=spec.read_text(), fingerprint="f", trials=1, params={})
    recorder.trial_started(trial)
    MlflowClient(recorder.tracking_uri).log_text(recorder.runs[trial.key], "hello", "note.txt")
    assert list((store / "mlruns").rglob("note.txt"))
    assert not (elsewhere / "mlruns").exists()


def _half_migrate(path: Path, runs: int = 0) -> None:
    """What a launch killed while MLflow migrated a new store leaves: tables of a later
    revision, the bookkeeping of an earlier one."""
    import sqlite3

    from orchestrator.store import prepare_sqlite_store

    prepare_sqlite_store(f"sqlite:///{path}")
    if runs:
        client = MlflowClient(f"sqlite:///{path}")
        experiment = client.create_experiment("x", artifact_location=path.parent.as_uri())
        for _ in range(runs):
            client.create_run(experiment)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = 'a8c4a736bde6'")


def test_a_new_store_is_created_whole_or_not_at_all(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from orchestrator.store import _sqlite_schema_state, prepare_sqlite_store

    store = tmp_path / "s" / "mlflow.db"
    # a creation killed half-way leaves only its staging file, never a store
    child = subprocess.Popen([sys.executable, "-c",
                              "from orchestrator.store import prepare_sqlite_store as p; "
                              f"p('sqlite:///{store}')"])
    deadline = __import__("time").time() + 60
    while not list(store.parent.glob(".mlflow.db.creating-*")):
        assert __import__("time").time() < deadline and child.poll() is None
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not store.exists()
    prepare_sqlite_store(f"sqlite:///{store}")  # the next launch: a whole store
    assert _sqlite_schema_state(store) == ("complete", 0)
    assert os.listdir(store.parent) == ["mlflow.db"]  # the killed one's staging file is gone
    MlflowClient(f"sqlite:///{store}").search_experiments()  # and MLflow opens it


def test_a_half_created_store_is_rebuilt_when_empty_and_refused_with_runs(tmp_path):
    import pytest

    from orchestrator.store import _sqlite_schema_state, prepare_sqlite_store
    from podd_engine.errors import UserError

    empty = tmp_path / "empty" / "mlflow.db"
    _half_migrate(empty)
    assert _sqlite_schema_state(empty)[0] == "half-created"
    prepare_sqlite_store(f"sqlite:///{empty}")
    assert _sqlite_schema_state(empty) == ("complete", 0)
    kept = tmp_path / "kept" / "mlflow.db"
    _half_migrate(kept, runs=2)
    before = kept.read_bytes()
    with pytest.raises(UserError, match=r"whose creation or migration was cut short, and it "
                                        r"holds 2 run\(s\): back it up, then run `mlflow db"):
        prepare_sqlite_store(f"sqlite:///{kept}")
    assert kept.read_bytes() == before  # nothing recorded is touched


def _killed_mid_write(path, sql: str) -> None:
    """Run `sql` in a transaction in another process and SIGKILL it before the commit: the
    file is left with a hot rollback journal beside it, as a killed MLflow migration leaves
    it."""
    import subprocess
    import sys

    # a one-page cache makes SQLite write changed pages into the file before the commit
    # (after syncing the journal that can undo them): the journal is hot, the file changed
    script = (f"import os, signal, sqlite3; db = sqlite3.connect({str(path)!r}); "
              f"db.execute('PRAGMA cache_size = 1'); db.execute('BEGIN'); "
              f"[db.execute(s) for s in {sql!r}.split(';') if s.strip()]; "
              f"db.execute('CREATE TABLE spill (x TEXT)'); "
              f"db.executemany('INSERT INTO spill VALUES (?)', [('x' * 500,)] * 2000); "
              f"os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", script])
    assert path.with_name(path.name + "-journal").stat().st_size > 0


def test_a_half_created_store_left_with_a_hot_journal_is_rebuilt(tmp_path):
    """The issue's case: MLflow killed while it migrated a new store leaves a hot journal
    (read-only SQLite refuses to read the file at all until it is rolled back)."""
    import sqlite3

    import pytest

    from orchestrator.store import _sqlite_schema_state, prepare_sqlite_store

    store = tmp_path / "mlflow.db"
    _half_migrate(store)
    _killed_mid_write(store, "DELETE FROM experiments; CREATE TABLE experiment_extra (x INT)")
    with pytest.raises(sqlite3.OperationalError):  # what a read-only reader meets
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            db.execute("SELECT name FROM sqlite_master").fetchall()
    assert _sqlite_schema_state(store)[0] == "half-created"  # rolled back, then read
    prepare_sqlite_store(f"sqlite:///{store}")
    assert _sqlite_schema_state(store) == ("complete", 0)
    MlflowClient(f"sqlite:///{store}").search_experiments()


def test_a_sqlite_file_of_another_program_is_never_rebuilt(tmp_path):
    """A file that shares a table name with MLflow (tags) but holds tables MLflow does not
    make is someone else's: refused in one line, left byte for byte, journal and all."""
    import sqlite3

    import pytest

    from orchestrator.store import prepare_sqlite_store
    from podd_engine.errors import UserError

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE tags (key TEXT, value TEXT)")
        db.execute("CREATE TABLE notes (body TEXT)")
        db.executemany("INSERT INTO notes VALUES (?)", [(f"note {i}",) for i in range(100)])
    before = other.read_bytes()
    with pytest.raises((UserError, ValueError), match="not an MLflow store"):
        prepare_sqlite_store(f"sqlite:///{other}")
    assert other.read_bytes() == before
    _killed_mid_write(other, "DELETE FROM notes")  # the same, with a hot journal beside it
    with pytest.raises((UserError, ValueError), match="not an MLflow store"):
        prepare_sqlite_store(f"sqlite:///{other}")
    with sqlite3.connect(other) as db:
        assert db.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 100


def test_a_write_retried_after_the_store_failed_is_recorded_once(tmp_path, monkeypatch):
    """The background writer retries an event whose write failed (the store was away): the
    retry must record it (a step is taken only once its write succeeded) and only once."""
    spec, (trial, _) = one_trial(tmp_path)
    recorder = open_recorder(tmp_path, spec, [trial])
    recorder.trial_started(trial)
    recorder.trial_result(trial.key, report(STEP, 2, {"loss": 1.0}))
    real_log_batch, failures = recorder.client.log_batch, []

    def away_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise ConnectionError("Connection refused")
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(recorder.client, "log_batch", away_once)
    event = report(STEP, 4, {"loss": 0.5})
    try:
        recorder.trial_result(trial.key, event)
    except ConnectionError:
        recorder.trial_result(trial.key, event)  # the writer's retry
    recorder.trial_result(trial.key, event)  # replayed again after a kill: nothing added
    history = MlflowClient(recorder.tracking_uri).get_metric_history(recorder.runs[trial.key],
                                                                     "loss")
    assert failures and [(m.step, m.value) for m in history] == [(2, 1.0), (4, 0.5)]


def test_a_sweep_whose_driver_is_gone_shows_interrupted_and_how_to_resume(tmp_path):
    """MLflow says RUNNING after a driver's SIGKILL or a machine's restart; the driver lock in
    the storage folder says whether anything still runs the sweep."""
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.driver_lock import DriverLock

    spec, trials = one_trial(tmp_path)
    storage = tmp_path / "ray"
    storage.mkdir()
    recorder = SweepRecorder(f"sqlite:///{tmp_path / 'mlflow.db'}", "podd-sweep", "rec")
    recorder.open_sweep(spec_text=spec.read_text(), fingerprint="f", trials=len(trials),
                        params={"spec": str(spec), "storage": str(storage / "rec"),
                                "overrides": "seeds=[0] settings.steps=4"})
    recorder.trial_started(trials[0])
    recorder.trial_result(trials[0].key, report(STEP, 4, {"loss": 1.0}))
    recorder.trial_started(trials[1])
    recorder.trial_finished(trials[1].key)
    status = ["status", "rec", "--tracking-uri", recorder.tracking_uri]

    def states(*args):
        result = CliRunner().invoke(app, [*status, *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    gone = states()  # nothing holds the lock: the driver died without closing its runs
    assert "sweep rec (interrupted)" in gone and "INTERRUPTED" in gone and "FINISHED" in gone
    assert f"`podd-sweep launch {spec} seeds=[0] settings.steps=4`" in " ".join(gone.split())
    lock = DriverLock(storage, "rec")
    lock.acquire()
    try:
        running = states()
        assert "sweep rec (running)" in running and "INTERRUPTED" not in running
    finally:
        lock.release()
    assert '"status": "INTERRUPTED"' in states("--json")
    # storage this machine cannot see (another machine's folder): it cannot tell, says RUNNING
    storage.rename(tmp_path / "elsewhere")
    assert "sweep rec (running)" in states()


def test_a_trial_resumed_on_other_code_or_data_says_so(tmp_path):
    """Params are write-once and keep the first attempt's provenance; an attempt that runs
    other code, torch, device or data adds its value to a tag, and the report's table shows
    the run as 'A then B'. An attempt older than the record shows as (unrecorded)."""
    from orchestrator.runs import provenance_of
    from orchestrator.store import run_records

    spec, (trial, older) = one_trial(tmp_path)
    recorder = open_recorder(tmp_path, spec, [trial, older])
    facts = {"config_key": trial.key, "poster_pixels": 640, "engine_revision": "0.1.0+code.a",
             "torch_version": "2.14.1", "device_used": "cpu", "data_hash": "45b10bbc7f186349"}
    for revision in ("0.1.0+code.a", "0.1.0+code.a", "0.1.0+code.b", "0.1.0+code.b"):
        recorder.trial_started(trial)  # a retry, or a resumed sweep
        recorder.trial_result(trial.key, report(SETUP, 0, podd_info={
            **facts, "engine_revision": revision}))
    # a run whose first attempt ran before provenance was recorded
    recorder.trial_started(older)
    recorder.trial_result(older.key, report(SETUP, 0, podd_info={"config_key": older.key}))
    recorder.trial_started(older)
    recorder.trial_result(older.key, report(SETUP, 3, podd_info={**facts,
                                                                 "config_key": older.key}))

    client = MlflowClient(recorder.tracking_uri)
    run = client.get_run(recorder.runs[trial.key])
    assert run.data.params["engine_revision"] == "0.1.0+code.a"  # the first attempt's
    assert json.loads(run.data.tags["podd.provenance_history"]) == {
        "engine_revision": ["0.1.0+code.a", "0.1.0+code.b"]}
    records = {r.run_id: r for r in run_records(recorder.tracking_uri, "podd-sweep")}
    assert provenance_of(records[recorder.runs[trial.key]]) == {
        **{k: facts[k] for k in ("torch_version", "device_used", "data_hash")},
        "engine_revision": "0.1.0+code.a then 0.1.0+code.b"}
    assert provenance_of(records[recorder.runs[older.key]])["engine_revision"] == \
        "(unrecorded) then 0.1.0+code.a"
