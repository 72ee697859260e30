"""The answer sweeps are run for: per data set, the lowest IPC whose PoDD posters beat the 1-IPC
RaT-BPTT baseline, with the evidence (every figure traceable to MLflow run ids or to the
paper's table).

    runs = gather_runs(tracking_uri, "podd-sweep")       # pyarrow table, one row per trial run
    for dataset in datasets_in(runs):
        report = build_report(runs, dataset)              # groups over seeds + baseline + verdict
        print(report.verdict.message)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.store import (KEY_TAG, ROLE_TAG, SWEEP_TAG, RunRecord, open_store, search_all,
                                run_records)

# RaT-BPTT at 1 IPC as reported in the PoDD paper (Table 2), test accuracy in %, mean +- std.
PAPER_BASELINES = {"cifar10": (53.2, 0.7), "cifar100": (35.3, 0.4), "cub200": (13.8, 0.3),
                   "tiny-imagenet": (20.1, 0.3)}
PAPER_SOURCE = "the PoDD paper's Table 2 (RaT-BPTT, 1 IPC)"
CRITERIA = ("beats", "comparable")
GROUP_BY = ["dataset", "method", "ipc", "patch_grid", "order", "labels"]
MIN_RUNS = 2  # fewer finished runs than this cannot tell a difference
TIE = 1e-9  # means computed in different orders may differ in the last bit: equal is a pass
BYTES_PER_VALUE = 4  # posters and learned labels are stored as float32


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


def _run_row(run: RunRecord) -> dict | None:
    """One finished trial run as a table row (None when it lacks the trial facts)."""
    params, metrics = run.params, run.metrics
    if "test_accuracy" not in metrics or "poster_pixels" not in params:
        return None
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
        "dataset": params.get("dataset_family") or params["dataset"],
        "dataset_source": params["dataset"], "method": method, "ipc": float(params["ipc"]),
        "achieved_ipc": float(params.get("achieved_ipc", params["ipc"])),
        "patch_grid": params.get("patch_grid", "") if method == "podd" else "",
        "order": params.get("order", "") if method == "podd" else "",
        "labels": params.get("labels", "") if method != "random-real" else "",
        "seed": int(params.get("seed", 0)), "test_accuracy": metrics["test_accuracy"],
        "test_accuracy_std": metrics.get("test_accuracy_std", 0.0),
        "eval_models": int(params.get("eval_models", 0)), "poster_pixels": pixels,
        "label_parameters": labels, "storage_bytes": storage,
        "ipc_by_bytes": storage / one_ipc if one_ipc else float("nan"),
        "trial_key": run.tags.get(KEY_TAG, ""),
    }


@dataclass
class Gathered:
    runs: pa.Table
    running: int = 0  # trial runs still RUNNING (left out)
    unusable: int = 0  # finished runs without the facts a report needs


def gather_runs(tracking_uri: str | None, experiment: str, sweep: str | None = None) -> Gathered:
    runs = run_records(tracking_uri, experiment, sweep=sweep)
    if sweep is not None and not runs:
        raise ReportError(f"no trial runs of sweep {sweep!r} in experiment {experiment!r}: "
                          f"check the name with `podd-sweep status`")
    rows, running, unusable = [], 0, 0
    for run in runs:
        if run.status == "RUNNING":
            running += 1
        elif run.status == "FINISHED":
            row = _run_row(run)
            if row is None:
                unusable += 1
            else:
                rows.append(row)
    rows.sort(key=lambda r: r["run_id"])  # the same table whichever way the store was read
    return Gathered(pa.Table.from_pylist(rows, schema=RUN_SCHEMA), running, unusable)


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
    grouped = runs.group_by(GROUP_BY).aggregate([
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
    std: float
    source: str
    runs: int = 0
    run_ids: list[str] = field(default_factory=list)


def choose_baseline(groups: pa.Table, dataset: str, how: str) -> Baseline:
    """measured: the store's rat-bptt 1-IPC runs (the best configuration when several);
    paper: the paper's table; a number: that accuracy in % (std 0)."""
    if how not in ("measured", "paper", "auto"):
        try:
            value = float(how)
        except ValueError:
            raise ReportError(f"--baseline must be measured, paper or a number (an accuracy in "
                              f"%), got {how!r}") from None
        return Baseline(value / 100, 0.0, f"given on the command line ({value:g} %)")
    if how in ("measured", "auto"):
        rows = groups.filter(pc.and_(pc.equal(groups.column("method"), "rat-bptt"),
                                     pc.equal(groups.column("ipc"), 1.0))).to_pylist()
        if rows:
            best = best_row(rows)
            return Baseline(best["accuracy"], best["accuracy_std"] or 0.0,
                            f"measured: {best['runs']} rat-bptt 1-IPC run(s) in this store "
                            f"({best['labels']} labels)", best["runs"], list(best["run_ids"]))
        if how == "measured":
            raise ReportError(f"no finished rat-bptt 1-IPC runs for {dataset} in this store: "
                              f"add `include: [{{method: rat-bptt, ipc: 1}}]` to the sweep, or "
                              f"use --baseline paper")
    if dataset not in PAPER_BASELINES:
        raise ReportError(f"the paper has no RaT-BPTT baseline for {dataset!r} (only "
                          f"{', '.join(PAPER_BASELINES)}) and this store has no rat-bptt 1-IPC "
                          f"runs for it: run the baseline, or give --baseline VALUE")
    mean, std = PAPER_BASELINES[dataset]
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
    lowest_ipc: float | None
    all_above_pass: bool | None
    message: str
    per_ipc: list[IpcResult]


def _configuration(row: dict) -> str:
    return f"{row['patch_grid']} patches, {row['order']} order, {row['labels']} labels"


