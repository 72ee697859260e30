"""`search: lowest-passing` as real sweeps on Ray Tune (digits, tiny trials): its answer is the
report's over the runs it made, it resumes after a killed driver without running a trial
twice, and it stops trials early against the baseline's curve."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.search import make_plan
from orchestrator.sweep import load_sweep
from orchestrator.trial_outcome import FINISHED, Outcome
from orchestrator.tune import launch
from podd_engine.data import create_dataset

pytestmark = pytest.mark.usefixtures("ray_local")
runner = CliRunner()

SEARCH = """name: {name}
dataset: digits
method: podd
ipc: [0.25, 0.5, 1.0, 1.5, 2.0]
patch_grid: 4x2
class_order: identity
seeds: {seeds}
settings: {{width: 8, steps: 40, total_inner_steps: 4, window: 2, distill_batch: 8,
           real_batch: 64, real_chunk: 64, eval_models: 1, eval_steps: [50]{extra}}}
include: {include}
search: {search}
resources: {{cpu: 1}}
max_concurrent: 2
checkpoint_every: 10
log_every: 5
storage: {folder}/ray
tracking_uri: sqlite:///{folder}/mlflow.db
"""


def write(folder: Path, name: str, extra: str = "", tail: str = "",
          include: str = "[{method: rat-bptt, ipc: 1}]", seeds: str = "[0, 1, 2]",
          search: str = "lowest-passing") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SEARCH.format(name=name, folder=folder, extra=extra, include=include,
                                  seeds=seeds, search=search) + tail)
    return path


def trial_runs(folder: Path, sweep: str) -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("podd-sweep")
    if experiment is None:  # the store is there, its experiment not yet
        return []
    return client.search_runs([experiment.experiment_id],
                              f"tags.`podd.sweep` = '{sweep}' and tags.`podd.role` = 'trial'")


def replayed(sweep, runs) -> tuple[set[str], float | None]:
    """The planner run from scratch on the recorded accuracies: the trials it would start and
    its answer. A search that resumed right started exactly these."""
    accuracy = {r.data.tags["podd.trial_key"]: r.data.metrics["test_accuracy"] for r in runs}
    (problem,) = sweep.search_problems()
    outcomes: dict[str, Outcome] = {}
    while plan := make_plan(problem, outcomes):
        if not plan.to_run:
            return set(outcomes), plan.answer
        outcomes |= {k: Outcome(FINISHED, accuracy[k]) for k in plan.to_run}


def test_a_search_answers_as_the_report_does_with_part_of_the_grid(tmp_path):
    spec = write(tmp_path, "search")
    sweep = load_sweep(spec, dataset_info=create_dataset)
    outcome = launch(sweep, verbose=0)
    runs = trial_runs(tmp_path, "search")
    (search,) = outcome.search["searches"]
    assert search["state"] == "pass" and search["done"]
    assert len(runs) == search["trials_run"] < len(sweep.trials) == 18
    keys = [r.data.tags["podd.trial_key"] for r in runs]
    assert len(keys) == len(set(keys)) and {r.info.status for r in runs} == {"FINISHED"}
    assert replayed(sweep, runs) == (set(keys), search["answer"])
    report = runner.invoke(app, ["report", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                                 "--format", "json"])
    (dataset,) = json.loads(report.stdout)["datasets"]
    (schedule,) = dataset["schedules"]
    assert schedule["verdict"]["lowest_ipc"] == search["answer"]  # the grid's rule, same runs
    assert dataset["searches"][0]["answer"] == search["answer"]
    status = runner.invoke(app, ["status", "search", "--tracking-uri",
                                 f"sqlite:///{tmp_path}/mlflow.db"])
    assert f"search digits, podd: {search['answer']:g} IPC is the lowest" in status.stdout
    assert "not needed" in status.stdout


def test_a_killed_search_resumes_to_the_same_answer_running_no_trial_twice(tmp_path):
    spec = write(tmp_path, "killed")
    cli = str(Path(sys.executable).with_name("podd-sweep"))
    first = subprocess.Popen([cli, "launch", str(spec), "--quiet"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 300
    while True:  # once the baseline is in and a poster trial is half-way: SIGKILL it all
        assert time.time() < deadline and first.poll() is None, "the moment never came"
        runs = trial_runs(tmp_path, "killed") if (tmp_path / "mlflow.db").exists() else []
        done = [r for r in runs if r.info.status == "FINISHED"]
        if len(done) >= 3 and any(r.info.status == "RUNNING" for r in runs):
            break
        time.sleep(0.2)
    for pid in [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
        try:
            if os.getsid(pid) == first.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    first.wait()
    sweep = load_sweep(spec, dataset_info=create_dataset)
    outcome = launch(sweep, verbose=0)  # the same sweep again
    assert outcome.resumed
    assert set(outcome.tune_trials.values()) == {1}  # no key handed to Tune twice
    runs = trial_runs(tmp_path, "killed")
    keys = [r.data.tags["podd.trial_key"] for r in runs]
    assert len(keys) == len(set(keys)) and {r.info.status for r in runs} == {"FINISHED"}
    (search,) = outcome.search["searches"]
    assert replayed(sweep, runs) == (set(keys), search["answer"])
    assert search["done"] and search["trials_run"] == len(keys)


def test_early_stopping_against_the_baselines_curve(tmp_path):
    spec = write(tmp_path, "early", extra=", eval_every: 10",
                 tail="early_stop: {margin_points: 0}\n")
    sweep = load_sweep(spec, dataset_info=create_dataset)
    outcome = launch(sweep, verbose=0)
    stopped = [name for name, state in outcome.states.items() if state == "STOPPED-EARLY"]
    assert stopped  # tiny posters at step 10 are far below the baseline at step 10
    runs = {r.info.run_name: r for r in trial_runs(tmp_path, "early")}
    for name in stopped:
        run = runs[name]
        reason = run.data.tags["podd.stopped_early"]
        assert run.info.status == "KILLED" and reason.startswith("stopped early at outer step")
        assert "test_accuracy" in run.data.metrics  # its evaluation at the step it stopped
        step = int(reason.split("outer step ")[1].split(":")[0])
        assert step < 40 and max(m.step for m in MlflowClient(
            f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run.info.run_id,
                                                                  "loss")) < 40
    report = runner.invoke(app, ["report", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert f"{len(stopped)} run(s) a search stopped early" in report.stderr
    (search,) = outcome.search["searches"]
    stopped_ipcs = {float(n.split("-ipc")[1].split("-")[0]) for n in stopped}
    assert all(p[1] == "fail" for p in search["probes"] if p[0] in stopped_ipcs)


@pytest.mark.parametrize("change, field, words", [
    ({"include": "[]"}, "include", "needs the baseline at every schedule"),
    ({"seeds": "[0]"}, "(top level)", "at least 2 seeds"),
    ({"tail": "search_axes: [patch_grid]\n"}, "(top level)", "must include ipc"),
    ({"tail": "early_stop: {margin_points: 2}\n"}, "early_stop", "set settings.eval_every"),
    ({"include": "[{method: rat-bptt, ipc: 1}, {method: random-real}]"}, "method",
     "run it in a grid sweep"),
])
def test_a_search_that_cannot_run_is_one_line_before_anything_starts(tmp_path, change, field,
                                                                      words):
    spec = write(tmp_path, "bad", **change)
    result = runner.invoke(app, ["launch", str(spec), "--dry-run"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and words in line
    assert f": {field}:" in line
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_search_settings_in_a_grid_are_refused(tmp_path):
    spec = write(tmp_path, "grid", search="grid", tail="parallel_probes: 2\n")
    result = runner.invoke(app, ["launch", str(spec), "--dry-run"])
    assert result.exit_code == 2 and "parallel_probes is a setting of a search" in result.stderr


def test_dry_run_shows_the_expected_and_worst_trial_counts(tmp_path):
    result = runner.invoke(app, ["launch", str(write(tmp_path, "dry")), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "search: lowest-passing (beats)" in text
    assert "digits, podd: expected" in text and "of 18 trials" in text
    assert "at most 12 trials when every probe needs every seed" in text
    assert "rounds one after another" in text
