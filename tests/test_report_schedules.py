"""The report compares like with like, on stores written by real tiny sweeps (Ray Tune + the
MLflow recorder): several schedules in one store, each judged against its own baseline, and
data-set families found from the data, not from its shape."""

import json
from pathlib import Path

import pyarrow.csv
import pytest
from datafiles import write_parquet_dataset
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.report import build_report
from orchestrator.runs import ReportError, gather_runs, parse_where
from orchestrator.sweep import load_sweep
from orchestrator.tune import launch
from podd_engine.data import create_dataset

pytestmark = pytest.mark.usefixtures("ray_local")
runner = CliRunner()
TINY = dict(width=8, total_inner_steps=4, window=2, distill_batch=16, real_batch=64,
            real_chunk=64, eval_models=1, eval_steps=[20])
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


def run_sweep(folder: Path, name: str, body: str, settings: dict, dataset: str = "digits",
              patch_grid: str = "4x2") -> None:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\ndataset: {dataset}\nclass_order: identity\n"
                    f"patch_grid: {patch_grid}\nmax_concurrent: 2\ncheckpoint_every: 50\n"
                    f"storage: {folder / 'ray'}\ntracking_uri: sqlite:///{folder / 'mlflow.db'}\n"
                    f"settings: {json.dumps({**TINY, **settings})}\n" + body)
    outcome = launch(load_sweep(path, dataset_info=create_dataset), verbose=0)
    assert set(outcome.states.values()) == {"FINISHED"}, outcome.errors


def trial_ids(folder: Path, sweep: str, method: str) -> set[str]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("podd-sweep")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`podd.sweep` = '{sweep}' and tags.`podd.role` = 'trial'")
    return {r.info.run_id for r in runs if r.data.params["method"] == method}


@pytest.fixture(scope="module")
def schedules(tmp_path_factory):
    """One store, four sweeps: steps 4 with PoDD, the baseline and a random-real control;
    steps 6 with PoDD only; steps 8 with the baseline only; a control at another width."""
    folder = tmp_path_factory.mktemp("schedules")
    seeds = "seeds: [0, 1]\n"
    run_sweep(folder, "both", "ipc: [0.5, 1.0]\n" + seeds + "include:\n"
              "  - {method: rat-bptt, ipc: 1}\n  - {method: random-real, ipc: 0.5}\n", {"steps": 4})
    run_sweep(folder, "podd-only", "ipc: 0.5\n" + seeds, {"steps": 6})
    run_sweep(folder, "baseline-only", "method: rat-bptt\nipc: 1\n" + seeds, {"steps": 8})
    run_sweep(folder, "control-elsewhere", "method: random-real\nipc: 0.5\nseeds: [0]\n",
              {"steps": 4, "width": 12})
    return folder


def test_each_schedule_is_judged_against_its_own_baseline(schedules):
    uri = f"sqlite:///{schedules / 'mlflow.db'}"
    report = build_report(gather_runs(uri, "podd-sweep"), "digits")
    assert report.differing == {"steps": ["4", "6", "8"]}  # the control's width is not a schedule
    by_label = {s.label: s for s in report.schedules}
    assert sorted(by_label) == ["steps=4", "steps=6", "steps=8"]

    both = by_label["steps=4"]
    assert set(both.baseline.run_ids) == trial_ids(schedules, "both", "rat-bptt")
    shown = set(run for ids in both.groups.column("run_ids").to_pylist() for run in ids)
    assert shown == (trial_ids(schedules, "both", "podd") | trial_ids(schedules, "both",
                                                                    "rat-bptt")
                     | trial_ids(schedules, "both", "random-real"))  # nothing of the others
    for result in both.verdict.per_ipc:  # pass iff the mean reaches this schedule's baseline
        assert result.passes == (result.accuracy >= both.baseline.accuracy - 1e-9)
        assert result.difference == pytest.approx(result.accuracy - both.baseline.accuracy)
    half = next(r for r in both.verdict.per_ipc if r.ipc == 0.5)
    assert set(half.control_run_ids) == trial_ids(schedules, "both", "random-real")
    assert half.gain_over_control == pytest.approx(half.accuracy - half.control_accuracy)
    assert both.verdict.state in ("pass", "none-passes")

    # PoDD at 6 steps has no baseline at 6 steps: no verdict, never the 4-step baseline's
    alone = by_label["steps=6"]
    assert alone.verdict.state == "no-baseline" and alone.baseline is None
    assert "(steps=6)" in alone.verdict.message and "--baseline paper" in alone.verdict.message
    # a baseline with no PoDD runs at its schedule has nothing to judge
    assert by_label["steps=8"].verdict.state == "too-few-runs"
    assert "no finished PoDD runs" in by_label["steps=8"].verdict.message


