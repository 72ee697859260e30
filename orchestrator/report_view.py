"""`podd-sweep report` on a terminal: per data set, what differs between its schedules, then
per schedule a table of its configurations, their full run ids and its verdict."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.report import DatasetReport, ScheduleReport
from orchestrator.runs import describe_differences
from orchestrator.report_output import fmt_accuracy, judged_rows
from podd_engine.methods import POSTER

REPORT_IDS_SHOWN = 3  # full run ids per row under the table; --format json/csv lists every one


def _signed(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:+.2f}"


def schedule_table(report: DatasetReport, schedule: ScheduleReport) -> Table:
    """One row per configuration, numbered: the full run ids of row #n follow the table
    (`run_id_lines`), where they are plain text that a narrow terminal cannot crop."""
    b = schedule.baseline
    name = f"{report.dataset} [{schedule.label}]" if schedule.label else report.dataset
    against = (f"RaT-BPTT 1 IPC = {fmt_accuracy(b.accuracy, b.std or None)} % ({b.source})"
               if b is not None else "no baseline at this schedule")
    # names and settings may hold [brackets]: text, not rich markup
    table = Table(title=escape(f"{name}: PoDD vs {against}; criterion: {report.criterion}"
                               + (", IPC by bytes" if report.budget == "bytes" else "")),
                  title_justify="left")
    # two-line headers keep the columns within 120 characters
    columns = ("#", "method", "IPC", "achieved", "by\nbytes", "poster\npx", "label\nparams",
               "bytes", "config", "accuracy %", "runs", "Δ\nbaseline", "95 %\ninterval", "Δ\ncontrol",
               "pass")
    for column in columns:
        text = column in ("method", "config", "pass")
        # figures stay whole on one line; only words wrap when the terminal is narrow
        table.add_column(column, justify="left" if text else "right", no_wrap=not text)
    for number, row in enumerate(judged_rows(report, schedule), start=1):
        podd = row["role"] == POSTER
        verdict = {None: "too few runs", True: "pass", False: "fail"}[row["passes"]]
        by_bytes = row["ipc_by_bytes"]
        interval = ("" if not podd else "unknown" if row["delta_low"] is None else
                    f"{100 * row['delta_low']:+.1f}..{100 * row['delta_high']:+.1f}")
        table.add_row(str(number), row["method"], f"{row['ipc']:g}", f"{row['achieved_ipc']:.3f}",
                      "?" if by_bytes is None else f"{by_bytes:.3f}",
                      f"{row['poster_pixels']:,}", f"{row['label_parameters']:,}",
                      f"{row['storage_bytes']:,}", _row_config(row) + (" *" if row["best"] else ""),
                      fmt_accuracy(row["accuracy"], row["accuracy_std"]), str(row["runs"]),
                      _signed(row["delta_to_baseline"]) if b is not None else "",
                      interval, "" if row["gain_over_control"] is None else
                      _signed(row["gain_over_control"]),
                      verdict if podd and b is not None else "")
    table.caption = ("* the best configuration at that IPC (the one the verdict uses); Δ in "
                     "points, interval over seeds (Welch's t); Δ control: over random real "
                     "images with the same storage; poster px per channel")
    return table


def _row_config(row: dict) -> str:
    parts = [p for p in (row["patch_grid"], row["order"], row["labels"]) if p]
    return " ".join(parts) or "-"


def run_id_lines(schedule: ScheduleReport) -> list[str]:
    """`#n: ID ID ...` per table row: whole MLflow run ids (a prefix finds nothing in MLflow's
    search or URL), the first REPORT_IDS_SHOWN of each row."""
    lines = []
    for number, row in enumerate(schedule.groups.to_pylist(), start=1):
        ids = row["run_ids"]
        more = len(ids) - REPORT_IDS_SHOWN
        lines.append(f"#{number}: {' '.join(ids[:REPORT_IDS_SHOWN])}"
                     + (f" (+{more} more: --format json lists every one)" if more > 0 else ""))
    return lines


def print_report(console: Console, report: DatasetReport) -> None:
    if report.differing:
        console.print(f"[bold]{escape(report.dataset)}:[/] {len(report.schedules)} schedules, "
                      f"told apart by {escape(describe_differences(report.differing))} (each "
                      f"judged against its own baseline)", highlight=False, soft_wrap=True)
    for schedule in report.schedules:
        console.print(schedule_table(report, schedule))
        console.print("run ids:", *run_id_lines(schedule), sep="\n  ", highlight=False,
                      soft_wrap=True)
        console.print(f"[bold]verdict:[/] {escape(schedule.verdict.message)}", highlight=False)
        if schedule.mixed_provenance:
            console.print(f"note: the runs compared here did not all run the same code or "
                          f"hardware, or read the same data "
                          f"({escape(describe_differences(schedule.mixed_provenance))})"
                          f": their differences are part of the comparison", highlight=False,
                          soft_wrap=True)
    for search in report.searches:
        from orchestrator.search_record import describe

        lines = describe(search, search["criterion"])
        console.print(f"[bold]search[/] (sweep {escape(search['sweep'])}, criterion "
                      f"{search['criterion']}): " + escape("\n".join(lines)), highlight=False,
                      soft_wrap=True)
