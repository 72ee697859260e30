"""`podd-sweep report`: runs in a real MLflow store -> table -> verdict, baselines, formats,
plot, and the messages for nothing-to-report cases."""

import json

import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.report import ReportError, build_report, gather_runs
from orchestrator.store import KEY_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG

runner = CliRunner()


def record_trial(client, experiment_id, parent_id, *, method, ipc, seed, accuracy,
                 dataset="parquet:/data/cifar10", family="cifar10", patch_grid="16x6",
                 labels="fixed", status="FINISHED", pixels=None, label_parameters=0):
    """A trial run as the sweep recorder writes it (params, tags, metrics)."""
    run = client.create_run(experiment_id, run_name=f"{method}-{ipc}-{seed}",
                            tags={SWEEP_TAG: "s", ROLE_TAG: "trial", PARENT_TAG: parent_id,
                                  KEY_TAG: f"{method}{ipc}{seed}{patch_grid}{labels}"})
    pixels = pixels if pixels is not None else int(ipc * 10 * 32 * 32)
    params = {"dataset": dataset, "dataset_family": family, "method": method, "ipc": ipc,
              "achieved_ipc": ipc, "patch_grid": patch_grid, "order": "poco", "labels": labels,
              "seed": seed, "eval_models": 3, "poster_pixels": pixels, "channels": 3,
              "num_classes": 10, "image_size": "32x32", "label_parameters": label_parameters}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric("test_accuracy", accuracy, 0, 100),
                              Metric("test_accuracy_std", 0.01, 0, 100)])
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("podd-sweep")
    parent = client.create_run(experiment_id, run_name="s",
                               tags={SWEEP_TAG: "s", ROLE_TAG: "sweep"}).info.run_id

    def add(**kw):
        return record_trial(client, experiment_id, parent, **kw)

    add.uri, add.client, add.parent = uri, client, parent
    return add


def fill(store, podd: dict, baseline=(0.40, 0.42)):
    for seed, acc in enumerate(baseline):
        store(method="rat-bptt", ipc=1.0, seed=seed, accuracy=acc)
    for ipc, accs in podd.items():
        for seed, acc in enumerate(accs):
            store(method="podd", ipc=ipc, seed=seed, accuracy=acc)


def test_lowest_passing_ipc_against_the_measured_baseline(store):
    # baseline 41 +- 1.4 %; PoDD: 0.3 fails, 0.5 passes, 0.7 fails, 1.0 passes
    fill(store, {0.3: [0.30, 0.32], 0.5: [0.42, 0.43], 0.7: [0.40, 0.405], 1.0: [0.45, 0.47]})
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    assert report.baseline.source.startswith("measured: 2 rat-bptt")
    assert report.baseline.accuracy == pytest.approx(0.41)
    assert report.verdict.lowest_ipc == 0.5 and report.verdict.all_above_pass is False
    assert "0.7 fail" in report.verdict.message
    passes = {r.ipc: r.passes for r in report.verdict.per_ipc}
    assert passes == {0.3: False, 0.5: True, 0.7: False, 1.0: True}
    # within one baseline std (0.41 - 0.0141): 0.7 IPC (40.25 %) becomes comparable
    comparable = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10",
                              criterion="comparable")
    assert comparable.verdict.lowest_ipc == 0.5 and comparable.verdict.all_above_pass is True


def test_a_tie_with_the_baseline_passes(store):
    # PoDD's mean (0.40 + 0.42) / 2 equals the baseline's (0.41 + 0.41) / 2: "at least" passes
    fill(store, {0.5: [0.40, 0.42], 0.8: [0.405, 0.41]}, baseline=(0.41, 0.41))
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    assert {r.ipc: r.passes for r in report.verdict.per_ipc} == {0.5: True, 0.8: False}
    assert report.verdict.lowest_ipc == 0.5 and report.verdict.all_above_pass is False


def test_best_configuration_per_ipc_and_seed_aggregation(store):
    fill(store, {})
    for seed, acc in enumerate([0.39, 0.41]):
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, patch_grid="16x6")
    for seed, acc in enumerate([0.44, 0.46, 0.45]):
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, patch_grid="8x3")
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    (best,) = report.verdict.per_ipc
    assert best.configuration.startswith("8x3") and best.runs == 3
    assert best.accuracy == pytest.approx(0.45) and best.accuracy_std == pytest.approx(0.01)
    assert report.verdict.lowest_ipc == 0.5
    groups = {(r["patch_grid"]): r for r in report.groups.to_pylist() if r["method"] == "podd"}
    assert sorted(groups["16x6"]["seeds"]) == [0, 1] and len(groups["8x3"]["run_ids"]) == 3


def test_no_ipc_passes_and_too_few_runs(store):
    fill(store, {0.5: [0.30, 0.31], 0.8: [0.50]})
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    assert report.verdict.lowest_ipc is None
    assert "no IPC passes" in report.verdict.message
    assert {r.ipc: r.passes for r in report.verdict.per_ipc} == {0.5: False, 0.8: None}


def test_paper_baseline_when_none_measured_or_asked_for(store):
    for seed, acc in enumerate([0.50, 0.52]):
        store(method="podd", ipc=0.4, seed=seed, accuracy=acc)
    for seed, acc in enumerate([0.55, 0.56]):
        store(method="podd", ipc=0.9, seed=seed, accuracy=acc)
    gathered = gather_runs(store.uri, "podd-sweep")
    report = build_report(gathered, "cifar10")  # nothing measured: the paper's 53.2 +- 0.7
    assert report.baseline.source.startswith("the PoDD paper")
    assert report.baseline.accuracy == pytest.approx(0.532)
    assert report.verdict.lowest_ipc == 0.9
    assert build_report(gathered, "cifar10", criterion="comparable").verdict.lowest_ipc == 0.9
    assert build_report(gathered, "cifar10", baseline="50").verdict.lowest_ipc == 0.4
    with pytest.raises(ReportError, match="no finished rat-bptt 1-IPC runs"):
        build_report(gathered, "cifar10", baseline="measured")


