"""The answer sweeps are run for: per data set, the lowest IPC whose PoDD posters beat the 1-IPC
RaT-BPTT baseline, with the evidence (every figure traceable to MLflow run ids or to the
paper's table).

    gathered = gather_runs(tracking_uri, "podd-sweep")  # .runs: pyarrow, one row per trial run
    for dataset in datasets_in(gathered.runs):
        report = build_report(gathered, dataset)        # groups over seeds + baseline + verdict
        print(report.verdict.state, report.verdict.message)  # pass | none-passes | too-few-runs
    sys.exit(exit_code([report.verdict.state, ...]))    # 0 pass, 1 none passes, 3 too few runs
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.store import (DATASET_TAG, KEY_TAG, ROLE_TAG, SWEEP_TAG, RunRecord, open_store,
                                run_records, search_all)

# RaT-BPTT at 1 IPC as reported in the PoDD paper (Table 2), test accuracy in %, mean +- std.
PAPER_BASELINES = {"cifar10": (53.2, 0.7), "cifar100": (35.3, 0.4), "cub200": (13.8, 0.3),
                   "tiny-imagenet": (20.1, 0.3)}
PAPER_SOURCE = "the PoDD paper's Table 2 (RaT-BPTT, 1 IPC)"
CRITERIA = ("beats", "comparable")
GROUP_BY = ["dataset", "method", "ipc", "patch_grid", "order", "labels"]
MIN_RUNS = 2  # fewer finished runs than this cannot tell a difference
TIE = 1e-9  # means computed in different orders may differ in the last bit: equal is a pass
BYTES_PER_VALUE = 4  # posters and learned labels are stored as float32

# A data set's verdict, and the exit code each gives (see `exit_code`).
PASS, NONE_PASSES, TOO_FEW_RUNS = "pass", "none-passes", "too-few-runs"
# the contract: 0 a verdict was found, 1 none was (the state says why), 2 bad input
EXIT_CODES = {PASS: 0, NONE_PASSES: 1, TOO_FEW_RUNS: 1}

# Why a trial run is not in the table.
RUNNING, NAN_ACCURACY, INCOMPLETE = "running", "nan-accuracy", "incomplete"
REQUIRED_PARAMS = {"method", "ipc", "poster_pixels"}  # logged once a trial has its poster


class ReportError(ValueError):
    """Nothing to report on (no store, no runs, unknown data set): a message, exit code 2."""


RUN_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("sweep", pa.string()), ("dataset", pa.string()),
    ("dataset_source", pa.string()), ("method", pa.string()), ("ipc", pa.float64()),
    ("achieved_ipc", pa.float64()), ("patch_grid", pa.string()), ("order", pa.string()),
    ("labels", pa.string()), ("seed", pa.int64()), ("test_accuracy", pa.float64()),
    ("test_accuracy_std", pa.float64()), ("eval_models", pa.int64()),
    ("poster_pixels", pa.int64()), ("label_parameters", pa.int64()),
    ("storage_bytes", pa.int64()), ("ipc_by_bytes", pa.float64()), ("trial_key", pa.string()),
])


def finite_or_none(value: float | None) -> float | None:
    """NaN and infinities are "unknown": null in tables, never NaN in JSON."""
    return value if value is not None and math.isfinite(value) else None


def _run_dataset(run: RunRecord) -> tuple[str, str]:
    """(benchmark family, data set string as the sweep named it) of a run. A RUNNING run may
    not have logged its family yet: its data set string (param, else tag) stands in."""
    source = run.params.get("dataset") or run.tags.get(DATASET_TAG, "")
    return run.params.get("dataset_family") or source, source


def _run_row(run: RunRecord) -> dict:
    """One finished trial run, with test accuracy and poster facts, as a table row."""
    params, metrics = run.params, run.metrics
    family, source = _run_dataset(run)
    method = params["method"]
    channels = int(params.get("channels", 3))
    classes = int(params.get("num_classes", 0))
    height, width = (int(v) for v in params.get("image_size", "0x0").split("x"))
    labels = int(params.get("label_parameters", 0))
    pixels = int(params["poster_pixels"])
    storage = (channels * pixels + labels) * BYTES_PER_VALUE
    one_ipc = classes * channels * height * width * BYTES_PER_VALUE
    return {
        "run_id": run.run_id, "sweep": run.tags.get(SWEEP_TAG, ""),
        "dataset": family, "dataset_source": source, "method": method,
        "ipc": float(params["ipc"]),
        "achieved_ipc": float(params.get("achieved_ipc", params["ipc"])),
        "patch_grid": params.get("patch_grid", "") if method == "podd" else "",
        "order": params.get("order", "") if method == "podd" else "",
        "labels": params.get("labels", "") if method != "random-real" else "",
        "seed": int(params.get("seed", 0)), "test_accuracy": metrics["test_accuracy"],
        "test_accuracy_std": finite_or_none(metrics.get("test_accuracy_std", 0.0)),
        "eval_models": int(params.get("eval_models", 0)), "poster_pixels": pixels,
        "label_parameters": labels, "storage_bytes": storage,
        "ipc_by_bytes": storage / one_ipc if one_ipc else None,
        "trial_key": run.tags.get(KEY_TAG, ""),
    }


def _left_out_reason(run: RunRecord) -> str | None:
    """Why a trial run cannot be in the table, or None when it can."""
    if run.status == "RUNNING":
        return RUNNING
    if "test_accuracy" not in run.metrics or not REQUIRED_PARAMS <= run.params.keys():
        return INCOMPLETE
    if not math.isfinite(run.metrics["test_accuracy"]):
        return NAN_ACCURACY  # a mean over NaN would poison its whole configuration
    return None


@dataclass(frozen=True)
class LeftOut:
    """A trial run that is not in the table, and why (RUNNING, NAN_ACCURACY, INCOMPLETE)."""

    run_id: str
    dataset: str
    dataset_source: str
    reason: str


@dataclass
class Gathered:
    """The store's usable finished trial runs (RUN_SCHEMA) and the trial runs left out."""

    runs: pa.Table
    left_out: list[LeftOut] = field(default_factory=list)

    def left_out_ids(self, reason: str, dataset: str | None = None) -> list[str]:
        """Run ids left out for `reason`, of data set `dataset` (as `select_dataset` matches
        it) or of all."""
        return [r.run_id for r in self.left_out if r.reason == reason
                and (dataset is None or dataset in (r.dataset, r.dataset_source))]

    @property
    def running(self) -> int:
        return len(self.left_out_ids(RUNNING))

    @property
    def unusable(self) -> int:
        """Finished runs without the facts a report needs (test accuracy, poster size)."""
        return len(self.left_out_ids(INCOMPLETE))

    @property
    def nan_accuracy(self) -> list[str]:
        return self.left_out_ids(NAN_ACCURACY)


