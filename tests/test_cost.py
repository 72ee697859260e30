"""The cost shown before a launch (orchestrator/cost.py): the work each trial does and the
estimate built on it, and the bill `launch --dry-run` prints."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.cost import SweepCost, TrialCost, trial_cost
from orchestrator.sweep import PlannedTrial
from podd_engine.config import make_config

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "results" / "cost-fit.json"


def planned(images=96, **settings):
    return PlannedTrial(make_config("cpu-small", dataset="digits", **settings), {}, images=images)


def test_the_work_follows_the_schedule_the_batch_and_the_share():
    base = trial_cost(planned(), gpus=0, cpus=1)
    assert (base.outer_steps, base.inner_steps, base.eval_work) == (300, "5/20", "3 x 2000")
    longer = trial_cost(planned(steps=600), gpus=0, cpus=1)
    evaluation = 3 * (2000 * 2 * 96 + 4 * 10_000)
    assert longer.passes - evaluation == pytest.approx(2 * (base.passes - evaluation))
    assert trial_cost(planned(images=10), gpus=0, cpus=1).passes < base.passes / 3
    two_cores = trial_cost(planned(), gpus=0, cpus=2)
    assert two_cores.seconds < base.seconds * 0.55
    assert trial_cost(planned(), gpus=1, cpus=4).device == "cuda"
    assert trial_cost(planned(width=64), gpus=0, cpus=1).seconds > 2 * base.seconds
    eval_every = trial_cost(planned(eval_every=100), gpus=0, cpus=1)
    assert eval_every.passes == pytest.approx(base.passes + 3 * evaluation)
    # a pass costs about its pixels: 8 x 8 digits, 16 times fewer than 32 x 32 (setup aside)
    small = trial_cost(PlannedTrial(planned().config, {}, images=96, image_pixels=64), gpus=0,
                       cpus=1)
    assert small.passes == base.passes
    assert small.seconds - 40 == pytest.approx((base.seconds - 40) / 16)


def test_the_estimate_is_within_35_percent_of_the_measured_cpu_trials():
    """The figures the constants were fitted to: a refit that drifts fails here."""
    for t in json.loads(FIGURES.read_text())["trials"]:
        trial = planned(96 if t["method"] == "podd" else 10, method=t["method"],
                        total_inner_steps=t["total_inner_steps"], window=t["window"],
                        width=t["width"])
        estimate = trial_cost(trial, gpus=0, cpus=1).seconds
        assert abs(estimate / t["seconds"] - 1) < 0.35, (t, estimate)


def test_wall_time_packs_the_longest_trials_first():
    costs = SweepCost([TrialCost(1, "", "", 0, s, "cpu") for s in (3600, 3600, 1800, 1800)],
                      2)
    assert costs.trial_hours == 3.0 and costs.wall_hours(2) == 1.5 and costs.wall_hours(1) == 3


def test_dry_run_shows_each_trials_cost_and_the_bill(tmp_path):
    spec = tmp_path / "c.yaml"
    spec.write_text("name: c\ndataset: digits\nclass_order: identity\npatch_grid: 4x2\n"
                    "ipc: [0.5, 1.0]\nseeds: [0, 1]\nmax_concurrent: 2\n"
                    "settings: {width: 8, steps: 50, eval_models: 1, eval_steps: [20]}\n"
                    f"storage: {tmp_path / 'ray'}\n")
    result = CliRunner().invoke(app, ["launch", str(spec), "--dry-run"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "outer steps" in result.output and "est. time" in result.output
    text = " ".join(result.output.split())
    assert "estimated cost:" in text and "trial-hours (200 outer steps in all)" in text
    assert "the dev VM's CPU figures" in text
    gpu = CliRunner().invoke(app, ["launch", str(spec), "resources.gpu=1", "--dry-run"],
                             env={"COLUMNS": "250"})
    assert "three H100 figures" in " ".join(gpu.output.split()), gpu.output
