"""The `podd-sweep` command line.

Errors a user can fix (bad data set name, missing folder, malformed files) print one line
`error: ...` to stderr and exit with code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from podd_engine.errors import first_line
from podd_engine.methods import get_method

if TYPE_CHECKING:
    from podd_engine import data

app = typer.Typer(
    name="podd-sweep",
    help="Sweeps of Poster Dataset Distillation (PoDD) on Ray Tune, recorded in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
datasets_app = typer.Typer(help="List data sets, or fill the decoded-tensor cache.",
                           invoke_without_command=True)
app.add_typer(datasets_app, name="datasets")

# Piped output (logs, CI) gets room for the trial tables rather than rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

USER_ERROR_EXIT_CODE = 2

DataRootOption = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Folder holding downloaded data sets [env PODD_DATA_ROOT, default ./data]")]
CacheDirOption = Annotated[Optional[Path], typer.Option(
    "--cache-dir", help="Decoded-tensor cache [env PODD_CACHE_DIR, default ~/.cache/podd-sweep]")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors the user can fix into one line on stderr and exit code 2."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:  # UserError (podd_engine.errors) and kin
        err_console.print(f"[bold red]error:[/] {escape(first_line(exc))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(USER_ERROR_EXIT_CODE) from None


@contextlib.contextmanager
def progress_bar() -> Iterator[data.ProgressFn]:
    """A rich progress bar driven by the engine's (stage, done, total) callbacks; it appears
    only once there is progress to show (a cache hit draws nothing)."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err_console)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            progress.stop()


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"podd-sweep {version('podd-sweep')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                          is_eager=True, help="Print the version.")] = False,
) -> None:
    """Sweeps of Poster Dataset Distillation (PoDD) on Ray Tune, recorded in MLflow."""


def _dataset_status(entry: data.DatasetEntry, data_root: Path | None,
                    cache_dir: Path | None) -> dict:
    from podd_engine import data

    row = {"name": entry.name + (":PATH" if entry.takes_path else ""),
           "description": entry.description, "location": "", "status": "", "cache": ""}
    if entry.takes_path:
        row["location"] = "PATH"
        row["status"] = "give a folder"
        return row
    folder = data.dataset_folder(entry.name, data_root)
    row["location"] = str(folder)
    if not folder.exists():
        row["status"] = "downloads on first use" if entry.download else "missing"
        return row
    cache = data.dataset_cache_path(entry.name, data_root=data_root, cache_dir=cache_dir)
    row["cache"] = str(cache)
    row["status"] = "cached" if cache.exists() else "files present"
    return row


