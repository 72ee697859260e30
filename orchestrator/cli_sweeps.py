"""`podd-sweep launch`, `status` and `ui`: sweeps on Ray Tune, recorded in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from orchestrator.cli import (TrackingUriOption, app, console, err_console, progress_bar,
                              user_errors)
from podd_engine.errors import first_line
from podd_engine.methods import get_method


def _load_checked_sweep(spec: Path):
    """Parse, expand and check a sweep against its data sets (any problem: a SpecError)."""
    from podd_engine import data
    from orchestrator.spec import SpecError, load_sweep, parse_spec

    if not spec.is_file():
        raise SpecError(f"no sweep spec at {spec}: give the path of a YAML file such as "
                        f"sweeps/smoke.yaml")
    parsed = parse_spec(spec.read_text(), str(spec))
    loaded: dict[str, data.ImageDataset] = {}

    def dataset_info(name: str) -> data.ImageDataset:
        if name not in loaded:
            try:
                with progress_bar() as progress:
                    loaded[name] = data.create_dataset(name, data_root=parsed.data_root,
                                                       cache_dir=parsed.cache_dir,
                                                       progress=progress)
            except data.DatasetError as exc:
                datasets = parsed.dataset if isinstance(parsed.dataset, list) else [parsed.dataset]
                where = (f"dataset[{datasets.index(name)}]" if len(datasets) > 1 and
                         name in datasets else "dataset")
                raise SpecError(f"{spec}: {where}: {exc}") from None
        return loaded[name]

    return load_sweep(spec, dataset_info=dataset_info)


def _embedder_problems(sweep) -> list[str]:
    """PoCO's text encoders must load on the driver before anything starts (missing CLIP
    weights would otherwise fail every trial)."""
    from podd_engine.pipeline import create_embedder

    problems, checked = [], set()
    for trial in sweep.trials:
        c = trial.config
        which = (c.embedder, c.clip_model, c.clip_pretrained, c.clip_weights, c.clip_mode)
        if not get_method(c.method).uses_order or c.order != "poco" or which in checked:
            continue
        checked.add(which)
        try:
            create_embedder(c).embed(["check"])
        except Exception as exc:  # the engine's message says how to provide the weights
            problems.append(f"{sweep.source}: class_order: poco with embedder {c.embedder}: "
                            f"{first_line(exc)}")
    return problems


def _trial_table(sweep) -> Table:
    from orchestrator.spec import short_dataset_name

    table = Table(title=f"sweep {sweep.name}: {len(sweep.trials)} trials", title_justify="left")
    for column in ("#", "method", "dataset", "IPC", "achieved", "poster", "patches", "order",
                   "labels", "seed", "key"):
        table.add_column(column, no_wrap=True,
                         justify="right" if column in ("#", "IPC", "achieved", "seed") else "left")
    for i, t in enumerate(sweep.trials):
        c, method = t.config, get_method(t.config.method)
        table.add_row(str(i), c.method, short_dataset_name(c.dataset), f"{c.ipc:g}",
                      f"{t.achieved_ipc:.3f}", f"{t.poster_size[0]}x{t.poster_size[1]}",
                      c.patch_grid if method.uses_patch_grid else "-",
                      c.order if method.uses_order else "-", c.labels, str(c.seed), t.key)
    return table


@app.command("launch")
def launch_command(
    spec: Annotated[Path, typer.Argument(help="Sweep spec (YAML), e.g. sweeps/smoke.yaml.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the trials; start nothing.")] = False,
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join ('auto' or HOST:PORT) [env RAY_ADDRESS; default: a local "
             "Ray with this machine's cores]")] = None,
    tracking_uri: TrackingUriOption = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Require an interrupted sweep of this name to continue (by default "
                         "one is continued when it exists, else the sweep starts).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No Ray Tune status table.")] = False,
) -> None:
    """Run a sweep's trials on Ray Tune and record them in MLflow (resumes an interrupted one).

    A first Ctrl-C lets running trials save a checkpoint and stops (exit 130); a second one,
    or one while the sweep starts, stops at once with one line (exit 130)."""
    try:
        from orchestrator.spec import SpecError  # imports torch: seconds a Ctrl-C can land in

        with user_errors():
            sweep = _load_checked_sweep(spec)
            problems = _embedder_problems(sweep)
            if problems and not dry_run:
                raise SpecError(problems[0])
            resources = sweep.spec.resources
            if dry_run:
                for problem in problems:
                    err_console.print(f"[yellow]warning:[/] {problem}", highlight=False)
                console.print(_trial_table(sweep))
                console.print(f"{len(sweep.trials)} trials, each {resources.cpu:g} CPU + "
                              f"{resources.gpu:g} GPU; at most "
                              f"{sweep.spec.max_concurrent or 'as many as fit'} at once; "
                              f"MLflow: {sweep.tracking_uri(tracking_uri)} "
                              f"(experiment {sweep.spec.experiment}); Ray results: "
                              f"{sweep.storage_path() / sweep.name}")
                return
            from orchestrator.tune import launch
            outcome = launch(sweep, address=address, tracking_uri=tracking_uri,
                             resume=True if resume else None, verbose=0 if quiet else 1)
        _print_outcome(outcome)
    except KeyboardInterrupt:  # launch has closed its MLflow runs and its Ray on the way out
        err_console.print("interrupted: stopped at once; run the same command again to resume",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if outcome.failed:
        raise typer.Exit(1)
    if outcome.unfinished or outcome.tracking_gave_up:
        raise typer.Exit(130)


def _print_outcome(outcome) -> None:
    table = Table(title=f"sweep {outcome.sweep}", title_justify="left")
    for column in ("trial", "state", "test accuracy", "error"):
        table.add_column(column)
    for name, state in sorted(outcome.states.items()):
        acc = outcome.accuracy.get(name)
        table.add_row(name, state, f"{100 * acc:.2f} %" if acc is not None else "",
                      outcome.errors.get(name, ""))
    console.print(table)
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(outcome.counts().items()))
    console.print(f"{counts}. MLflow: {outcome.tracking_uri}, parent run "
                  f"{outcome.parent_run_id} (open with: podd-sweep ui). Ray results: "
                  f"{outcome.experiment_dir}")
    if outcome.failed:
        err_console.print(f"[bold red]{len(outcome.failed)} trial(s) failed:[/] "
                          + "; ".join(f"{n}: {outcome.errors.get(n, '')}" for n in outcome.failed))
    if outcome.unfinished:
        err_console.print(f"interrupted: {len(outcome.unfinished)} trial(s) unfinished; run the "
                          f"same command again to resume")
    if outcome.tracking_gave_up:
        err_console.print(f"interrupted: {outcome.tracking_gave_up}; the record is incomplete "
                          f"until the same command runs again with the store answering",
                          highlight=False, soft_wrap=True)


STATUS_ROWS = 40  # longer sweeps show their unfinished and best trials unless --all


@app.command("status")
def status_command(
    sweep: Annotated[Optional[str], typer.Argument(help="Sweep name (default: all sweeps).")] = None,
    tracking_uri: TrackingUriOption = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "podd-sweep",
    all_trials: Annotated[bool, typer.Option(
        "--all", help=f"List every trial (a sweep of more than {STATUS_ROWS} shows the "
                      f"unfinished ones and the 10 best finished).")] = False,
) -> None:
    """Trials of a sweep by state, with their best test accuracy so far (from MLflow)."""
    from orchestrator.status import sweep_status

    with user_errors():
        sweeps = sweep_status(tracking_uri, experiment, sweep)
    for entry in sweeps:
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(entry.counts.items()))
        shown = (entry.trials if all_trials or len(entry.trials) <= STATUS_ROWS
                 else entry.highlights())
        hidden = len(entry.trials) - len(shown)
        table = Table(title=f"sweep {entry.name} ({entry.status.lower()}): {counts}",
                      title_justify="left")
        for column in ("trial", "state", "step", "best test accuracy", "error"):
            table.add_column(column, justify="right" if column == "step" else "left")
        for trial in shown:
            best = trial.best_accuracy
            table.add_row(trial.name, trial.status, str(trial.step),
                          f"{100 * best:.2f} %" if best is not None else "", trial.error or "")
        console.print(table)
        if hidden:
            console.print(f"{hidden} more finished trials not shown (--all lists every one)")


@app.command("ui")
def ui_command(
    tracking_uri: TrackingUriOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
) -> None:
    """Start the MLflow UI on the sweep store (open http://HOST:PORT in a browser)."""
    import importlib.util
    import os
    import sys

    from orchestrator.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    with user_errors():
        if importlib.util.find_spec("mlflow") is None:
            raise ValueError("mlflow is not installed in this environment: pip install -e . "
                             "installs it")
        if uri.startswith(("http://", "https://")):
            raise ValueError(f"--tracking-uri {uri} is a tracking server: open it in a browser "
                             f"directly, it already serves the UI")
    err_console.print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)")
    # this interpreter's mlflow, not whichever `mlflow` is first on PATH (podd-sweep may run
    # from a virtual environment that is not activated)
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                              "--host", host, "--port", str(port)])