def gather_runs(tracking_uri: str | None, experiment: str, sweep: str | None = None) -> Gathered:
    """The finished trial runs of the store as a table (RUN_SCHEMA); the others (RUNNING, NaN
    accuracy, missing facts) are listed in `left_out`. FAILED and KILLED runs are neither."""
    runs = run_records(tracking_uri, experiment, sweep=sweep)
    if sweep is not None and not runs:
        raise ReportError(f"no trial runs of sweep {sweep!r} in experiment {experiment!r}: "
                          f"check the name with `podd-sweep status`")
    rows, left_out = [], []
    for run in runs:
        if run.status not in ("RUNNING", "FINISHED"):
            continue
        reason = _left_out_reason(run)
        if reason is None:
            rows.append(_run_row(run))
        else:
            left_out.append(LeftOut(run.run_id, *_run_dataset(run), reason))
    rows.sort(key=lambda r: r["run_id"])  # the same table whichever way the store was read
    left_out.sort(key=lambda r: r.run_id)
    return Gathered(pa.Table.from_pylist(rows, schema=RUN_SCHEMA), left_out)


def describe_left_out(ids: list[str], reason: str, shown: int = 5) -> str:
    """One note line for the runs left out for `reason` (their full ids, the first few)."""
    what = {RUNNING: "trial run(s) still RUNNING are left out; report again when they finish",
            NAN_ACCURACY: "finished run(s) with test accuracy NaN are left out",
            INCOMPLETE: "finished run(s) lack test accuracy or poster facts and are left out"}
    more = f" (+{len(ids) - shown} more)" if len(ids) > shown else ""
    return f"{len(ids)} {what[reason]}: {' '.join(ids[:shown])}{more}"