def test_where_narrows_to_one_schedule_and_the_paper_is_asked_for(schedules):
    gathered = gather_runs(f"sqlite:///{schedules / 'mlflow.db'}", "podd-sweep")
    six = build_report(gathered, "digits", where=parse_where(["steps=6"]))
    (only,) = six.schedules
    assert only.label == "" and six.differing == {} and only.verdict.state == "no-baseline"
    given = build_report(gathered, "digits", where=parse_where(["steps=6"]), baseline="5")
    assert given.verdict.state == "pass" and given.baseline.source.startswith("given")
    with pytest.raises(ReportError, match="the paper has no RaT-BPTT baseline for 'digits'"):
        build_report(gathered, "digits", baseline="paper")
    with pytest.raises(ReportError, match="no runs of digits match --where steps=5"):
        build_report(gathered, "digits", where=parse_where(["steps=5"]))
    with pytest.raises(ReportError, match="--where: unknown setting 'stpes'"):
        parse_where(["stpes=4"])


def test_cli_names_the_schedules_in_every_format(schedules, tmp_path):
    args = ["report", "--tracking-uri", f"sqlite:///{schedules / 'mlflow.db'}"]
    table = runner.invoke(app, args)
    assert table.exit_code == 1, table.output  # two of the three schedules have no verdict
    assert "digits: 3 schedules, told apart by steps: 4 | 6 | 8" in table.output
    assert "verdict: digits [steps=6]: no verdict" in table.output
    as_json = json.loads(runner.invoke(app, args + ["--format", "json"]).stdout)
    (data,) = as_json["datasets"]
    assert [s["label"] for s in data["schedules"]] == ["steps=4", "steps=6", "steps=8"]
    assert data["schedules"][0]["settings"]["steps"] == "4"
    # JSON rows say what each was judged against, as the CSV's do (run ids as lists)
    json_judged = [r for r in data["schedules"][0]["groups"] if r["method"] == "podd"]
    assert json_judged and all(
        set(r["baseline_run_ids"]) == trial_ids(schedules, "both", "rat-bptt")
        and r["role"] == "poster" and r["passes"] in (True, False) for r in json_judged)
    runner.invoke(app, args + ["--format", "csv", "--output", str(tmp_path / "r.csv")])
    rows = pyarrow.csv.read_csv(tmp_path / "r.csv").to_pylist()
    assert {r["schedule_label"] for r in rows} == {"steps=4", "steps=6", "steps=8"}
    judged = [r for r in rows if r["method"] == "podd" and r["schedule_label"] == "steps=4"]
    assert judged and all(r["baseline_run_ids"] for r in judged)
    narrowed = runner.invoke(app, args + ["--where", "steps=4"])
    assert "schedules, told apart" not in narrowed.output
    # --where is repeatable: every condition must hold
    both = json.loads(runner.invoke(app, args + ["--where", "steps=4", "--where", "sweep=both",
                                                 "--format", "json"]).stdout)
    assert [s["label"] for s in both["datasets"][0]["schedules"]] == [""]
    none = runner.invoke(app, args + ["--where", "steps=4", "--where", "sweep=podd-only"])
    assert none.exit_code == 2 and "match --where steps=4 sweep=podd-only" in none.stderr
    bad = runner.invoke(app, args + ["--where", "steps"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --where must be KEY=VALUE")


def test_a_look_alike_data_set_is_not_cifar10(tmp_path):
    """Two 10-class 32x32 sets in one store: one with CIFAR-10's class names (a copy of it),
    one with digits for names (an SVHN-like set). Only the copy is CIFAR-10."""
    write_parquet_dataset(tmp_path / "c10", classes=CIFAR10_NAMES, size=(32, 32), n_train=40,
                          n_test=20)
    write_parquet_dataset(tmp_path / "svhn", classes=tuple(str(d) for d in range(10)),
                          size=(32, 32), n_train=40, n_test=20)
    copy, other = f"parquet:{tmp_path / 'c10'}", f"parquet:{tmp_path / 'svhn'}"
    run_sweep(tmp_path, "look-alike", "ipc: 1\nseeds: [0, 1]\ninclude:\n"
              "  - {method: rat-bptt, ipc: 1}\n", {"steps": 2},
              dataset=f"['{copy}', '{other}']", patch_grid="8x3")
    gathered = gather_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "podd-sweep")
    assert sorted(set(gathered.runs.column("dataset").to_pylist())) == ["cifar10", other]
    cifar = build_report(gathered, "cifar10")
    assert set(cifar.runs.column("dataset_source").to_pylist()) == {copy}
    assert cifar.family == "cifar10"
    look_alike = build_report(gathered, other)
    assert look_alike.family == other and look_alike.verdict.state in ("pass", "none-passes")
    with pytest.raises(ReportError, match=f"the paper has no RaT-BPTT baseline for '{other}'"):
        build_report(gathered, other, baseline="paper")
    # against the paper's figure, only the copy of CIFAR-10 can be judged
    assert build_report(gathered, "cifar10", baseline="paper").baseline.accuracy == 0.532
