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
from orchestrator.report import build_report
from orchestrator.runs import ReportError, gather_runs
from orchestrator.store import (ERROR_TAG, KEY_TAG, PARENT_TAG, ROLE_TAG, STOPPED_EARLY_TAG,
                               SWEEP_TAG)

runner = CliRunner()


def record_trial(client, experiment_id, parent_id, *, method, ipc, seed, accuracy,
                 dataset="parquet:/data/cifar10", family="cifar10", patch_grid="16x6",
                 labels="fixed", status="FINISHED", pixels=None, label_parameters=0,
                 accuracy_std=0.01, sweep="s", extra_params=None):
    """A trial run as the sweep recorder writes it (params, tags, metrics)."""
    run = client.create_run(experiment_id, run_name=f"{method}-{ipc}-{seed}",
                            tags={SWEEP_TAG: sweep, ROLE_TAG: "trial", PARENT_TAG: parent_id,
                                  KEY_TAG: f"{sweep}{method}{ipc}{seed}{patch_grid}{labels}"})
    pixels = pixels if pixels is not None else int(ipc * 10 * 32 * 32)
    params = {"dataset": dataset, "dataset_family": family, "method": method, "ipc": ipc,
              "achieved_ipc": ipc, "patch_grid": patch_grid, "order": "poco", "labels": labels,
              "seed": seed, "eval_models": 3, "poster_pixels": pixels, "channels": 3,
              "num_classes": 10, "image_size": "32x32", "label_parameters": label_parameters,
              **(extra_params or {})}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric("test_accuracy", accuracy, 0, 100),
                              Metric("test_accuracy_std", accuracy_std, 0, 100)])
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("podd-sweep",
                                             artifact_location=(tmp_path / "mlruns").as_uri())
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
    assert report.verdict.state == "pass"
    assert report.verdict.lowest_ipc == 0.5 and report.verdict.all_above_pass is False
    assert "but 0.7 IPC fails above it" in report.verdict.message
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


def test_a_seed_run_twice_counts_once(store):
    """Two runs of one seed (the same sweep launched under two names) are one draw: the seed
    counts once with its runs averaged, so two runs of seed 0 are not two seeds."""
    fill(store, {}, baseline=(0.40, 0.42))
    twice = [store(method="podd", ipc=0.5, seed=0, accuracy=acc) for acc in (0.50, 0.52)]
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    assert report.verdict.state == "too-few-runs"  # one seed, however many runs of it
    store(method="podd", ipc=0.5, seed=1, accuracy=0.45)
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    (row,) = report.verdict.per_ipc
    assert row.runs == 2 and row.accuracy == pytest.approx((0.51 + 0.45) / 2)
    assert row.accuracy_std == pytest.approx(0.0424, abs=1e-4)  # over 0.51 and 0.45
    assert len(row.run_ids) == 3 and sorted(report.repeated_seeds) == sorted(twice)
    (podd,) = [g for g in report.groups.to_pylist() if g["method"] == "podd"]
    assert sorted(podd["seeds"]) == [0, 1] and len(podd["run_ids"]) == 3
    done = runner.invoke(app, ["report", "--tracking-uri", store.uri, "--dataset", "cifar10"])
    assert "2 run(s) repeat a seed of their configuration" in done.output


def test_no_ipc_passes_and_too_few_runs(store):
    # 0.5 IPC is judged and fails, 0.8 IPC has one run (above the baseline): it could pass
    fill(store, {0.5: [0.30, 0.31], 0.8: [0.50]})
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    verdict = report.verdict
    assert verdict.state == "too-few-runs" and verdict.lowest_ipc is None
    assert verdict.message.startswith("cifar10: too few runs to tell: no judged IPC passes")
    assert "0.8 IPC cannot be judged: fewer than 2 finished runs (1)" in verdict.message
    assert "no IPC passes" not in verdict.message
    assert verdict.unjudged_ipcs == [0.8]
    assert {r.ipc: r.passes for r in verdict.per_ipc} == {0.5: False, 0.8: None}