def nothing_to_report(gathered: Gathered, experiment: str) -> ReportError:
    """The error when the store has no usable finished runs at all: say what it has instead."""
    if gathered.running:
        return ReportError(f"no finished trial runs in experiment {experiment!r} yet: "
                           f"{gathered.running} still RUNNING; report again when they finish")
    if gathered.left_out:
        counts = Counter(r.reason for r in gathered.left_out)
        return ReportError(f"no usable trial runs in experiment {experiment!r}: "
                           + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
                           + " (left out)")
    return ReportError(f"no finished trial runs in experiment {experiment!r} yet: launch a "
                       f"sweep first")


def datasets_in(runs: pa.Table) -> list[str]:
    return sorted(set(runs.column("dataset").to_pylist()))


def select_dataset(runs: pa.Table, name: str) -> pa.Table:
    """Runs of data set `name`, by benchmark (cifar10 covers a Parquet copy of CIFAR-10) or by
    the exact data set string the sweep used."""
    mask = pc.or_(pc.equal(runs.column("dataset"), name),
                  pc.equal(runs.column("dataset_source"), name))
    return runs.filter(mask)


def aggregate(runs: pa.Table) -> pa.Table:
    """One row per (data set, method, IPC, patch grid, ordering, labels), over seeds."""
    # one thread keeps each group's run ids and seeds in the table's (run id) order
    grouped = runs.group_by(GROUP_BY, use_threads=False).aggregate([
        ("test_accuracy", "mean"), ("test_accuracy", "stddev", pc.VarianceOptions(ddof=1)),
        ("test_accuracy", "count"), ("achieved_ipc", "mean"), ("ipc_by_bytes", "mean"),
        ("poster_pixels", "max"), ("label_parameters", "max"), ("storage_bytes", "max"),
        ("run_id", "list"), ("seed", "list")])
    names = {"test_accuracy_mean": "accuracy", "test_accuracy_stddev": "accuracy_std",
             "test_accuracy_count": "runs", "achieved_ipc_mean": "achieved_ipc",
             "ipc_by_bytes_mean": "ipc_by_bytes", "poster_pixels_max": "poster_pixels",
             "label_parameters_max": "label_parameters", "storage_bytes_max": "storage_bytes",
             "run_id_list": "run_ids", "seed_list": "seeds"}
    grouped = grouped.rename_columns([names.get(n, n) for n in grouped.column_names])
    # one run has no spread over seeds: std 0 would look like certainty, so it stays null
    return grouped.sort_by([("dataset", "ascending"), ("method", "ascending"),
                            ("ipc", "ascending"), ("accuracy", "descending")])


def best_row(rows: list[dict]) -> dict:
    """The best configuration among those with enough seeds to judge (else the best at all)."""
    return max(rows, key=lambda r: (r["runs"] >= MIN_RUNS, r["accuracy"]))


@dataclass
class Baseline:
    accuracy: float  # fraction
    std: float | None  # None: unknown (a single measured run), so comparable = beats
    source: str
    runs: int = 0
    run_ids: list[str] = field(default_factory=list)


def dataset_family(runs: pa.Table, name: str) -> str:
    """The benchmark the selected runs are of (`--dataset parquet:.../cifar10-jpeg` is
    cifar10): the paper's baseline is looked up by it."""
    families = datasets_in(runs)
    if len(families) > 1:
        raise ReportError(f"{name!r} names runs of several data sets ({', '.join(families)}): "
                          f"report on one of them")
    return families[0]


def _measured_baseline(groups: pa.Table) -> Baseline | None:
    """The best rat-bptt 1-IPC configuration of the store, if it has any."""
    rows = groups.filter(pc.and_(pc.equal(groups.column("method"), "rat-bptt"),
                                 pc.equal(groups.column("ipc"), 1.0))).to_pylist()
    if not rows:
        return None
    best = best_row(rows)
    runs = best["runs"]
    if runs < MIN_RUNS:
        source = (f"measured: {runs} rat-bptt 1-IPC run in this store ({best['labels']} "
                  f"labels); too few seeds to tell its std, so comparable = beats")
    else:
        source = (f"measured: {runs} rat-bptt 1-IPC runs in this store ({best['labels']} "
                  f"labels)")
    return Baseline(best["accuracy"], best["accuracy_std"] if runs >= MIN_RUNS else None,
                    source, runs, list(best["run_ids"]))


