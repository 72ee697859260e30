"""The fidelity study's summary (benchmarks/fidelity/run.py): each claim's table takes the runs
of its own sweeps, so one claim's runs never stand in for another's at a shared schedule."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import record_trial, store  # noqa: F401  (the fixture)

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity" / "run.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("fidelity_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_c1_takes_its_own_sweeps_and_c2_judges_its_own_baseline(store, study):
    c1, c2 = "fidelity-c1-balanced", "fidelity-c2-ipc"
    for seed, (podd, base) in enumerate([(0.30, 0.32), (0.31, 0.33)]):
        store(method="podd", ipc=1.0, seed=seed, accuracy=podd, sweep=c1)
        store(method="rat-bptt", ipc=1.0, seed=seed, accuracy=base, sweep=c1)
        store(method="podd", ipc=1.0, seed=seed, accuracy=podd, sweep=c1, patch_grid="10x4")
    # C2 at the same schedule: its 1-IPC PoDD run must not join the C1 curve's point
    store(method="podd", ipc=1.0, seed=2, accuracy=0.10, sweep=c2)
    store(method="podd", ipc=0.5, seed=0, accuracy=0.08, sweep=c2)
    for seed in (0, 1):
        store(method="rat-bptt", ipc=1.0, seed=seed, accuracy=0.20, sweep=c2)

    (row,) = study.c1_rows(store.uri)
    assert (row["podd_runs"], row["baseline_runs"]) == (2, 2)
    assert row["podd"] == pytest.approx(0.305) and row["baseline"] == pytest.approx(0.325)

    rows = {r["ipc"]: r for r in study.c2_rows(store.uri)}
    assert set(rows) == {0.5, 1.0}  # 1 IPC is a point of C2's curve too
    assert rows[1.0]["podd"] == pytest.approx(0.10) and rows[1.0]["podd_runs"] == 1
    assert rows[0.5]["baseline"] == pytest.approx(0.20) and rows[0.5]["baseline_runs"] == 2
    assert study.c2_rows(store.uri, sweeps=("fidelity-not-run",)) == []


def test_c2_reads_its_two_passes_together_one_row_per_label_mode(store, study, tmp_path):
    first, second, pooling, *_ = study.C2_SWEEPS
    store(method="rat-bptt", ipc=1.0, seed=0, accuracy=0.30, sweep=first)
    store(method="rat-bptt", ipc=1.0, seed=1, accuracy=0.32, sweep=first)
    store(method="rat-bptt", ipc=1.0, seed=2, accuracy=0.34, sweep=second)
    store(method="podd", ipc=0.3, seed=0, accuracy=0.16, sweep=first, labels="fixed")
    for seed, acc in enumerate([0.20, 0.22]):
        store(method="podd", ipc=0.3, seed=seed, accuracy=acc, sweep=second, labels="learned")
    store(method="podd", ipc=0.3, seed=0, accuracy=0.25, sweep=pooling, labels="learned",
          extra_params={"label_pooling": "array"})
    store(method="podd", ipc=0.3, seed=9, accuracy=0.99, sweep="fidelity-c3-order")

    rows = study.c2_rows(store.uri)
    assert [(r["ipc"], r["label_mode"], r["podd_runs"]) for r in rows] == [
        (0.3, "fixed", 1), (0.3, "learned, array pooling", 1),
        (0.3, "learned, poster pooling", 2)]  # each label mode its own row, not the best
    fixed, by_array, learned = rows
    assert by_array["podd"] == pytest.approx(0.25) and by_array["sweeps"] == [pooling]
    assert fixed["baseline_runs"] == 3 and fixed["baseline"] == pytest.approx(0.32)
    assert fixed["sweeps"] == [first] and learned["sweeps"] == [second]
    assert learned["podd"] == pytest.approx(0.21)
    assert learned["gap_low"] < learned["gap"] < learned["gap_high"]
    study.plot_c2(rows, tmp_path / "c2.png")
    assert (tmp_path / "c2.png").read_bytes()[:4] == b"\x89PNG"


def test_patch_grids_keep_earlier_rows_this_store_lacks(store, study, tmp_path):
    sweep = "fidelity-c1-patches-small"
    for seed in (0, 1):
        store(method="rat-bptt", ipc=1.0, seed=seed, accuracy=0.30, sweep=sweep)
    store(method="podd", ipc=1.0, seed=0, accuracy=0.28, sweep=sweep, patch_grid="20x8")
    store(method="podd", ipc=1.0, seed=0, accuracy=0.29, sweep=sweep, patch_grid="8x3")
    (row,) = [r for r in study.grid_rows(store.uri) if r["patch_grid"] == "20x8"]
    assert row["patches"] == 160 and row["gap"] == pytest.approx(-0.02)

    earlier = tmp_path / "c1-grids.json"  # an earlier store's grids, at the same schedule
    old = [{**row, "patch_grid": "10x4", "podd": 0.31, "podd_runs": 3},
           {**row, "patch_grid": "20x8", "podd": 0.50}]
    earlier.write_text(json.dumps({"claim": "c1", "rows": old}))
    grids = study.merged(study.grid_rows(store.uri), earlier, study.grid_key)
    assert sorted((r["patch_grid"], r["podd"]) for r in grids) == [
        ("10x4", 0.31), ("20x8", pytest.approx(0.28)), ("8x3", pytest.approx(0.29))]
    assert [r.get("from_earlier_summary", False) for r in grids if r["patch_grid"] == "10x4"] \
        == [True]
    study.plot_grids(grids, tmp_path / "grids.png")
    assert (tmp_path / "grids.png").read_bytes()[:4] == b"\x89PNG"


def test_c3_correlates_the_orders_score_with_accuracy(store, study, tmp_path):
    sweep = "fidelity-c3-order"
    summed = [8.0, 7.5, 7.0, 6.5]  # lower summed distance = higher score
    for seed, (distance, acc) in enumerate(zip(summed, [0.20, 0.21, 0.23, 0.24])):
        store(method="podd", ipc=0.3, seed=seed, accuracy=acc, sweep=sweep,
              extra_params={"order": "random", "order_score": distance})
    result = study.c3_rows(store.uri)
    assert [p["summed_distance"] for p in result["points"]] == summed
    assert result["points"][0]["order_score"] == pytest.approx(1 / 8.0)
    assert result["correlation"]["n"] == 4 and result["correlation"]["r"] > 0.95
    study.plot_c3(result, tmp_path / "c3.png")
    assert (tmp_path / "c3.png").read_bytes()[:4] == b"\x89PNG"


def run_script(*args: str) -> tuple[int, list[str]]:
    """run.py as a user runs it: its exit code and its non-blank stderr lines."""
    done = subprocess.run([sys.executable, str(RUN_PY), *args], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


def test_summary_without_a_store_is_one_line_and_writes_nothing(tmp_path):
    """A fresh clone has the committed results but not the study's store: the summary says so
    in one line (exit 2) instead of a traceback, and writes no half summary."""
    out = tmp_path / "out"
    code, lines = run_script("summary", "--tracking-uri", f"sqlite:///{tmp_path / 'nowhere.db'}",
                             "--json", str(out / "c1.json"), "--plot", str(out / "c1.png"))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: --tracking-uri: no MLflow store")
    assert "docs/results/fidelity" in lines[0]
    assert not out.exists() and not (tmp_path / "nowhere.db").exists()


def test_a_claim_that_is_not_one_is_one_line():
    code, lines = run_script("launch", "c9")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: argument claim: invalid choice: 'c9'")


def test_the_runs_record_keeps_where_each_run_came_from(store, study, tmp_path):
    """runs.jsonl outlives the store: each run keeps its provenance (a run resumed on other
    code as 'A then B'; a run older than the record without it), merged by run id."""
    here = {"engine_revision": "0.1.0+code.a", "torch_version": "2.14.1",
            "device_used": "cpu", "data_hash": "45b10bbc7f186349", "engine_commit": "c0ffee"}
    plain = store(method="podd", ipc=1.0, seed=0, accuracy=0.3, extra_params=here)
    resumed = store(method="podd", ipc=1.0, seed=1, accuracy=0.3, extra_params=here)
    store.client.set_tag(resumed, "podd.provenance_history",
                         json.dumps({"engine_revision": ["0.1.0+code.a", "0.1.0+code.b"]}))
    older = store(method="podd", ipc=1.0, seed=2, accuracy=0.3)
    path = tmp_path / "runs.jsonl"
    study.export_runs(store.uri, path)
    study.export_runs(store.uri, path)  # merged by run id: no line twice
    lines = {r["run_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert len(lines) == 3
    assert {k: lines[plain][k] for k in here} == here
    assert lines[resumed]["engine_revision"] == "0.1.0+code.a then 0.1.0+code.b"
    assert not {"engine_revision", "data_hash"} & lines[older].keys()