def test_no_ipc_passes_when_every_ipc_is_judged(store):
    fill(store, {0.5: [0.30, 0.31], 0.8: [0.35, 0.36]})
    verdict = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10").verdict
    assert verdict.state == "none-passes" and verdict.unjudged_ipcs == []
    assert verdict.message.startswith("cifar10: no IPC passes: the best judged PoDD poster "
                                      "(0.8 IPC, 35.50 %) is below the baseline 41.00 %")


def test_every_ipc_with_one_run_is_too_few_runs(store):
    fill(store, {0.5: [0.50], 0.8: [0.60]})
    verdict = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10").verdict
    assert verdict.state == "too-few-runs" and verdict.unjudged_ipcs == [0.5, 0.8]
    assert verdict.message == ("cifar10: too few runs to tell: 0.5, 0.8 IPC cannot be judged: "
                               "fewer than 2 finished runs (1, 1); add seeds")


def test_above_the_lowest_passing_ipc(store):
    # 0.5 passes; 0.8 (one run) cannot be judged: "every IPC above passes" would be a guess
    fill(store, {0.3: [0.60], 0.5: [0.42, 0.43], 0.8: [0.45]})
    verdict = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10").verdict
    assert verdict.state == "pass" and verdict.lowest_ipc == 0.5
    assert verdict.all_above_pass is None
    assert "every judged IPC above it passes too, but 0.8 IPC cannot be judged" in verdict.message
    # 0.3 IPC (one run, 60 %) might pass with more seeds: the claim "lowest" is qualified
    assert "0.3 IPC below it cannot be judged (too few runs), so the lowest may be lower" \
        in verdict.message
    assert verdict.unjudged_ipcs == [0.3, 0.8]


def test_the_highest_ipc_has_no_ipc_above_it(store):
    fill(store, {0.5: [0.30, 0.31], 0.8: [0.45, 0.46]})
    verdict = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10").verdict
    assert verdict.lowest_ipc == 0.8 and verdict.all_above_pass is None
    assert "; it is the highest IPC in the store; difference at 0.8 IPC +4.50 points" in verdict.message
    assert "every IPC above" not in verdict.message


def test_the_paper_baseline_only_when_asked_for(store):
    for seed, acc in enumerate([0.50, 0.52]):
        store(method="podd", ipc=0.4, seed=seed, accuracy=acc)
    for seed, acc in enumerate([0.55, 0.56]):
        store(method="podd", ipc=0.9, seed=seed, accuracy=acc)
    gathered = gather_runs(store.uri, "podd-sweep")
    # nothing measured at this schedule: no verdict, and it says how to get one
    plain = build_report(gathered, "cifar10")
    assert plain.verdict.state == "no-baseline" and plain.baseline is None
    assert "no finished RaT-BPTT 1-IPC runs at this schedule" in plain.verdict.message
    assert "--baseline paper" in plain.verdict.message
    report = build_report(gathered, "cifar10", baseline="paper")  # the paper's 53.2 +- 0.7
    assert report.baseline.source.startswith("the PoDD paper")
    assert report.baseline.accuracy == pytest.approx(0.532) and report.baseline.exact
    assert report.verdict.lowest_ipc == 0.9 and report.verdict.all_above_pass is None
    assert build_report(gathered, "cifar10", baseline="paper",
                        criterion="comparable").verdict.lowest_ipc == 0.9
    assert build_report(gathered, "cifar10", baseline="50").verdict.lowest_ipc == 0.4


def test_paper_baseline_by_the_runs_data_set_family(store):
    """A Parquet copy of CIFAR-10, named as the sweep named it, gets CIFAR-10's paper row."""
    copy = "parquet:../shared/datasets/cifar10-jpeg"
    for seed, acc in enumerate([0.54, 0.55]):
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, dataset=copy)
    report = build_report(gather_runs(store.uri, "podd-sweep"), copy, baseline="paper")
    assert report.dataset == copy and report.family == "cifar10"
    assert report.baseline.source.startswith("the PoDD paper")
    assert report.baseline.accuracy == pytest.approx(0.532)
    assert report.verdict.state == "pass" and report.verdict.lowest_ipc == 0.5