def choose_baseline(groups: pa.Table, family: str, how: str) -> Baseline:
    """measured: the store's rat-bptt 1-IPC runs (the best configuration when several);
    paper: the paper's table for the runs' benchmark `family`; auto: measured, else paper;
    a number: that accuracy in % (std 0)."""
    if how not in ("measured", "paper", "auto"):
        try:
            value = float(how)
        except ValueError:
            raise ReportError(f"--baseline must be measured, paper or a number (an accuracy in "
                              f"%), got {how!r}") from None
        if not math.isfinite(value):
            raise ReportError(f"--baseline must be a finite accuracy in %, got {how!r}")
        return Baseline(value / 100, 0.0, f"given on the command line ({value:g} %)")
    if how in ("measured", "auto"):
        measured = _measured_baseline(groups)
        if measured is not None:
            return measured
        if how == "measured":
            raise ReportError(f"no finished rat-bptt 1-IPC runs for {family} in this store: "
                              f"add `include: [{{method: rat-bptt, ipc: 1}}]` to the sweep, or "
                              f"use --baseline paper")
    if family not in PAPER_BASELINES:
        known = ", ".join(PAPER_BASELINES)
        if how == "paper":
            raise ReportError(f"the paper has no RaT-BPTT baseline for {family!r} (only "
                              f"{known}): use --baseline measured or --baseline VALUE")
        raise ReportError(f"the paper has no RaT-BPTT baseline for {family!r} (only {known}) "
                          f"and this store has no finished rat-bptt 1-IPC runs for it: run the "
                          f"baseline, or give --baseline VALUE")
    mean, std = PAPER_BASELINES[family]
    return Baseline(mean / 100, std / 100, PAPER_SOURCE)


@dataclass
class IpcResult:
    ipc: float
    accuracy: float
    accuracy_std: float | None
    runs: int
    passes: bool | None  # None: too few runs to tell
    configuration: str
    run_ids: list[str]


@dataclass
class Verdict:
    state: str  # PASS | NONE_PASSES | TOO_FEW_RUNS
    lowest_ipc: float | None  # the lowest judged IPC that passes
    # True: every IPC above the lowest passes; False: one above fails; None: there is no IPC
    # above it, or those above that are not failing have too few runs to judge
    all_above_pass: bool | None
    message: str
    per_ipc: list[IpcResult]
    unjudged_ipcs: list[float] = field(default_factory=list)  # fewer than MIN_RUNS runs


def _configuration(row: dict) -> str:
    return f"{row['patch_grid']} patches, {row['order']} order, {row['labels']} labels"


def passing_threshold(baseline: Baseline, criterion: str) -> float:
    """The accuracy a configuration needs: the baseline's mean (beats), or one baseline std
    below it (comparable; an unknown std counts as 0)."""
    allowance = (baseline.std or 0.0) if criterion == "comparable" else 0.0
    return baseline.accuracy - allowance - TIE


def row_passes(row: dict, threshold: float) -> bool | None:
    """Pass/fail of one aggregated row; None with too few runs to tell."""
    return (row["accuracy"] >= threshold) if row["runs"] >= MIN_RUNS else None


def best_per_ipc(groups: pa.Table, threshold: float) -> list[IpcResult]:
    """At each PoDD IPC, the best configuration (with enough runs, if any has) and its pass."""
    podd = groups.filter(pc.equal(groups.column("method"), "podd")).to_pylist()
    results = []
    for ipc in sorted({r["ipc"] for r in podd}):
        best = best_row([r for r in podd if r["ipc"] == ipc])
        results.append(IpcResult(ipc, best["accuracy"], best["accuracy_std"], best["runs"],
                                 row_passes(best, threshold), _configuration(best),
                                 list(best["run_ids"])))
    return results


def _ipcs(results: list[IpcResult]) -> str:
    return ", ".join(f"{r.ipc:g}" for r in results) + " IPC"


