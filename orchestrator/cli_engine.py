"""`podd-sweep datasets`, `distill` and `evaluate`: the engine from the command line (no
Ray, no MLflow)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from orchestrator.cli_app import (CacheDirOption, DataRootOption, TrackingUriOption, app, console,
                              datasets_app, err_console, progress_bar, user_errors)
from podd_engine.errors import UserError
from podd_engine.methods import get_method

if TYPE_CHECKING:
    from podd_engine import data


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
    row["cache_bytes"] = cache.stat().st_size if cache.exists() else 0
    return row


@datasets_app.callback(invoke_without_command=True)
def datasets_list(
    ctx: typer.Context,
    data_root: DataRootOption = None,
    cache_dir: CacheDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    clear: Annotated[bool, typer.Option(
        "--clear", help="Remove the cache's decoded data sets and preprocessing fits (they "
                        "are rebuilt on next use).")] = False,
) -> None:
    """List every registered data set, where its files are expected and whether it is cached,
    and the cache's size."""
    from podd_engine import data
    from podd_engine.dataset_cache import cache_contents, clear_cache
    if ctx.invoked_subcommand is not None:
        return
    cache_root = Path(cache_dir or data.default_cache_dir()).absolute()
    if clear:
        files, size = clear_cache(cache_root)
        console.print(f"removed {files} cache file(s), {size / 1e6:.1f} MB, from {cache_root}")
        return
    with user_errors():
        rows = [_dataset_status(e, data_root, cache_dir) for e in data.list_datasets()]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    contents = cache_contents(cache_root)
    table = Table(title="podd-sweep data sets")
    for column in ("name", "description", "location", "status"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["description"], row["location"], row["status"])
    console.print(table)
    (n, size), (pn, psize) = contents["datasets"], contents["preprocessing"]
    console.print(f"Decoded tensors are cached under {cache_root / 'datasets'} ({n} file(s), "
                  f"{size / 1e6:.1f} MB), fitted preprocessing under "
                  f"{cache_root / 'preprocessing'} ({pn} file(s), {psize / 1e6:.1f} MB); "
                  f"`podd-sweep datasets --clear` empties both.", highlight=False)
    console.print("Example: podd-sweep datasets prepare parquet:../shared/datasets/cifar10-jpeg")


@datasets_app.command("prepare",
                      epilog=("Example: `podd-sweep datasets prepare "
                              "parquet:../shared/datasets/cifar10-jpeg`"))
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
    """--set key=value pairs (values read as YAML: 3, 0.5, true, [1, 2], text), parsed as the
    sweep overrides are (orchestrator/overrides.py): an empty or malformed value is one line."""
    from orchestrator.overrides import parse_override

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r} is not KEY=VALUE: write e.g. --set window=10")
        try:
            setting = parse_override(f"{key.strip().replace('-', '_')}={value}")
        except UserError as exc:
            raise UserError(str(exc).replace("override ", "--set ", 1)
                             .replace("or seeds=[0]", "or window=10")
                             .replace(f"or {key.strip()}=null to use the default",
                                      f"or leave {key.strip()} out for its default")
                             ) from None
        if len(setting.path) > 1 or setting.value is None:
            raise UserError(f"--set {pair!r}: give one setting of TrialConfig and a value, "
                             f"e.g. --set window=10 (leave a setting out for its default)")
        settings[setting.path[0]] = setting.value
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


@app.command("distill",
             epilog=("Example: `podd-sweep distill --dataset "
                     "parquet:../shared/datasets/cifar10-jpeg --ipc 0.5 --preset cpu-small`"))