@datasets_app.callback(invoke_without_command=True)
def datasets_list(
    ctx: typer.Context,
    data_root: DataRootOption = None,
    cache_dir: CacheDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every registered data set, where its files are expected and whether it is cached."""
    from podd_engine import data
    if ctx.invoked_subcommand is not None:
        return
    with user_errors():
        rows = [_dataset_status(e, data_root, cache_dir) for e in data.list_datasets()]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="podd-sweep data sets")
    for column in ("name", "description", "location", "status"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["description"], row["location"], row["status"])
    console.print(table)
    cache_root = cache_dir or data.default_cache_dir()
    console.print(f"Decoded tensors are cached under {Path(cache_root).absolute() / 'datasets'}.")
    console.print("Example: podd-sweep datasets prepare parquet:../shared/datasets/cifar10-jpeg")


@datasets_app.command("prepare")
def datasets_prepare(
    name: Annotated[str, typer.Argument(help="Registry name, e.g. cifar10 or parquet:PATH.")],
    data_root: DataRootOption = None,
    cache_dir: CacheDirOption = None,
    download: Annotated[bool, typer.Option(help="Download the data set if it is missing.")] = True,
    zca: Annotated[bool, typer.Option(help="Also fit and cache the ZCA whitening.")] = True,
) -> None:
    """Decode a data set into the tensor cache (and fit its ZCA), with a progress bar."""
    from podd_engine import data
    from podd_engine.preprocess import fit_preprocessing

    with user_errors(), progress_bar() as progress:
        start = time.perf_counter()
        dataset = data.create_dataset(name, data_root=data_root, cache_dir=cache_dir,
                                      download=download, progress=progress)
        loaded = time.perf_counter()
        if zca:
            fit_preprocessing(dataset, "zca", cache_dir=cache_dir)
    summary = dataset.summary()
    summary["cache"] = str(data.dataset_cache_path(name, data_root=data_root, cache_dir=cache_dir))
    summary["load_seconds"] = round(loaded - start, 3)
    if zca:
        summary["zca_seconds"] = round(time.perf_counter() - loaded, 3)
    console.print_json(json.dumps(summary))


# --------------------------------------------------------------------------------------------
# distill / evaluate
# --------------------------------------------------------------------------------------------

def _parse_settings(pairs: list[str]) -> dict:
    """--set key=value pairs (values read as YAML scalars: 3, 0.5, true, [1, 2], text)."""
    import yaml

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r} is not KEY=VALUE: write e.g. --set window=10")
        settings[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return settings


@contextlib.contextmanager
def step_progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    """A progress bar for outer steps showing the loss and seconds per step. When stderr is not
    a terminal (a log file, a CI job), a plain line every 10% of the steps instead."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} s/step"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    interactive = err_console.is_terminal
    every = max(1, total // 10)
    with Progress(*columns, console=err_console, disable=not interactive) as progress:
        task = progress.add_task(description, total=total, loss="-", rate="-")

        def advance(completed: int, loss: float | None = None,
                    seconds: float | None = None) -> None:
            fields = {}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            if seconds is not None:
                fields["rate"] = f"{seconds:.2f}"
            progress.update(task, completed=completed, **fields)
            if not interactive and (completed % every == 0 or completed == total):
                err_console.print(f"{description}: step {completed}/{total} loss "
                                  f"{fields.get('loss', '-')} {fields.get('rate', '-')} s/step",
                                  highlight=False)

        yield advance


@app.command("distill")
def distill_command(
    dataset: Annotated[str, typer.Option(help="Data set: a registry name or parquet:PATH, ...")],
    ipc: Annotated[float, typer.Option(help="Images per class of pixel budget (e.g. 0.5).")],
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for the poster artifact [default: runs/METHOD-ipcK-CONFIGKEY]")] = None,
    preset: Annotated[Optional[str], typer.Option(help="paper | cpu-small")] = None,
    method: Annotated[Optional[str], typer.Option(help="podd | rat-bptt | random-real")] = None,
    class_grid: Annotated[Optional[str], typer.Option(help="Class grid COLSxROWS, e.g. 5x2.")] = None,
    patch_grid: Annotated[Optional[str], typer.Option(help="Patch grid COLSxROWS, e.g. 16x6.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="fixed | learned")] = None,
    order: Annotated[Optional[str], typer.Option(help="poco | random | identity")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="PoCO text encoder: clip | minilm")] = None,
    clip_weights: Annotated[Optional[Path], typer.Option(help="Local open_clip weights file.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Outer (RaT-BPTT) steps.")] = None,
    eval_models: Annotated[Optional[int], typer.Option(help="Networks in the evaluation.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    settings: Annotated[list[str], typer.Option("--set", help="Any other setting, KEY=VALUE.")] = [],
    data_root: DataRootOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Distil a data set into one poster, evaluate it, and save the artifact (tensors, JSON, PNG)."""
    from podd_engine import data
    from podd_engine.allocator import tune_glibc_malloc
    from podd_engine.config import make_config
    from podd_engine.pipeline import distill, save_result
    from podd_engine.rat_bptt import NonFiniteError

    tune_glibc_malloc()
    with user_errors():
        extra = _parse_settings(settings)
        ds = data.create_dataset(dataset, data_root=data_root, cache_dir=cache_dir,
                                 family_declared=extra.get("family"))
        options = dict(
            dataset=dataset, ipc=ipc, method=method, class_grid=class_grid,
            patch_grid=patch_grid, labels=labels, order=order, embedder=embedder,
            clip_weights=str(clip_weights) if clip_weights else None, steps=steps,
            eval_models=eval_models, device=device, seed=seed,
            data_root=str(data_root) if data_root else None,
            cache_dir=str(cache_dir) if cache_dir else None)
        for key in extra:
            if options.get(key) is not None:
                raise ValueError(f"{key} is given twice (as an option and with --set): keep one")
        options = {k: v for k, v in options.items() if v is not None}
        config = make_config(preset, data_family=ds.family, **{**extra, **options})
        out = out or Path("runs") / f"{config.method}-ipc{config.ipc:g}-{config.key()}"
        total = get_method(config.method).final_step(config.steps)
        try:
            with step_progress(total, f"distil {config.method} {config.ipc:g} IPC") as advance:
                result = distill(
                    config, ds,
                    on_step=lambda m, _: advance(m.step, m.loss, m.seconds),
                    on_eval=lambda step, r: err_console.print(
                        f"step {step}: test accuracy {100 * r.mean():.2f} +- "
                        f"{100 * r.std():.2f} % over {len(r.accuracies)} models"))
        except NonFiniteError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(1) from None
        save_result(result, out)
    summary = result.summary()
    summary["artifact"] = str(out)
    console.print_json(json.dumps(summary))


@app.command("evaluate")
def evaluate_command(
    artifact: Annotated[Path, typer.Argument(help="A poster artifact folder (distill --out).")],
    models: Annotated[Optional[int], typer.Option(help="Networks to train (default: as recorded).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    data_root: DataRootOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Re-run the evaluation protocol on a saved poster."""
    from podd_engine.allocator import tune_glibc_malloc
    from podd_engine.artifact import load_artifact
    from podd_engine.pipeline import evaluate_artifact

    tune_glibc_malloc()
    with user_errors():
        saved = load_artifact(artifact)
        count = models or saved.config.eval_models
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console) as progress:
            task = progress.add_task("train evaluation models", total=count)
            result = evaluate_artifact(
                saved, models=models, device=device,
                data_root=str(data_root) if data_root else None,
                cache_dir=str(cache_dir) if cache_dir else None,
                on_model=lambda i, acc: progress.update(task, completed=i + 1))
    summary = result.summary()
    summary["artifact"] = str(artifact)
    console.print_json(json.dumps(summary))


# ----------------------------------------------------------------------------- sweeps

TrackingUriOption = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow store [env MLFLOW_TRACKING_URI, else the spec's, else "
                           "sqlite:///mlflow.db in this folder]")]


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
    if outcome.unfinished:
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


@app.command("report")
def report_command(
    dataset: Annotated[Optional[list[str]], typer.Option(
        help="Data set(s) to report on, by family (cifar10 covers every copy of CIFAR-10) or "
             "as the sweep wrote it [default: every data set in the store]")] = None,
    tracking_uri: TrackingUriOption = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "podd-sweep",
    sweep: Annotated[Optional[str], typer.Option(help="Only the runs of this sweep.")] = None,
    where: Annotated[list[str], typer.Option(
        help="Only runs whose setting KEY is VALUE (KEY=VALUE, repeatable; e.g. steps=300, "
             "width=64, sweep=smoke).")] = [],
    baseline: Annotated[str, typer.Option(
        help="measured (the rat-bptt 1-IPC runs of each schedule) | paper (the paper's "
             "Table 2, for schedules without a measured one too) | a number in %")] = "measured",
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
    from orchestrator.runs import describe_left_out, gather_runs, nothing_to_report, parse_where

    with user_errors():
        if output_format not in ("table", "json", "csv", "parquet"):
            raise ValueError(f"--format must be table, json, csv or parquet, got {output_format!r}")
        if output_format in ("csv", "parquet") and output is None:
            raise ValueError(f"--format {output_format} writes a file: add --output FILE")
        if output is not None and output_format == "table":
            raise ValueError("--output is for --format json, csv or parquet: the table goes to "
                             "the terminal")
        if output is not None and output.is_dir():
            raise ValueError(f"--output {output} is a folder: give a file name")
        conditions = parse_where(where)
        rp.parse_baseline(baseline)
        if criterion not in rp.CRITERIA:
            raise ValueError(f"--criterion must be one of {', '.join(rp.CRITERIA)}, got "
                             f"{criterion!r}")
        if budget not in rp.BUDGETS:
            raise ValueError(f"--budget must be one of {', '.join(rp.BUDGETS)}, got {budget!r}")
        gathered = gather_runs(tracking_uri, experiment, sweep)
        names = dataset or rp.datasets_in(gathered.runs)
        if not names:
            raise nothing_to_report(gathered, experiment)
        reports = [rp.build_report(gathered, name, baseline=baseline, criterion=criterion,
                                   budget=budget, where=conditions) for name in names]
        plots = {}
        if plot is not None:
            for r in reports:
                path = out.plot_report(r, out.plot_path(plot, r.dataset, len(reports) > 1))
                plots[r.dataset] = path
                out.log_plot_to_sweeps(tracking_uri, experiment, r, path)
    for reason in (rp.RUNNING, rp.NAN_ACCURACY, rp.INCOMPLETE):
        if ids := gathered.left_out_ids(reason):
            err_console.print(f"note: {describe_left_out(ids, reason)}", highlight=False,
                              soft_wrap=True)
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


if __name__ == "__main__":
    app()