def _fails(results: list[IpcResult]) -> str:
    return f"{_ipcs(results)} {'fails' if len(results) == 1 else 'fail'}"


def _above_lowest(lowest: IpcResult, per_ipc: list[IpcResult]) -> tuple[bool | None, str]:
    """Whether every IPC above the lowest passing one passes too, and how to say it. An IPC
    above with too few runs cannot be claimed to pass; with no IPC above there is nothing to
    claim (all([]) would say True)."""
    above = [r for r in per_ipc if r.ipc > lowest.ipc]
    failing = [r for r in above if r.passes is False]
    unjudged = [r for r in above if r.passes is None]
    if not above:
        return None, "it is the highest IPC in the store"
    if failing:
        text = f"but {_fails(failing)} above it"
        if unjudged:
            text += f", and {_ipcs(unjudged)} above it cannot be judged (too few runs)"
        return False, text
    if unjudged:
        return None, (f"every judged IPC above it passes too, but {_ipcs(unjudged)} cannot be "
                      f"judged (too few runs)")
    return True, "every IPC above it passes too"


def decide(groups: pa.Table, baseline: Baseline, criterion: str, dataset: str) -> Verdict:
    """The lowest IPC whose best PoDD configuration reaches the baseline (beats: mean >= the
    baseline's mean; comparable: within one baseline std below it).

    pass: some judged IPC passes. none-passes: every IPC was judged (>= MIN_RUNS runs) and
    each fails. too-few-runs: none of the judged IPCs passes, but some IPC (or every one, or
    there are no PoDD runs at all) has too few runs to judge, so one could still pass."""
    if criterion not in CRITERIA:
        raise ReportError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    per_ipc = best_per_ipc(groups, passing_threshold(baseline, criterion))
    judged = [r for r in per_ipc if r.passes is not None]
    unjudged = [r for r in per_ipc if r.passes is None]
    unjudged_ipcs = [r.ipc for r in unjudged]
    base = f"the baseline {100 * baseline.accuracy:.2f} % ({baseline.source})"
    if not per_ipc:
        return Verdict(TOO_FEW_RUNS, None, None, f"{dataset}: too few runs to tell: no "
                                                 f"finished PoDD runs to judge", per_ipc)
    passing = [r for r in judged if r.passes]
    if passing:
        lowest = min(passing, key=lambda r: r.ipc)
        all_above, above_text = _above_lowest(lowest, per_ipc)
        word = "beats" if criterion == "beats" else "is comparable to (within one std of)"
        message = (f"{dataset}: {lowest.ipc:g} IPC is the lowest at which PoDD "
                   f"({100 * lowest.accuracy:.2f} % over {lowest.runs} runs, "
                   f"{lowest.configuration}) {word} {base}; {above_text}")
        below = [r for r in unjudged if r.ipc < lowest.ipc]
        if below:
            message += (f"; {_ipcs(below)} below it cannot be judged (too few runs), so the "
                        f"lowest may be lower")
        return Verdict(PASS, lowest.ipc, all_above, message, per_ipc, unjudged_ipcs)
    miss = "is below" if criterion == "beats" else "is more than one std below"
    too_few = (f"{_ipcs(unjudged)} cannot be judged: fewer than {MIN_RUNS} finished runs "
               f"({', '.join(str(r.runs) for r in unjudged)}); add seeds")
    if not judged:
        return Verdict(TOO_FEW_RUNS, None, None, f"{dataset}: too few runs to tell: "
                                                 f"{too_few}", per_ipc, unjudged_ipcs)
    best = max(judged, key=lambda r: r.accuracy)
    failed = (f"the best judged PoDD poster ({best.ipc:g} IPC, {100 * best.accuracy:.2f} %) "
              f"{miss} {base}")
    if unjudged:
        return Verdict(TOO_FEW_RUNS, None, None, f"{dataset}: too few runs to tell: no judged "
                                                 f"IPC passes ({failed}), but {too_few}",
                       per_ipc, unjudged_ipcs)
    return Verdict(NONE_PASSES, None, None, f"{dataset}: no IPC passes: {failed}", per_ipc)


