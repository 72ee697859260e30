"""The methods registry: a method registered from outside the project (here, from this test)
runs through the spec, the engine and the report with no edit of any project file, and the
report keeps it apart from PoDD."""

import json
from dataclasses import dataclass
from functools import cached_property

import pytest
import torch

from orchestrator.report import build_report
from orchestrator.runs import gathered_from
from orchestrator.spec import parse_spec
from orchestrator.sweep import expand
from orchestrator.store import KEY_TAG, SWEEP_TAG, RunRecord
from podd_engine import distill
from podd_engine.data import create_dataset
from podd_engine.methods import POSTER, Method, get_method, register_method, unregister_method
from podd_engine.pipeline import build_geometry
from podd_engine.poster import PosterGeometry
from test_pipeline import tiny


@dataclass(frozen=True)
class RowMajorGeometry(PosterGeometry):
    """PoDD's patches, numbered row by row instead of column by column."""

    @cached_property
    def patch_positions(self) -> torch.Tensor:
        positions = PosterGeometry.patch_positions.func(self)
        order = sorted(range(len(positions)), key=lambda i: tuple(positions[i].tolist()))
        return positions[order]


def row_major_geometry(config, dataset):
    g = build_geometry(config.replace(method="podd"), dataset)
    return RowMajorGeometry(g.channels, g.image_size, g.num_classes, g.class_grid, g.patch_grid,
                            g.poster_size, g.requested_ipc)


@pytest.fixture
def toy_method():
    register_method(Method("podd-rowmajor", "PoDD with its patches numbered row-major", POSTER,
                           geometry=row_major_geometry))
    yield "podd-rowmajor"
    unregister_method("podd-rowmajor")


def as_record(result, seed) -> RunRecord:
    """A finished run as the recorder writes it: every setting and the trial's facts."""
    config = result.trial.config
    params = {k: v if isinstance(v, str) else json.dumps(v)
              for k, v in {**config.to_dict(), **result.trial.summary()}.items()
              if v is not None}
    run_id = f"{config.method}-{config.ipc:g}-{seed}"
    return RunRecord(run_id, run_id, "FINISHED", params,
                     {"test_accuracy": result.evaluation.mean(),
                      "test_accuracy_std": result.evaluation.std()},
                     {SWEEP_TAG: "toy", KEY_TAG: config.key()})


def test_a_method_registered_from_a_test_runs_and_is_judged_on_its_own(toy_method):
    digits = create_dataset("digits")
    # the spec takes it like any method
    (planned,) = expand(parse_spec(f"name: t\ndataset: digits\nipc: 1\nmethod: {toy_method}\n"
                                   f"patch_grid: 8x3\nclass_order: identity\n"),
                        dataset_info=lambda name: digits)
    assert planned.config.method == toy_method and planned.achieved_ipc == 1.0
    # the engine runs it with its own geometry
    runs = []
    for method in ("podd", toy_method, "rat-bptt"):
        for seed in (0, 1):
            result = distill(tiny(method=method, seed=seed, steps=2), digits)
            assert 0 <= result.evaluation.mean() <= 1
            runs.append(as_record(result, seed))
    toy_geometry = row_major_geometry(tiny(), digits)
    assert isinstance(toy_geometry, RowMajorGeometry)
    assert not torch.equal(toy_geometry.patch_positions,
                           build_geometry(tiny(), digits).patch_positions)
    assert get_method(toy_method).role == POSTER
    # the report gives it a verdict of its own, never mixed with PoDD's configurations
    report = build_report(gathered_from(runs), "digits")
    by_label = {s.label: s for s in report.schedules}
    assert sorted(by_label) == ["method=podd", f"method={toy_method}"]
    for method, schedule in ((m, by_label[f"method={m}"]) for m in ("podd", toy_method)):
        judged = {i for r in schedule.verdict.per_ipc for i in r.run_ids}
        assert judged == {f"{method}-1-0", f"{method}-1-1"}
        assert set(schedule.baseline.run_ids) == {"rat-bptt-1-0", "rat-bptt-1-1"}