def test_paper_baseline_missing_for_the_family(store):
    store(method="rat-bptt", ipc=1.0, seed=0, accuracy=0.4, dataset="digits", family="digits")
    store(method="podd", ipc=0.5, seed=0, accuracy=0.4, dataset="digits", family="digits")
    gathered = gather_runs(store.uri, "podd-sweep")
    with pytest.raises(ReportError) as raised:
        build_report(gathered, "digits", baseline="paper")
    message = str(raised.value)
    assert message.startswith("the paper has no RaT-BPTT baseline for 'digits'")
    assert "rat-bptt 1-IPC runs" not in message  # the store has one: it was not asked for
    assert build_report(gathered, "digits").baseline.source.startswith("measured")


def test_single_run_baseline_says_its_std_is_unknown(store):
    # one rat-bptt run at 41 %: no std, so "comparable" cannot widen the bar below 41 %
    fill(store, {0.5: [0.405, 0.405]}, baseline=(0.41,))
    gathered = gather_runs(store.uri, "podd-sweep")
    report = build_report(gathered, "cifar10", criterion="comparable")
    assert report.baseline.runs == 1 and report.baseline.std is None
    assert report.baseline.source == ("measured: 1 rat-bptt 1-IPC run at this schedule (fixed "
                                      "labels); too few seeds to tell its std, so comparable = "
                                      "beats")
    assert report.verdict.state == "none-passes"
    assert "too few seeds to tell" in report.verdict.message
    assert "interval unknown: a side has one run" in report.verdict.message
    (schedule,) = json.loads(json.dumps(report.to_dict()))["schedules"]
    assert schedule["baseline"]["std"] is None
    assert schedule["verdict"]["per_ipc"][0]["difference_low"] is None