def exit_code(states: list[str]) -> int:
    """0 when every data set has a passing IPC; else 1 (some data set has none passing, or too
    few runs to tell: the verdict's state and message say which)."""
    for state in (NONE_PASSES, TOO_FEW_RUNS):
        if state in states:
            return EXIT_CODES[state]
    return EXIT_CODES[PASS]


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity as None: JSON has no NaN (json.dumps would write a
    bare NaN that strict parsers reject)."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class DatasetReport:
    dataset: str  # as asked for (a benchmark name, or the data set string a sweep used)
    family: str  # the benchmark its runs are of (the paper baseline's key)
    criterion: str
    baseline: Baseline
    verdict: Verdict
    groups: pa.Table
    runs: pa.Table
    left_out: dict[str, list[str]] = field(default_factory=dict)  # reason -> run ids

    def to_dict(self) -> dict:
        return json_safe({
            "dataset": self.dataset, "family": self.family, "criterion": self.criterion,
            "baseline": asdict(self.baseline), "verdict": asdict(self.verdict),
            "groups": self.groups.to_pylist(), "runs": self.runs.to_pylist(),
            "left_out": self.left_out})


def _no_runs_error(gathered: Gathered, dataset: str) -> ReportError:
    """Why `dataset` has no runs to report on: still running, all left out, unknown, or none."""
    running = gathered.left_out_ids(RUNNING, dataset)
    if running:
        return ReportError(f"no finished runs for {dataset} yet: {len(running)} trial run(s) "
                           f"still RUNNING; report again when they finish")
    broken = [r for r in gathered.left_out if dataset in (r.dataset, r.dataset_source)]
    if broken:
        counts = Counter(r.reason for r in broken)
        return ReportError(f"no usable finished runs for {dataset}: "
                           + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
                           + " (left out)")
    known = datasets_in(gathered.runs)
    from podd_engine.data import list_datasets  # torch: only on this error path

    registered = dataset in {e.name for e in list_datasets()} or ":" in dataset
    if not registered and dataset not in PAPER_BASELINES:
        return ReportError(f"unknown data set {dataset!r}: this store has runs for "
                           f"{', '.join(known) or 'no data set yet'}")
    return ReportError(f"no finished runs for {dataset} in this store"
                       + (f" (it has {', '.join(known)})" if known else "")
                       + ": launch a sweep for it first")


def build_report(gathered: Gathered, dataset: str, *, baseline: str = "auto",
                 criterion: str = "beats") -> DatasetReport:
    runs = select_dataset(gathered.runs, dataset)
    if runs.num_rows == 0:
        raise _no_runs_error(gathered, dataset)
    family = dataset_family(runs, dataset)
    groups = aggregate(runs)
    chosen = choose_baseline(groups, family, baseline)
    left_out = {reason: ids for reason in (RUNNING, NAN_ACCURACY, INCOMPLETE)
                if (ids := gathered.left_out_ids(reason, dataset))}
    return DatasetReport(dataset, family, criterion, chosen,
                         decide(groups, chosen, criterion, dataset), groups, runs, left_out)


# Columns groups_with_verdict adds to the aggregated table (csv/parquet), in order.
VERDICT_FIELDS = [
    ("report", pa.string()), ("best", pa.bool_()), ("passes", pa.bool_()),
    ("delta_to_baseline", pa.float64()), ("baseline_accuracy", pa.float64()),
    ("baseline_std", pa.float64()), ("baseline_source", pa.string()),
    ("criterion", pa.string()), ("verdict", pa.string()), ("lowest_ipc", pa.float64()),
]