def distill_command(
    dataset: Annotated[str, typer.Option(help="Data set: a registry name or parquet:PATH, ...")],
    ipc: Annotated[float, typer.Option(help="Images per class of pixel budget (e.g. 0.5).")],
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for the poster artifact.",
        show_default="runs/METHOD-ipcK-CONFIGKEY")] = None,
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
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved settings (the TrialConfig, as JSON) and "
                               "exit.")] = False,
    record_to: Annotated[Optional[str], typer.Option(
        "--tracking-uri", help="Also record the distillation in this MLflow store (e.g. "
                               "sqlite:///mlflow.db), as a trial of the sweep 'distill': "
                               "params, losses, poster pictures, accuracy, artifact.")] = None,
    experiment: Annotated[str, typer.Option(
        help="MLflow experiment, with --tracking-uri.")] = "podd-sweep",
) -> None:
    """Distil a data set into one poster, evaluate it, and save the artifact (tensors, JSON, PNG).

    Without --preset every setting not given is the paper's default (4000 outer steps, width
    128, real batch 5000, 8 evaluation networks, CLIP): a GPU job; --preset cpu-small is the
    CPU-sized one."""
    from podd_engine import data
    from podd_engine.allocator import tune_glibc_malloc
    from podd_engine.artifact import ARTIFACT_FILES
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
                raise UserError(f"{key} is given twice (as an option and with --set): keep one")
        options = {k: v for k, v in options.items() if v is not None}
        config = make_config(preset, data_family=ds.family, **{**extra, **options})
        if print_config:
            print(json.dumps(config.to_dict(), indent=1))
            return
        if preset in (None, "none"):
            err_console.print(
                f"note: no --preset: the paper-scale defaults for what is not given "
                f"({config.steps} outer steps, width {config.width}, real batch "
                f"{config.real_batch}, {config.eval_models} evaluation networks, embedder "
                f"{config.embedder}); --preset cpu-small for a CPU-sized run, --print-config "
                f"shows every setting", highlight=False, soft_wrap=True)
        out = out or Path("runs") / f"{config.method}-ipc{config.ipc:g}-{config.key()}"
        if out.exists() and not out.is_dir():  # found now, not after the distillation
            raise UserError(f"--out {out} is a file: give a folder for the poster artifact")
        if out.is_dir() and (others := sorted(p.name for p in out.iterdir()
                                              if p.name not in ARTIFACT_FILES)):
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                             else "")
            raise UserError(f"--out {out} holds other files ({shown}): give a new or empty "
                            f"folder (an earlier poster's folder is replaced)")
        total = get_method(config.method).final_step(config.steps)
        record = None
        if record_to is not None:  # opened before the work: a bad store is one line first
            from orchestrator.distill_record import DistillRecord

            record = DistillRecord(record_to, experiment, config)

        def on_step(metrics, _):
            advance(metrics.step, metrics.loss, metrics.seconds)
            if record is not None:
                record.step(metrics)

        try:
            with step_progress(total, f"distil {config.method} {config.ipc:g} IPC") as advance:
                result = distill(
                    config, ds, on_step=on_step,
                    on_eval=lambda step, r: err_console.print(
                        f"step {step}: test accuracy {100 * r.mean():.2f} +- "
                        f"{100 * r.std():.2f} % over {len(r.accuracies)} models"))
        except NonFiniteError as exc:
            if record is not None:
                record.fail(exc)
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(1) from None
        except BaseException as exc:
            if record is not None:
                record.interrupted() if isinstance(exc, KeyboardInterrupt) else record.fail(exc)
            raise
        save_result(result, out)
        if record is not None:
            record.finish(result, total)
            err_console.print(f"recorded in {record.uri} (experiment {experiment}, sweep "
                              f"distill): run {record.run_id}", highlight=False)
    summary = result.summary()
    summary["artifact"] = str(out)
    console.print_json(json.dumps(summary))


@app.command("evaluate", epilog="Example: `podd-sweep evaluate runs/podd-ipc0.5-KEY --models 3`")
def evaluate_command(
    artifact: Annotated[str, typer.Argument(
        help="A poster artifact folder (distill --out), or the MLflow run id of a sweep "
             "trial (its poster_artifact is fetched from --tracking-uri).",
        metavar="ARTIFACT|RUN_ID")],
    models: Annotated[Optional[int], typer.Option(help="Networks to train (default: as recorded).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    tracking_uri: TrackingUriOption = None,
    data_root: DataRootOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Re-run the evaluation protocol on a saved poster."""
    import tempfile

    from podd_engine.allocator import tune_glibc_malloc
    from podd_engine.artifact import load_artifact
    from podd_engine.pipeline import evaluate_artifact

    tune_glibc_malloc()
    with user_errors(), tempfile.TemporaryDirectory(prefix="podd-evaluate-") as scratch:
        if models is not None and models < 1:
            raise UserError(f"--models must be at least 1, got {models}")
        folder = Path(artifact)
        if not folder.exists() and re.fullmatch(r"[0-9a-f]{32}", artifact):
            folder = _run_artifact(artifact, tracking_uri, Path(scratch))
        saved = load_artifact(folder)
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


def _run_artifact(run_id: str, tracking_uri: str | None, into: Path) -> Path:
    """A trial run's poster artifact, downloaded from its MLflow store (never creating one)."""
    from orchestrator.store import check_store, mlflow_errors, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_store(uri)  # a server that does not answer: one line in seconds
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    with mlflow_errors(uri):
        try:
            client.get_run(run_id)
        except MlflowException:
            raise UserError(f"no run {run_id} in {uri}: give a trial's run id (podd-sweep "
                             f"status lists them) or --tracking-uri of its store") from None
        listed = [a.path for a in client.list_artifacts(run_id)]
        if "poster_artifact" not in listed:
            raise UserError(f"run {run_id} has no poster_artifact (it did not finish, or it "
                             f"is a sweep's parent run): choose a finished trial's run")
        return Path(client.download_artifacts(run_id, "poster_artifact", str(into)))
