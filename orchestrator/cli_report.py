"""`podd-sweep report`: the lowest IPC that beats the baseline, per data set and schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator.cli_app import TrackingUriOption, app, console, err_console, user_errors
from podd_engine.errors import UserError


@app.command("report",
             epilog=("Example: `podd-sweep report --dataset cifar10 --where steps=300 --plot "
                     "acc.png`"))
def report_command(
    dataset: Annotated[Optional[list[str]], typer.Option(
        help="Data set(s) to report on, by family (cifar10 covers every copy of CIFAR-10) or "
             "as the sweep wrote it.", show_default="every data set in the store")] = None,
    tracking_uri: TrackingUriOption = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "podd-sweep",
    sweep: Annotated[list[str], typer.Option(
        help="Only the runs of this sweep (repeatable: the runs of several sweeps, judged "
             "together).")] = [],
    where: Annotated[list[str], typer.Option(
        help="Only runs whose setting KEY is VALUE (KEY=VALUE, repeatable; e.g. steps=300, "
             "width=64, sweep=smoke).")] = [],
    baseline: Annotated[str, typer.Option(
        help="measured (the rat-bptt 1-IPC runs of each schedule) | paper (the paper's "
             "Table 2, for every schedule, measured baselines or not) | a number in %")] = "measured",
    criterion: Annotated[str, typer.Option(
        help="beats (mean >= baseline) | comparable (within one baseline std) | significant "
             "(the 95 % interval of the difference above zero)")] = "beats",
    budget: Annotated[str, typer.Option(
        help="pixels (IPC as poster pixels) | bytes (learned labels count as storage)")] = "pixels",
    output_format: Annotated[str, typer.Option(
        "--format", help="table | json | csv | parquet")] = "table",
    output: Annotated[Optional[Path], typer.Option(
        help="File for json/csv/parquet (required for csv and parquet; json without it goes "
             "to stdout).")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="Accuracy-vs-IPC PNG (per data set: NAME.png appended when several); also logged "
             "to the sweep's parent MLflow run.")] = None,
) -> None:
    """The lowest IPC whose PoDD posters beat the 1-IPC RaT-BPTT baseline of the same schedule,
    per data set and schedule.

    Exit code: 0 every verdict has a passing IPC; 1 some verdict has none passing, too few runs
    to tell or no baseline at its schedule (the verdict says which); 2 bad input."""
    from orchestrator import report as rp
    from orchestrator import report_output as out
    from orchestrator.runs import (describe_left_out, describe_repeated_seeds, gather_runs,
                                   nothing_to_report, parse_where)

    with user_errors():
        if output_format not in ("table", "json", "csv", "parquet"):
            raise UserError(f"--format must be table, json, csv or parquet, got {output_format!r}")
        if output_format in ("csv", "parquet") and output is None:
            raise UserError(f"--format {output_format} writes a file: add --output FILE")
        if output is not None and output_format == "table":
            raise UserError("--output is for --format json, csv or parquet: the table goes to "
                             "the terminal")
        if output is not None and output.is_dir():
            raise UserError(f"--output {output} is a folder: give a file name")
        if plot is not None and plot.is_dir():
            raise UserError(f"--plot {plot} is a folder: give a file name such as "
                             f"{plot / 'accuracy.png'}")
        conditions = parse_where(where)
        rp.parse_baseline(baseline)
        if criterion not in rp.CRITERIA:
            raise UserError(f"--criterion must be one of {', '.join(rp.CRITERIA)}, got "
                             f"{criterion!r}")
        if budget not in rp.BUDGETS:
            raise UserError(f"--budget must be one of {', '.join(rp.BUDGETS)}, got {budget!r}")
        gathered = gather_runs(tracking_uri, experiment, sweep)
        names = dataset or rp.datasets_in(gathered.runs)
        if not names:
            raise nothing_to_report(gathered, experiment)
        reports = [rp.build_report(gathered, name, baseline=baseline, criterion=criterion,
                                   budget=budget, where=conditions) for name in names]
        from orchestrator.status import recorded_searches

        searches = recorded_searches(tracking_uri, experiment, sweep)
        for r in reports:
            r.searches = rp.searches_of(r, searches)
        plots = {}
        if plot is not None:
            for r in reports:
                path = out.plot_report(r, out.plot_path(plot, r.dataset, len(reports) > 1))
                plots[r.dataset] = path
                out.log_plot_to_sweeps(tracking_uri, experiment, r, path)
    for reason in rp.LEFT_OUT_REASONS:
        if ids := gathered.left_out_ids(reason):
            err_console.print(f"note: {describe_left_out(ids, reason)}", highlight=False,
                              soft_wrap=True)
    for r in reports:
        if r.repeated_seeds:
            err_console.print(f"note: {r.dataset}: {describe_repeated_seeds(r.repeated_seeds)}",
                              highlight=False, soft_wrap=True)
    if output_format == "table":
        from orchestrator.report_view import print_report

        for r in reports:
            print_report(console, r)
    else:
        _write_report(reports, output_format, output, out)
    for name, path in plots.items():
        err_console.print(f"plot for {name}: {path}")
    code = rp.exit_code([state for r in reports for state in r.states()])
    if code:
        raise typer.Exit(code)


def _write_report(reports, output_format: str, output: Optional[Path], out) -> None:
    import pyarrow as pa

    # torch-free writers: report must not pay for torch at start-up
    from podd_engine.fileio import atomic_write, atomic_write_text

    if output_format == "json":
        text = out.report_json(reports)
        if output is None:
            print(text)
        else:
            atomic_write_text(text + "\n", output)
        return
    table = pa.concat_tables([out.groups_with_verdict(r) for r in reports],
                             promote_options="default")
    if output_format == "csv":
        import pyarrow.csv

        atomic_write(output, lambda tmp: pa.csv.write_csv(table, tmp))
    else:
        import pyarrow.parquet

        atomic_write(output, lambda tmp: pa.parquet.write_table(table, tmp))
    err_console.print(f"wrote {table.num_rows} rows to {output}")