def groups_with_verdict(report: DatasetReport) -> pa.Table:
    """The aggregated table, one row per configuration, with the baseline, the data set's
    verdict and pass/fail per row (for csv/parquet; run ids and seeds space-separated)."""
    threshold = passing_threshold(report.baseline, report.criterion)
    judged = {(r.ipc, tuple(r.run_ids)) for r in report.verdict.per_ipc}
    rows = report.groups.to_pylist()
    for row in rows:
        podd = row["method"] == "podd"
        row["best"] = podd and (row["ipc"], tuple(row["run_ids"])) in judged
        row["run_ids"] = " ".join(row["run_ids"])
        row["seeds"] = " ".join(map(str, row["seeds"]))
        row["report"] = report.dataset
        row["passes"] = row_passes(row, threshold) if podd else None
        row["delta_to_baseline"] = row["accuracy"] - report.baseline.accuracy
        row["baseline_accuracy"] = report.baseline.accuracy
        row["baseline_std"] = report.baseline.std
        row["baseline_source"] = report.baseline.source
        row["criterion"] = report.criterion
        row["verdict"] = report.verdict.state
        row["lowest_ipc"] = report.verdict.lowest_ipc
    listed = {"run_ids": pa.string(), "seeds": pa.string()}
    schema = pa.schema([pa.field(f.name, listed.get(f.name, f.type))
                        for f in report.groups.schema] + VERDICT_FIELDS)
    return pa.Table.from_pylist(rows, schema=schema)


def _plot_title(report: DatasetReport) -> str:
    verdict = report.verdict
    if verdict.state == PASS:
        return f"{report.dataset}: lowest passing IPC {verdict.lowest_ipc:g}"
    if verdict.state == NONE_PASSES:
        return f"{report.dataset}: no IPC passes"
    return f"{report.dataset}: too few runs to tell"


def plot_report(report: DatasetReport, path: Path) -> Path:
    """Accuracy vs IPC: every PoDD configuration (faint), the best per IPC with its std over
    seeds, and the baseline as a band of one std. Written atomically: a viewer or the MLflow
    upload never reads half a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from podd_engine.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    b = report.baseline
    if b.std:
        ax.axhspan(100 * (b.accuracy - b.std), 100 * (b.accuracy + b.std), color="tab:red",
                   alpha=0.15, lw=0)
    ax.axhline(100 * b.accuracy, color="tab:red", lw=1.5,
               label=f"RaT-BPTT 1 IPC: {100 * b.accuracy:.1f} % ({b.source.split(':')[0]})")
    podd = [r for r in report.groups.to_pylist() if r["method"] == "podd"]
    ax.scatter([r["ipc"] for r in podd], [100 * r["accuracy"] for r in podd], s=14,
               color="tab:blue", alpha=0.3, label="PoDD configurations")
    best = report.verdict.per_ipc
    ax.errorbar([r.ipc for r in best], [100 * r.accuracy for r in best],
                yerr=[100 * (r.accuracy_std or 0.0) for r in best], color="tab:blue",
                marker="o", capsize=3, label="PoDD, best configuration per IPC")
    for r in best:
        if r.passes:
            ax.scatter([r.ipc], [100 * r.accuracy], s=90, facecolors="none",
                       edgecolors="tab:green", linewidths=2)
    random_real = [r for r in report.groups.to_pylist() if r["method"] == "random-real"]
    if random_real:
        ax.scatter([r["ipc"] for r in random_real], [100 * r["accuracy"] for r in random_real],
                   marker="x", color="gray", label="random real images")
    ax.set_title(_plot_title(report), fontsize=11)
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:  # the temporary file has no .png suffix: name the format
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_path(plot: Path, dataset: str, several: bool) -> Path:
    """`--plot acc.png` as is for one data set; acc-NAME.png per data set when several (the
    data set name with ':' and '/' as '_', so a Parquet path makes one file name)."""
    if not several:
        return plot
    safe = dataset.replace(":", "_").replace("/", "_")
    return plot.with_name(f"{plot.stem}-{safe}{plot.suffix}")


def log_plot_to_sweeps(tracking_uri: str | None, experiment: str, report: DatasetReport,
                       plot: Path) -> list[str]:
    """Attach the plot to the parent run of every sweep whose runs it shows."""
    client, experiment_id = open_store(tracking_uri, experiment)
    sweeps = sorted(set(report.runs.column("sweep").to_pylist()))
    logged = []
    for sweep in sweeps:
        for parent in search_all(client, experiment_id, f"tags.`{SWEEP_TAG}` = '{sweep}' and "
                                                        f"tags.`{ROLE_TAG}` = 'sweep'"):
            client.log_artifact(parent.info.run_id, str(plot), "report")
            logged.append(parent.info.run_id)
    return logged


def fmt_accuracy(mean: float, std: float | None) -> str:
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"
