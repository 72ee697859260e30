"""A report for machines and for the eye: one row per configuration (JSON, CSV, Parquet) and
the accuracy-vs-IPC plot. The columns are documented in the README ("Report columns")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa

from orchestrator.report import (DatasetReport, ScheduleReport, control_for, json_safe,
                                 role_of)
from orchestrator.verdict import NONE_PASSES, PASS, interval_to, row_passes
from orchestrator.store import open_store, runs_filter, search_all
from podd_engine.methods import CONTROL, POSTER

# Columns groups_with_verdict adds to each configuration row, in order.
VERDICT_FIELDS = [
    ("report", pa.string()), ("schedule_label", pa.string()), ("role", pa.string()),
    ("best", pa.bool_()), ("passes", pa.bool_()),
    ("delta_to_baseline", pa.float64()), ("delta_low", pa.float64()),
    ("delta_high", pa.float64()), ("baseline_accuracy", pa.float64()),
    ("baseline_std", pa.float64()), ("baseline_source", pa.string()),
    ("baseline_run_ids", pa.string()), ("control_accuracy", pa.float64()),
    ("gain_over_control", pa.float64()), ("control_run_ids", pa.string()),
    ("criterion", pa.string()), ("budget", pa.string()), ("verdict", pa.string()),
    ("lowest_ipc", pa.float64()),
]


def judged_rows(report: DatasetReport, schedule: ScheduleReport) -> list[dict]:
    """The schedule's configuration rows with what they were compared to: for PoDD rows the
    difference to the baseline (and its 95 % interval), pass/fail, the control's gain; every
    row names the baseline runs it was judged against. Run ids and seeds stay lists."""
    judged = {tuple(r.run_ids): r for r in schedule.verdict.per_ipc}  # the best per IPC
    b = schedule.baseline
    groups = schedule.groups.to_pylist()
    controls = [g for g in groups if role_of(g["method"]) == CONTROL]
    rows = []
    for row in groups:
        role = role_of(row["method"]) or ""
        podd = role == POSTER
        interval = interval_to(row, b) if podd and b is not None else None
        result = judged.get(tuple(row["run_ids"])) if podd else None
        control = control_for(row, controls) if podd else None  # each PoDD row's own
        row.update(
            report=report.dataset, schedule_label=schedule.label, role=role,
            best=result is not None,
            passes=row_passes(row, b, report.criterion) if podd and b is not None else None,
            delta_to_baseline=(row["accuracy"] - b.accuracy) if b is not None else None,
            delta_low=interval.low if interval else None,
            delta_high=interval.high if interval else None,
            baseline_accuracy=b.accuracy if b else None, baseline_std=b.std if b else None,
            baseline_source=b.source if b else None,
            baseline_run_ids=list(b.run_ids) if b else [],
            control_accuracy=control["accuracy"] if control else None,
            gain_over_control=row["accuracy"] - control["accuracy"] if control else None,
            control_run_ids=list(control["run_ids"]) if control else [],
            criterion=report.criterion, budget=report.budget, verdict=schedule.verdict.state,
            lowest_ipc=schedule.verdict.lowest_ipc)
        rows.append(row)
    return rows


def groups_with_verdict(report: DatasetReport) -> pa.Table:
    """Every schedule's configurations, one row each, for csv/parquet (lists of run ids and
    seeds space-separated)."""
    rows = []
    for schedule in report.schedules:
        for row in judged_rows(report, schedule):
            for key in ("run_ids", "seeds", "failed_run_ids", "baseline_run_ids",
                        "control_run_ids"):
                row[key] = " ".join(map(str, row[key]))
            rows.append(row)
    listed = {"run_ids": pa.string(), "seeds": pa.string(), "failed_run_ids": pa.string()}
    groups = report.schedules[0].groups.schema
    schema = pa.schema([pa.field(f.name, listed.get(f.name, f.type)) for f in groups]
                       + VERDICT_FIELDS)
    return pa.Table.from_pylist(rows, schema=schema)


def report_json(reports: list[DatasetReport]) -> str:
    """The reports as JSON; each schedule's `groups` are its judged rows (the CSV's columns,
    with run ids and seeds as lists)."""
    datasets = []
    for report in reports:
        entry = report.to_dict()
        for schedule, out in zip(report.schedules, entry["schedules"]):
            out["groups"] = json_safe(judged_rows(report, schedule))
        datasets.append(entry)
    # allow_nan=False: json_safe made NaN null; a NaN that slipped through is a bug
    return json.dumps({"datasets": datasets}, indent=2, allow_nan=False, default=str)


def fmt_accuracy(mean: float, std: float | None) -> str:
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------

def _plot_title(report: DatasetReport) -> str:
    if len(report.schedules) > 1:
        return f"{report.dataset}: {len(report.schedules)} schedules"
    verdict = report.schedules[0].verdict
    if verdict.state == PASS:
        return f"{report.dataset}: lowest passing IPC {verdict.lowest_ipc:g}"
    if verdict.state == NONE_PASSES:
        return f"{report.dataset}: no IPC passes"
    return f"{report.dataset}: {verdict.state.replace('-', ' ')}"


def plot_report(report: DatasetReport, path: Path) -> Path:
    """Accuracy vs IPC per schedule (one colour each): every PoDD configuration (faint), the
    best per IPC with its std over seeds (passing ones ringed), the schedule's baseline as a
    line with a band of one std, and random-real controls as crosses. Written atomically: a
    viewer or the MLflow upload never reads half a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from podd_engine.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(report.schedules) > 1
    for i, schedule in enumerate(report.schedules):
        colour = colours[i % len(colours)]
        tag = f" [{schedule.label}]" if several else ""
        b = schedule.baseline
        if b is not None:
            if b.std:
                ax.axhspan(100 * (b.accuracy - b.std), 100 * (b.accuracy + b.std),
                           color=colour, alpha=0.12, lw=0)
            ax.axhline(100 * b.accuracy, color=colour, lw=1.2, ls="--",
                       label=f"RaT-BPTT 1 IPC{tag}: {100 * b.accuracy:.1f} % "
                             f"({b.source.split(':')[0]})")
        rows = schedule.groups.to_pylist()
        podd = [r for r in rows if role_of(r["method"]) == POSTER]
        ax.scatter([r["ipc"] for r in podd], [100 * r["accuracy"] for r in podd], s=14,
                   color=colour, alpha=0.3)
        best = schedule.verdict.per_ipc
        if best:
            ax.errorbar([r.ipc for r in best], [100 * r.accuracy for r in best],
                        yerr=[100 * (r.accuracy_std or 0.0) for r in best], color=colour,
                        marker="o", capsize=3, label=f"PoDD, best per IPC{tag}")
        for r in best:
            if r.passes:
                ax.scatter([r.ipc], [100 * r.accuracy], s=90, facecolors="none",
                           edgecolors="tab:green", linewidths=2)
        controls = [r for r in rows if role_of(r["method"]) == CONTROL]
        if controls:
            ax.scatter([r["ipc"] for r in controls], [100 * r["accuracy"] for r in controls],
                       marker="x", color=colour, label=f"random real images{tag}")
    ax.set_title(_plot_title(report), fontsize=11)
    ax.set_xlabel("images per class (IPC" + (", by bytes)" if report.budget == "bytes" else ")"))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a plot of baselines only has nothing to label
        ax.legend(fontsize=7, loc="lower right")
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
        for parent in search_all(client, experiment_id, runs_filter("sweep", sweep)):
            client.log_artifact(parent.info.run_id, str(plot), "report")
            logged.append(parent.info.run_id)
    return logged