def test_storage_counts_learned_labels(store):
    store(method="podd", ipc=1.0, seed=0, accuracy=0.5, labels="learned", label_parameters=100)
    store(method="podd", ipc=1.0, seed=1, accuracy=0.5, labels="learned", label_parameters=100)
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    (row,) = report.groups.to_pylist()
    assert row["storage_bytes"] == (3 * 10240 + 100) * 4
    assert row["ipc_by_bytes"] == pytest.approx(1 + 100 / (10 * 3 * 32 * 32))
    assert row["achieved_ipc"] == 1.0


def test_cli_formats_plot_and_exit_codes(store, tmp_path):
    fill(store, {0.5: [0.42, 0.43], 0.8: [0.45, 0.44]})
    store(method="podd", ipc=0.3, seed=5, accuracy=0.9, status="RUNNING")  # left out
    args = ["report", "--dataset", "cifar10", "--tracking-uri", store.uri]
    table = runner.invoke(app, args + ["--plot", str(tmp_path / "acc.png")])
    assert table.exit_code == 0, table.output
    assert "verdict: cifar10: 0.5 IPC is the lowest" in table.output
    assert "1 trial run(s) still RUNNING are left out" in table.stderr
    png = (tmp_path / "acc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    logged = [a.path for a in store.client.list_artifacts(store.parent, "report")]
    assert logged == ["report/acc.png"]

    as_json = runner.invoke(app, args + ["--format", "json"])
    data = json.loads(as_json.stdout)["datasets"][0]
    assert data["verdict"]["lowest_ipc"] == 0.5 and len(data["runs"]) == 6
    runner.invoke(app, args + ["--format", "csv", "--output", str(tmp_path / "r.csv")])
    csv = pyarrow.csv.read_csv(tmp_path / "r.csv")
    assert csv.num_rows == 3 and "passes" in csv.column_names
    runner.invoke(app, args + ["--format", "parquet", "--output", str(tmp_path / "r.parquet")])
    back = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert len(back) == 3
    by = {(r["method"], r["ipc"]): r for r in back}
    assert by[("podd", 0.5)]["accuracy"] == pytest.approx(0.425) and by[("podd", 0.5)]["passes"]
    assert by[("podd", 0.5)]["run_ids"].count(" ") == 1  # both runs named
    assert by[("rat-bptt", 1.0)]["passes"] is None  # the baseline is not judged against itself
    assert by[("podd", 0.8)]["delta_to_baseline"] == pytest.approx(0.445 - 0.41)

    failing = runner.invoke(app, args + ["--baseline", "60"])
    assert failing.exit_code == 1 and "no IPC passes" in failing.output


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet21k"], "unknown data set 'imagenet21k': this store has runs for cifar10"),
    (["--dataset", "cifar100"], "no finished runs for cifar100 in this store (it has cifar10)"),
    (["--sweep", "nope"], "no trial runs of sweep 'nope'"),
    (["--baseline", "lots"], "--baseline must be measured, paper or a number"),
    (["--criterion", "wins"], "--criterion must be one of beats, comparable"),
    (["--format", "xml"], "--format must be table, json, csv or parquet"),
    (["--experiment", "other"], "no experiment 'other'"),
])
def test_bad_input_is_one_line_exit_2(store, args, message):
    fill(store, {0.5: [0.42, 0.43]})
    result = runner.invoke(app, ["report", "--tracking-uri", store.uri] + args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.output


def test_store_that_does_not_exist(tmp_path):
    result = runner.invoke(app, ["report", "--tracking-uri", f"sqlite:///{tmp_path / 'no.db'}"])
    assert result.exit_code == 2 and "no MLflow store at" in result.stderr
    assert not (tmp_path / "no.db").exists()


def test_sqlite_fast_path_reads_what_mlflow_reads(store, monkeypatch):
    """The direct sqlite reader and MLflow's client give the same table (deleted runs, NaN
    metrics, RUNNING runs and other sweeps' runs included in the store)."""
    import sqlite3

    import orchestrator.store as store_module

    fill(store, {0.5: [0.42, 0.43], 0.8: [0.45, float("nan")]})
    store(method="podd", ipc=0.3, seed=5, accuracy=0.9, status="RUNNING")
    gone = store(method="podd", ipc=0.3, seed=6, accuracy=0.9)
    store.client.delete_run(gone)
    fast = gather_runs(store.uri, "podd-sweep")

    def unknown_schema(*args):
        raise sqlite3.DatabaseError("no such table")

    monkeypatch.setattr(store_module, "_sqlite_run_records", unknown_schema)
    slow = gather_runs(store.uri, "podd-sweep")
    assert fast.runs.num_rows == 6 and (fast.running, fast.unusable) == (slow.running, slow.unusable) == (1, 0)
    assert fast.runs.drop(["test_accuracy"]).equals(slow.runs.drop(["test_accuracy"]))
    a, b = fast.runs.column("test_accuracy").to_pylist(), slow.runs.column("test_accuracy").to_pylist()
    assert [x for x in a if x == x] == [x for x in b if x == x] and sum(x != x for x in a) == 1
    assert gone not in fast.runs.column("run_id").to_pylist()