def test_nan_accuracy_run_is_left_out_not_averaged_and_its_configuration_fails(store):
    fill(store, {0.5: [0.42, 0.43]})
    broken = store(method="podd", ipc=0.5, seed=7, accuracy=float("nan"))
    store(method="podd", ipc=0.8, seed=0, accuracy=0.45, accuracy_std=float("nan"))
    store(method="podd", ipc=0.8, seed=1, accuracy=0.46)
    gathered = gather_runs(store.uri, "podd-sweep")
    assert gathered.nan_accuracy == [broken]
    report = build_report(gathered, "cifar10")
    assert report.left_out == {"nan-accuracy": [broken]}
    (at_half,) = [r for r in report.verdict.per_ipc if r.ipc == 0.5]
    assert at_half.accuracy == pytest.approx(0.425) and at_half.runs == 2
    assert at_half.passes is False  # a diverged seed fails its configuration

    result = runner.invoke(app, ["report", "--tracking-uri", store.uri, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert (f"1 finished run(s) with test accuracy NaN are left out (their configuration "
            f"counts as failing): {broken}") in " ".join(result.stderr.split())

    def no_nan(constant):
        raise AssertionError(f"{constant} in the JSON")

    data = json.loads(result.stdout, parse_constant=no_nan)["datasets"][0]
    assert data["left_out"] == {"nan-accuracy": [broken]}
    assert broken not in {r["run_id"] for r in data["runs"]}
    stds = {r["seed"]: r["test_accuracy_std"] for r in data["runs"] if r["ipc"] == 0.8}
    assert stds == {0: None, 1: 0.01}


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
    (schedule,) = data["schedules"]
    assert schedule["verdict"]["lowest_ipc"] == 0.5 and len(data["runs"]) == 6
    assert schedule["verdict"]["state"] == "pass" and data["left_out"]["running"]
    assert data["differing_settings"] == {} and schedule["label"] == ""
    runner.invoke(app, args + ["--format", "csv", "--output", str(tmp_path / "r.csv")])
    csv = pyarrow.csv.read_csv(tmp_path / "r.csv")
    assert csv.num_rows == 3
    assert {"passes", "best", "verdict", "lowest_ipc", "report", "baseline_source",
            "storage_bytes", "run_ids", "baseline_run_ids", "delta_low", "delta_high",
            "schedule", "settings", "schedule_label"} <= set(csv.column_names)
    assert set(csv.column("verdict").to_pylist()) == {"pass"}
    runner.invoke(app, args + ["--format", "parquet", "--output", str(tmp_path / "r.parquet")])
    back = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert len(back) == 3
    by = {(r["method"], r["ipc"]): r for r in back}
    assert by[("podd", 0.5)]["accuracy"] == pytest.approx(0.425) and by[("podd", 0.5)]["passes"]
    assert by[("podd", 0.5)]["run_ids"].count(" ") == 1  # both runs named
    assert by[("rat-bptt", 1.0)]["passes"] is None  # the baseline is not judged against itself
    assert by[("podd", 0.8)]["delta_to_baseline"] == pytest.approx(0.445 - 0.41)
    baseline_ids = by[("rat-bptt", 1.0)]["run_ids"]
    assert by[("podd", 0.5)]["baseline_run_ids"] == baseline_ids  # what it was judged against
    low, high = by[("podd", 0.8)]["delta_low"], by[("podd", 0.8)]["delta_high"]
    assert low < 0.445 - 0.41 < high

    assert by[("podd", 0.5)]["best"] and by[("podd", 0.5)]["report"] == "cifar10"

    failing = runner.invoke(app, args + ["--baseline", "60"])
    assert failing.exit_code == 1 and "no IPC passes" in failing.output


def test_exit_codes_and_plot_names_over_several_data_sets(store, tmp_path):
    fill(store, {0.5: [0.42, 0.43]})  # cifar10: passes against its measured baseline
    for seed, acc in enumerate([0.36, 0.37]):  # cifar100: no baseline measured
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, dataset="cifar100",
              family="cifar100")
    store(method="rat-bptt", ipc=1.0, seed=0, accuracy=0.05, dataset="cub200", family="cub200")
    store(method="podd", ipc=0.5, seed=0, accuracy=0.10, dataset="cub200", family="cub200")
    args = ["report", "--tracking-uri", store.uri, "--format", "json"]

    def run(*datasets, extra=()):
        chosen = [a for d in datasets for a in ("--dataset", d)]
        return runner.invoke(app, args + chosen + ["--plot", str(tmp_path / "acc.png"),
                                                   *extra])

    def states(result):
        return [s["verdict"]["state"] for d in json.loads(result.stdout)["datasets"]
                for s in d["schedules"]]

    unmeasured = run("cifar10", "cifar100")
    assert unmeasured.exit_code == 1 and states(unmeasured) == ["pass", "no-baseline"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["acc-cifar10.png",
                                                             "acc-cifar100.png"]
    # against the paper's 35.3 % (asked for), cifar100 passes
    assert run("cifar100", extra=["--baseline", "paper"]).exit_code == 0
    too_few = run("cifar10", "cub200")  # cub200: one run
    assert too_few.exit_code == 1, too_few.output  # no verdict for cub200: the state says why
    assert states(too_few) == ["pass", "too-few-runs"]
    both = runner.invoke(app, args + ["--baseline", "50", "--dataset", "cifar100",
                                      "--dataset", "cub200"])
    assert both.exit_code == 1, both.output
    assert states(both) == ["none-passes", "too-few-runs"]


def test_table_shows_storage_columns_and_full_run_ids(store):
    ids = [store(method="podd", ipc=0.5, seed=seed, accuracy=0.45, label_parameters=100)
           for seed in range(2)]
    many = [store(method="podd", ipc=0.8, seed=seed, accuracy=0.5) for seed in range(5)]
    result = runner.invoke(app, ["report", "--tracking-uri", store.uri, "--baseline", "40"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    header = [cell.strip() for cell in lines[top + 2].split("┃")[1:-1]]
    above = [cell.strip() for cell in lines[top + 1].split("┃")[1:-1]]
    columns = [f"{a} {h}".strip() for a, h in zip(above, header)]
    assert columns == ["#", "method", "IPC", "achieved", "by bytes", "poster px",
                       "label params", "bytes", "config", "accuracy %", "runs", "Δ baseline",
                       "95 % interval", "Δ control", "pass"]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in lines if line.startswith("│")]
    first_lines = {row[0]: row for row in rows if row[0]}  # by row number
    _, method, ipc, achieved, by_bytes, pixels, labels, size = first_lines["1"][:8]
    assert (method, ipc, achieved, pixels, labels) == ("podd", "0.5", "0.500", "5,120", "100")
    assert size == f"{(3 * 5120 + 100) * 4:,}" and by_bytes == f"{(3 * 5120 + 100) / 30720:.3f}"
    # whole run ids (usable in MLflow), the first three of a row, under the table
    assert f"#1: {' '.join(sorted(ids))}" in result.output
    assert f"#2: {' '.join(sorted(many)[:3])} (+2 more: --format json lists every one)" \
        in result.output


def test_plot_is_written_atomically(store, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    fill(store, {0.5: [0.42, 0.43]})
    args = ["report", "--tracking-uri", store.uri, "--plot", str(tmp_path / "acc.png")]
    assert runner.invoke(app, args).exit_code == 0
    before = (tmp_path / "acc.png").read_bytes()

    def torn_savefig(self, path, **kwargs):  # half a PNG, then a full disk
        with open(path, "wb") as f:
            f.write(before[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", torn_savefig)
    assert runner.invoke(app, args).exit_code != 0
    assert (tmp_path / "acc.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "acc.png" in p.name) == ["acc.png"]


def test_machine_formats_do_not_import_torch(store, tmp_path):
    """`report` must start fast: torch costs seconds and no report figure needs it."""
    import subprocess
    import sys

    fill(store, {0.5: [0.42, 0.43]})
    script = ("import sys\n"
              "from orchestrator.cli import app\n"
              "for fmt in ('json', 'csv', 'parquet'):\n"
              f"    args = ['report', '--tracking-uri', {store.uri!r}, '--format', fmt,\n"
              f"            '--output', {str(tmp_path)!r} + '/r.' + fmt]\n"
              "    try:\n"
              "        app(args)\n"
              "    except SystemExit as done:\n"
              "        assert done.code in (0, None), done.code\n"
              "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert {p.name for p in tmp_path.glob("r.*")} == {"r.json", "r.csv", "r.parquet"}


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet21k"], "unknown data set 'imagenet21k': this store has runs for cifar10"),
    (["--dataset", "cifar100"], "no finished runs for cifar100 in this store (it has cifar10)"),
    (["--sweep", "nope"], "no trial runs of sweep 'nope'"),
    (["--baseline", "lots"], "--baseline must be measured, paper or a number"),
    (["--criterion", "wins"], "--criterion must be one of beats, comparable"),
    (["--format", "xml"], "--format must be table, json, csv or parquet"),
    (["--experiment", "other"], "no experiment 'other'"),
    (["--output", "r.json"], "--output is for --format json, csv or parquet"),
])
def test_bad_input_is_one_line_exit_2(store, args, message):
    fill(store, {0.5: [0.42, 0.43]})
    result = runner.invoke(app, ["report", "--tracking-uri", store.uri] + args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.output


def test_several_sweeps_are_judged_together_and_a_misspelt_one_is_an_error(store):
    # the baseline in one sweep, PoDD in another (a study's second pass), a third left out
    for seed, acc in enumerate([0.40, 0.42]):
        store(method="rat-bptt", ipc=1.0, seed=seed, accuracy=acc, sweep="first")
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc + 0.05, sweep="second")
        store(method="podd", ipc=0.3, seed=seed, accuracy=0.90, sweep="other")
    args = ["report", "--tracking-uri", store.uri, "--format", "json", "--sweep", "first",
            "--sweep", "second"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["datasets"][0]
    (schedule,) = data["schedules"]
    assert schedule["verdict"]["lowest_ipc"] == 0.5 and len(data["runs"]) == 4
    assert {r["sweep"] for r in data["runs"]} == {"first", "second"}
    alone = runner.invoke(app, args[:-2])  # the baseline's sweep alone: nothing to judge
    assert alone.exit_code == 1, alone.output
    misspelt = runner.invoke(app, args + ["--sweep", "secnod"])
    assert misspelt.exit_code == 2
    assert misspelt.stderr.strip() == ("error: no trial runs of sweep 'secnod' in experiment "
                                       "'podd-sweep': check the name with `podd-sweep status`")


def test_store_that_does_not_exist(tmp_path):
    result = runner.invoke(app, ["report", "--tracking-uri", f"sqlite:///{tmp_path / 'no.db'}"])
    assert result.exit_code == 2 and "no MLflow store at" in result.stderr
    assert not (tmp_path / "no.db").exists()


def test_runs_still_running_are_named_not_launch_a_sweep(store):
    for seed in range(2):
        store(method="podd", ipc=0.5, seed=seed, accuracy=0.5, status="RUNNING",
              dataset="cifar100", family="cifar100")
    base = ["report", "--tracking-uri", store.uri]
    nothing_yet = runner.invoke(app, base)
    assert nothing_yet.exit_code == 2
    assert nothing_yet.stderr.strip() == ("error: no finished trial runs in experiment "
                                          "'podd-sweep' yet: 2 still RUNNING; report again "
                                          "when they finish")
    fill(store, {0.5: [0.42, 0.43]})  # cifar10 has finished runs, cifar100 still none
    named = runner.invoke(app, base + ["--dataset", "cifar100"])
    assert named.exit_code == 2
    assert named.stderr.strip() == ("error: no finished runs for cifar100 yet: 2 trial run(s) "
                                    "still RUNNING; report again when they finish")
    assert "launch a sweep" not in named.stderr


def _empty_file(path):
    path.write_bytes(b"")
    return f"sqlite:///{path}"


def _text_file(path):
    path.write_text("not a database\n")
    return f"sqlite:///{path}"


def _foreign_sqlite(path):
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE birds (name TEXT)")
    return f"sqlite:///{path}"


def _missing_folder(path):
    return path.with_name("no-such-mlruns").as_uri()


def _plain_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path.as_uri()


@pytest.mark.parametrize("make, message", [
    (_empty_file, "is not an MLflow store (an empty sqlite file)"),
    (_text_file, "is not an MLflow store (not a sqlite database)"),
    (_foreign_sqlite, "is a sqlite database but not an MLflow store"),
    (_missing_folder, "no MLflow store at"),
    (_plain_folder, "is not an MLflow file store"),
])
def test_a_store_that_is_not_mlflows_is_left_untouched(tmp_path, make, message):
    target = tmp_path / "store"
    uri = make(target)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    result = runner.invoke(app, ["report", "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    after = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    assert after == before and not (target / ".trash").exists()
    assert not target.with_name("no-such-mlruns").exists()


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
    assert fast.runs.num_rows == 5  # the NaN-accuracy run is left out by both readers
    assert (fast.running, fast.unusable) == (slow.running, slow.unusable) == (1, 0)
    assert len(fast.nan_accuracy) == 1 and fast.left_out == slow.left_out
    assert fast.runs.equals(slow.runs)
    assert gone not in fast.runs.column("run_id").to_pylist()


def test_significant_needs_the_whole_interval_above_zero(store):
    # 0.5 IPC: +1.5 points but noisy (interval straddles 0); 0.8 IPC: +4 points, tight
    fill(store, {0.5: [0.40, 0.45], 0.8: [0.45, 0.452]}, baseline=(0.41, 0.412))
    gathered = gather_runs(store.uri, "podd-sweep")
    beats = build_report(gathered, "cifar10").verdict
    assert beats.lowest_ipc == 0.5
    sure = build_report(gathered, "cifar10", criterion="significant").verdict
    assert sure.lowest_ipc == 0.8 and sure.state == "pass"
    by_ipc = {r.ipc: r for r in sure.per_ipc}
    assert by_ipc[0.5].passes is False and by_ipc[0.5].difference_low < 0
    assert by_ipc[0.8].difference_low > 0
    assert "beats (the whole 95 % interval above zero)" in sure.message
    # Welch's interval for 0.8 IPC by hand: means 0.451 vs 0.411, sd 0.001414 each, df 2
    half = 4.302652729911275 * (2 * 0.001414213562 ** 2 / 2) ** 0.5
    assert by_ipc[0.8].difference_low == pytest.approx(0.04 - half, abs=1e-6)


def test_budget_bytes_counts_learned_labels_as_storage(store):
    fill(store, {}, baseline=(0.40, 0.40))
    for seed in range(2):  # 0.5 IPC by pixels, 0.5 + 15360 label values' worth by bytes
        store(method="podd", ipc=0.5, seed=seed, accuracy=0.45, labels="learned",
              label_parameters=15360)
    by_pixels = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10").verdict
    assert by_pixels.lowest_ipc == 0.5
    by_bytes = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10",
                            budget="bytes").verdict
    assert by_bytes.lowest_ipc == pytest.approx(0.5 + 15360 / 30720)  # the labels' bytes count


def test_controls_show_the_gain_over_random_real_images(store):
    fill(store, {0.5: [0.42, 0.43]})
    for seed, acc in enumerate([0.20, 0.22]):
        store(method="random-real", ipc=0.5, seed=seed, accuracy=acc)
    schedule = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10").only()
    (result,) = schedule.verdict.per_ipc
    assert result.control_accuracy == pytest.approx(0.21)
    assert result.gain_over_control == pytest.approx(0.425 - 0.21)
    assert len(result.control_run_ids) == 2


def test_every_podd_row_shows_its_gain_over_the_control_of_its_own_cut(store):
    """Not only the best configuration at an IPC: each PoDD row is compared with its control
    (in the table's machine formats: CSV, Parquet and JSON rows), and only with a control cut
    as it was: a control of other patches or labels would credit distillation with the
    difference between the cuts."""
    from orchestrator.report_output import judged_rows

    fill(store, {0.5: [0.42, 0.43]})
    for seed, acc in enumerate([0.30, 0.32]):  # a second, worse configuration at 0.5 IPC
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, labels="learned")
    for seed, acc in enumerate([0.36, 0.38]):  # a third, whose cut no control has
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, patch_grid="8x3")
    for seed, acc in enumerate([0.20, 0.22]):
        store(method="random-real", ipc=0.5, seed=seed, accuracy=acc)
    for seed, acc in enumerate([0.25, 0.27]):  # learned labels start soft: another control
        store(method="random-real", ipc=0.5, seed=seed, accuracy=acc, labels="learned")
    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    podd = {(r["patch_grid"], r["labels"]): r for r in judged_rows(report, report.only())
            if r["method"] == "podd"}
    assert podd["16x6", "fixed"]["gain_over_control"] == pytest.approx(0.425 - 0.21)
    assert podd["16x6", "learned"]["gain_over_control"] == pytest.approx(0.31 - 0.26)
    assert podd["8x3", "fixed"]["gain_over_control"] is None
    assert podd["8x3", "fixed"]["control_run_ids"] == []
    assert all(r["baseline_run_ids"] for r in podd.values())
    assert all(len(r["control_run_ids"]) == 2 for k, r in podd.items() if k[0] == "16x6")

@pytest.mark.parametrize("failure", ["stopped-early", "nan", "diverged"])
def test_a_configuration_with_a_failed_seed_fails_on_the_seeds_that_survived(store, failure):
    """A seed a search stopped early (below the baseline's curve), one whose accuracy is NaN
    or one that diverged is not a seed to forget: averaging the survivors averages the lucky
    ones. The search counts such a configuration failing; so does the report."""
    from orchestrator.report_output import judged_rows

    fill(store, {0.7: [0.35, 0.36]}, baseline=(0.30, 0.31))
    if failure == "stopped-early":
        lost = store(method="podd", ipc=0.5, seed=0, accuracy=0.10, status="KILLED")
        store.client.set_tag(lost, STOPPED_EARLY_TAG, "below the baseline's curve at step 40")
    elif failure == "nan":
        lost = store(method="podd", ipc=0.5, seed=0, accuracy=float("nan"))
    else:  # as the recorder ends a trial whose loss went NaN
        lost = store(method="podd", ipc=0.5, seed=0, accuracy=0.10, status="FAILED")
        store.client.set_tag(lost, ERROR_TAG, "diverged, stopped: loss is nan at step 12")
    for seed, acc in ((1, 0.32), (2, 0.33)):
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc)
    for seed, acc in enumerate([0.31, 0.315]):  # another cut at 0.5 IPC, every seed finished
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, patch_grid="8x3")

    report = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    verdict = report.verdict
    by_ipc = {r.ipc: r for r in verdict.per_ipc}
    # the better-looking 16x6 (32.5 % on two survivors) is not the one judged at 0.5 IPC
    assert "8x3" in by_ipc[0.5].configuration and by_ipc[0.5].passes is True
    rows = {r["patch_grid"]: r for r in judged_rows(report, report.only())
            if r["method"] == "podd" and r["ipc"] == 0.5}
    assert rows["16x6"]["passes"] is False and rows["16x6"]["failed_run_ids"] == [lost]
    assert rows["8x3"]["failed_run_ids"] == [] and rows["8x3"]["passes"] is True
    assert verdict.lowest_ipc == 0.5

    # with no other cut, 0.5 IPC fails and the lowest passing IPC is 0.7
    alone = [r for r in gather_runs(store.uri, "podd-sweep").runs.to_pylist()
             if r["patch_grid"] == "8x3"]
    for run in alone:
        store.client.delete_run(run["run_id"])
    again = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    (half,) = [r for r in again.verdict.per_ipc if r.ipc == 0.5]
    assert half.passes is False and "1 seed(s) failed" in half.configuration
    assert again.verdict.lowest_ipc == 0.7


def test_runs_of_other_code_or_hardware_are_compared_and_named(store):
    """Where a run came from (engine revision, torch build, device, the data's content hash)
    is not a setting: runs that differ only there share a schedule, and the report says that
    they differ."""
    here = {"engine_revision": "0.1.0+gaaaaaaaaaa", "torch_version": "2.14.1",
            "device_used": "cpu", "data_hash": "45b10bbc7f186349"}
    for seed, acc in enumerate([0.40, 0.42]):
        store(method="rat-bptt", ipc=1.0, seed=seed, accuracy=acc, extra_params=here)
    for seed, acc in enumerate([0.42, 0.43]):
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc, extra_params=here)
    alike = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    assert alike.only().mixed_provenance == {}

    gpu = {**here, "device_used": "cuda (NVIDIA H100, TF32 convolutions)",
           "engine_revision": "0.1.0+gbbbbbbbbbb", "data_hash": "0123456789abcdef"}
    store(method="podd", ipc=0.5, seed=2, accuracy=0.44, extra_params=gpu)
    store(method="podd", ipc=0.7, seed=0, accuracy=0.44)  # older than the record
    mixed = build_report(gather_runs(store.uri, "podd-sweep"), "cifar10")
    assert len(mixed.schedules) == 1 and mixed.verdict.per_ipc[0].runs == 3
    assert mixed.only().mixed_provenance == {
        "engine_revision": ["(unrecorded)", "0.1.0+gaaaaaaaaaa", "0.1.0+gbbbbbbbbbb"],
        "torch_version": ["(unrecorded)", "2.14.1"],
        "device_used": ["(unrecorded)", "cpu", "cuda (NVIDIA H100, TF32 convolutions)"],
        "data_hash": ["(unrecorded)", "0123456789abcdef", "45b10bbc7f186349"]}
    table = runner.invoke(app, ["report", "--tracking-uri", store.uri])
    assert ("note: the runs compared here did not all run the same code or hardware, or read "
            "the same data") in " ".join(table.stdout.split())
    as_json = runner.invoke(app, ["report", "--tracking-uri", store.uri, "--format", "json"])
    (schedule,) = json.loads(as_json.stdout)["datasets"][0]["schedules"]
    assert schedule["mixed_provenance"]["device_used"][1] == "cpu"


def test_where_selects_failed_seeds_as_it_selects_runs(store):
    """A seed that failed in another sweep is not one of the runs `--where sweep=...` asks
    about; a crash (FAILED, not diverged) is the machinery's and fails nothing."""
    fill(store, {}, baseline=(0.30, 0.31))
    for seed, acc in ((1, 0.32), (2, 0.33)):
        store(method="podd", ipc=0.5, seed=seed, accuracy=acc)
    other = store(method="podd", ipc=0.5, seed=0, accuracy=float("nan"), sweep="other")
    crashed = store(method="podd", ipc=0.5, seed=3, accuracy=0.10, status="FAILED")
    store.client.set_tag(crashed, ERROR_TAG, "RuntimeError: out of memory")
    gathered = gather_runs(store.uri, "podd-sweep")
    everything = build_report(gathered, "cifar10").verdict.per_ipc[0]
    assert everything.passes is False and "1 seed(s) failed" in everything.configuration
    (mine,) = build_report(gathered, "cifar10", where={"sweep": "s"}).verdict.per_ipc
    assert mine.passes is True and "failed" not in mine.configuration
    assert gathered.failed_seeds("cifar10", {"sweep": "other"}) != {}
    assert other in sum(gathered.failed_seeds("cifar10").values(), [])
    assert crashed not in sum(gathered.failed_seeds("cifar10").values(), [])