def passing_threshold(baseline: Baseline, criterion: str) -> float:
    """The accuracy a configuration needs: the baseline's mean (beats), or one baseline std
    below it (comparable)."""
    return baseline.accuracy - (baseline.std if criterion == "comparable" else 0.0) - TIE


def row_passes(row: dict, threshold: float) -> bool | None:
    """Pass/fail of one aggregated row; None with too few runs to tell."""
    return (row["accuracy"] >= threshold) if row["runs"] >= MIN_RUNS else None


def decide(groups: pa.Table, baseline: Baseline, criterion: str, dataset: str) -> Verdict:
    """The lowest IPC whose best PoDD configuration reaches the baseline (beats: mean >= the
    baseline's mean; comparable: within one baseline std below it)."""
    if criterion not in CRITERIA:
        raise ReportError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    threshold = passing_threshold(baseline, criterion)
    podd = groups.filter(pc.equal(groups.column("method"), "podd")).to_pylist()
    per_ipc = []
    for ipc in sorted({r["ipc"] for r in podd}):
        rows = [r for r in podd if r["ipc"] == ipc]
        best = best_row(rows)
        per_ipc.append(IpcResult(ipc, best["accuracy"], best["accuracy_std"], best["runs"],
                                 row_passes(best, threshold),
                                 _configuration(best), list(best["run_ids"])))
    if not per_ipc:
        return Verdict(None, None, f"{dataset}: no finished PoDD runs to judge", per_ipc)
    judged = [r for r in per_ipc if r.passes is not None]
    word = "beats" if criterion == "beats" else "is comparable to (within one std of)"
    base = f"the baseline {100 * baseline.accuracy:.2f} % ({baseline.source})"
    if not judged:
        return Verdict(None, None, f"{dataset}: too few runs to tell: every IPC has fewer than "
                                   f"{MIN_RUNS} finished runs; add seeds", per_ipc)
    passing = [r for r in judged if r.passes]
    if not passing:
        best = max(judged, key=lambda r: r.accuracy)
        return Verdict(None, None, f"{dataset}: no IPC passes: the best PoDD poster "
                                   f"({best.ipc:g} IPC, {100 * best.accuracy:.2f} %) is below "
                                   f"{base}", per_ipc)
    lowest = min(passing, key=lambda r: r.ipc)
    above = [r for r in judged if r.ipc > lowest.ipc]
    all_above = all(r.passes for r in above)
    unjudged = [r.ipc for r in per_ipc if r.passes is None]
    message = (f"{dataset}: {lowest.ipc:g} IPC is the lowest at which PoDD "
               f"({100 * lowest.accuracy:.2f} % over {lowest.runs} runs, {lowest.configuration}) "
               f"{word} {base}; "
               + ("every IPC above it passes too" if all_above else
                  "but not every IPC above it passes: "
                  + ", ".join(f"{r.ipc:g}" for r in above if not r.passes) + " fail"))
    if unjudged:
        message += f" (too few runs to judge {', '.join(f'{i:g}' for i in unjudged)} IPC)"
    return Verdict(lowest.ipc, all_above, message, per_ipc)


@dataclass
class DatasetReport:
    dataset: str
    criterion: str
    baseline: Baseline
    verdict: Verdict
    groups: pa.Table
    runs: pa.Table

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "criterion": self.criterion,
                "baseline": asdict(self.baseline),
                "verdict": {k: v for k, v in asdict(self.verdict).items()},
                "groups": self.groups.to_pylist(), "runs": self.runs.to_pylist()}


def build_report(gathered: Gathered, dataset: str, *, baseline: str = "auto",
                 criterion: str = "beats") -> DatasetReport:
    runs = select_dataset(gathered.runs, dataset)
    if runs.num_rows == 0:
        known = datasets_in(gathered.runs)
        from podd_engine.data import list_datasets
        registered = dataset in {e.name for e in list_datasets()} or ":" in dataset
        if not registered and dataset not in PAPER_BASELINES:
            raise ReportError(f"unknown data set {dataset!r}: this store has runs for "
                              f"{', '.join(known) or 'no data set yet'}")
        raise ReportError(f"no finished runs for {dataset} in this store"
                          + (f" (it has {', '.join(known)})" if known else "")
                          + ": launch a sweep for it first")
    groups = aggregate(runs)
    chosen = choose_baseline(groups, dataset, baseline)
    return DatasetReport(dataset, criterion, chosen, decide(groups, chosen, criterion, dataset),
                         groups, runs)


def groups_with_verdict(report: DatasetReport) -> pa.Table:
    """The aggregated table with the baseline and pass/fail per row (for csv/parquet)."""
    threshold = passing_threshold(report.baseline, report.criterion)
    rows = report.groups.to_pylist()
    for row in rows:
        row["run_ids"] = " ".join(row["run_ids"])
        row["seeds"] = " ".join(map(str, row["seeds"]))
        row["baseline_accuracy"] = report.baseline.accuracy
        row["baseline_std"] = report.baseline.std
        row["baseline_source"] = report.baseline.source
        row["delta_to_baseline"] = row["accuracy"] - report.baseline.accuracy
        row["passes"] = row_passes(row, threshold) if row["method"] == "podd" else None
    return pa.Table.from_pylist(rows)


def plot_report(report: DatasetReport, path: Path) -> Path:
    """Accuracy vs IPC: every PoDD configuration (faint), the best per IPC with its std over
    seeds, and the baseline as a band of one std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    b = report.baseline
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
    lowest = report.verdict.lowest_ipc
    ax.set_title(f"{report.dataset}: " + (f"lowest passing IPC {lowest:g}" if lowest is not None
                                          else "no IPC passes"), fontsize=11)
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
