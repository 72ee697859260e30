"""`podd-sweep launch`, `status` and `ui`: sweeps on Ray Tune, recorded in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from orchestrator.cli_app import (TrackingUriOption, app, console, err_console, progress_bar,
                              user_errors)
from podd_engine.errors import UserError, first_line
from podd_engine.methods import get_method


def _load_checked_sweep(spec: Path, overrides: list[str] | None = None, *,
                        download: bool = True):
    """Parse, expand and check a sweep (with its command-line overrides) against its data
    sets (any problem: a SpecError). A dry run (`download=False`) downloads nothing."""
    from podd_engine import data
    from orchestrator.overrides import parse_overrides
    from orchestrator.spec import parse_spec
    from orchestrator.spec_file import SpecError, read_spec_text
    from orchestrator.sweep import load_sweep

    if not spec.is_file():
        raise SpecError(f"no sweep spec at {spec}: give the path of a YAML file such as "
                        f"sweeps/smoke.yaml")
    overrides = parse_overrides(overrides or [])
    parsed = parse_spec(read_spec_text(spec), str(spec), overrides)
    loaded: dict[str, data.ImageDataset] = {}

    def dataset_info(name: str) -> data.ImageDataset:
        if name not in loaded:
            try:
                with progress_bar() as progress:
                    loaded[name] = data.create_dataset(name, data_root=parsed.data_root,
                                                       cache_dir=parsed.cache_dir,
                                                       progress=progress, download=download)
            except data.DatasetError as exc:
                datasets = parsed.dataset if isinstance(parsed.dataset, list) else [parsed.dataset]
                where = (f"dataset[{datasets.index(name)}]" if len(datasets) > 1 and
                         name in datasets else "dataset")
                raise SpecError(f"{spec}: {where}: {_missing_data(exc, name, download)}") from None
        return loaded[name]

    return load_sweep(spec, dataset_info=dataset_info, overrides=overrides)


def _missing_data(error: Exception, name: str, download: bool) -> str:
    """The engine's message for data it cannot find, in a sweep's words: the spec's
    `data_root:` rather than distill's --data-root, and where a relative path was looked for."""
    text = str(error).replace(
        "set --data-root to", "set `data_root:` in the spec (or the override data_root=PATH, "
        "or PODD_DATA_ROOT) to")
    if "no data at" not in text:
        return text
    _, _, path = name.partition(":")
    if path and not Path(path).is_absolute():
        return (f"{text} (a relative path is read from the folder launch runs in, {Path.cwd()}: "
                f"run it from the folder the spec's paths start from (the repository for the "
                f"shipped sweeps), or give an absolute path with the override dataset=...)")
    if not download and "download " in text:
        return (f"{text} (a dry run downloads nothing: launch without --dry-run downloads it; "
                f"a local copy: add the override dataset=parquet:PATH)")
    return text


def _embedder_problems(sweep) -> list[str]:
    """PoCO's text encoders must load on the driver before anything starts (missing CLIP
    weights would otherwise fail every trial)."""
    from podd_engine.ordering import ClipWeightsError
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
        except ClipWeightsError as exc:  # the ways out, as the spec's fields
            problems.append(
                f"{sweep.source}: class_order: poco with embedder clip: CLIP weights for "
                f"{c.clip_model}/{c.clip_pretrained} are not available ({exc.reason}): set "
                f"`settings: {{embedder: minilm}}` (ships offline; or add the override "
                f"settings.embedder=minilm), `settings: {{clip_weights: PATH}}` (an open_clip "
                f"checkpoint), or `class_order: random` (or identity)")
        except Exception as exc:  # the engine's message says what is wrong
            problems.append(f"{sweep.source}: class_order: poco with embedder {c.embedder}: "
                            f"{first_line(exc)}")
    return problems


def _trial_table(sweep, costs) -> Table:
    from orchestrator.cost import duration
    from orchestrator.spec_file import short_dataset_name

    table = Table(title=f"sweep {sweep.name}: {len(sweep.trials)} trials", title_justify="left")
    numeric = ("#", "IPC", "achieved", "seed", "outer steps", "est. time")
    for column in ("#", "method", "dataset", "IPC", "achieved", "poster", "patches", "order",
                   "labels", "seed", "outer steps", "unrolled/T", "evaluation", "est. time",
                   "key"):
        table.add_column(column, no_wrap=True, justify="right" if column in numeric else "left")
    for i, (t, cost) in enumerate(zip(sweep.trials, costs.trials)):
        c, method = t.config, get_method(t.config.method)
        table.add_row(str(i), c.method, short_dataset_name(c.dataset), f"{c.ipc:g}",
                      f"{t.achieved_ipc:.3f}", f"{t.poster_size[0]}x{t.poster_size[1]}",
                      c.patch_grid if method.uses_patch_grid else "-",
                      c.order if method.uses_order else "-", c.labels_name, str(c.seed),
                      str(cost.outer_steps), cost.inner_steps, cost.eval_work,
                      duration(cost.seconds), t.key)
    return table


def _bill(sweep, costs) -> str:
    """The sweep's total, with what the estimate rests on."""
    slots = sweep.spec.max_concurrent or len(sweep.trials)
    steps = sum(t.outer_steps for t in costs.trials)
    return (f"estimated cost: {costs.trial_hours:.1f} trial-hours ({steps:,} outer steps in "
            f"all); at {slots} at once at least {costs.wall_hours(slots):.1f} h wall "
            f"(estimated from {costs.source()}; docs/benchmarks.md, 'Cost estimate')")


def _search_bill(sweep, costs) -> str:
    """What a search is expected to run of the grid above, and at most."""
    from orchestrator.search import search_cost

    from orchestrator.cost import duration

    seconds = {t.key: c.seconds for t, c in zip(sweep.trials, costs.trials)}
    lines = [f"search: lowest-passing ({sweep.spec.criterion}); the grid above is what it may "
             f"run; it runs the baseline, then bisects over IPC:"]
    for problem in sweep.search_problems():
        cost = search_cost(problem, sweep.spec.criterion, sweep.spec.parallel_probes)
        per_trial = sum(seconds[k] for k in problem.keys) / len(problem.keys)
        longest = max(seconds[k] for k in problem.keys)
        lines.append(f"  {problem.label}: expected {cost.expected:.1f} of {cost.grid} trials "
                     f"(about {duration(cost.expected * per_trial)} of trial time, in about "
                     f"{cost.rounds:.1f} rounds one after another: each round's trials run "
                     f"together, so at least {duration(cost.rounds * longest)} wall) when the "
                     f"first two seeds settle each probe; at most {cost.worst_monotone} trials "
                     f"when every probe needs every seed, if accuracy rises with IPC; all "
                     f"{cost.grid} if it does not")
    return "\n".join(lines)


@app.command("launch", epilog="Example: `podd-sweep launch sweeps/smoke.yaml seeds=[0] --dry-run`")
def launch_command(
    spec: Annotated[Path, typer.Argument(help="Sweep spec (YAML), e.g. sweeps/smoke.yaml.",
                                         metavar="SPEC")],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Spec overrides KEY=VALUE (dotted keys reach into mappings, values are YAML), "
             "e.g. seeds=[0] settings.steps=300 dataset=parquet:PATH.",
        metavar="KEY=VALUE", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the trials; start nothing.")] = False,
    print_spec: Annotated[bool, typer.Option(
        "--print-spec", help="Print the resolved spec (the file with the overrides applied, "
                             "as YAML) and exit.")] = False,
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join ('auto' or HOST:PORT).", envvar="RAY_ADDRESS",
        show_default="a local Ray with this machine's cores")] = None,
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
        from orchestrator.spec_file import SpecError

        with user_errors():
            if print_spec:
                _print_resolved_spec(spec, overrides)
                return
            sweep = _load_checked_sweep(spec, overrides, download=not dry_run)
            problems = _embedder_problems(sweep)
            if problems and not dry_run:
                raise SpecError(problems[0])
            resources = sweep.spec.resources
            if dry_run:
                problems += _tracking_problems(sweep.tracking_uri(tracking_uri))
                for problem in problems:
                    err_console.print(f"[yellow]warning:[/] {problem}", highlight=False)
                from orchestrator.cost import sweep_cost

                costs = sweep_cost(sweep)
                console.print(_trial_table(sweep, costs))
                console.print(f"{len(sweep.trials)} trials, each {resources.cpu:g} CPU + "
                              f"{resources.gpu:g} GPU; at most "
                              f"{sweep.spec.max_concurrent or 'as many as fit'} at once; "
                              f"MLflow: {sweep.tracking_uri(tracking_uri)} "
                              f"(experiment {sweep.spec.experiment}); Ray results: "
                              f"{sweep.storage_path() / sweep.name}")
                console.print(_bill(sweep, costs), highlight=False)
                if sweep.spec.search != "grid":
                    console.print(_search_bill(sweep, costs), highlight=False)
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


def _tracking_problems(uri: str) -> list[str]:
    """A tracking server that does not answer, said by the dry run as launch would refuse it."""
    from orchestrator.store import check_tracking_server

    try:
        check_tracking_server(uri)
    except UserError as exc:
        return [f"{exc} (launch refuses to start)"]
    return []


def _print_resolved_spec(spec: Path, overrides: list[str] | None) -> None:
    """The spec as it would run, validated down to each trial's settings (no data set is
    loaded: what depends on one, such as the poster geometry, is checked by --dry-run)."""
    import yaml

    from orchestrator.overrides import describe, parse_overrides
    from orchestrator.spec import parse_spec
    from orchestrator.spec_file import SpecError, read_spec_mapping, read_spec_text
    from orchestrator.sweep import expand

    if not spec.is_file():
        raise SpecError(f"no sweep spec at {spec}: give the path of a YAML file such as "
                        f"sweeps/smoke.yaml")
    parsed = parse_overrides(overrides or [])
    text = read_spec_text(spec)
    source = f"{spec} (with {describe(parsed)})" if parsed else str(spec)
    expand(parse_spec(text, str(spec), parsed), source=source)
    resolved = read_spec_mapping(text, str(spec), parsed)
    header = f"# {spec}" + (f" with {describe(parsed)}" if parsed else "")
    print(header + "\n" + yaml.safe_dump(resolved, sort_keys=False), end="")


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
    if outcome.search is not None:
        from orchestrator.search_record import describe

        for search in outcome.search["searches"]:
            console.print("search " + "\n".join(describe(search, outcome.search["criterion"])),
                          highlight=False, soft_wrap=True)
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


@app.command("stop", epilog="Example: `podd-sweep stop sweeps/smoke.yaml`")
def stop_command(
    sweep: Annotated[str, typer.Argument(
        help="The sweep: its spec file, or its name (with --storage).", metavar="SPEC|NAME")],
    storage: Annotated[Optional[Path], typer.Option(
        help="The sweep's storage folder (the spec's `storage:`), when given by name.",
        show_default="runs/ray")] = None,
) -> None:
    """Ask a running sweep to stop as a first Ctrl-C in its terminal would: its trials save a
    checkpoint at their current step, then its `launch` exits 130. The same `launch` resumes
    it. Works from any shell on the machine that runs the sweep."""
    import os
    import signal
    import socket

    from orchestrator.driver_lock import running_driver
    from orchestrator.spec import DEFAULT_STORAGE, parse_spec
    from orchestrator.spec_file import read_spec_text

    with user_errors():
        if Path(sweep).is_file():
            spec = parse_spec(read_spec_text(Path(sweep)), sweep)
            name, folder = spec.name, Path(spec.storage).expanduser().resolve()
        else:
            name, folder = sweep, Path(storage or DEFAULT_STORAGE).expanduser().resolve()
        holder = running_driver(folder, name)
        if holder is None:
            raise UserError(f"sweep {name} is not running: no live driver holds "
                             f"{folder / f'.{name}.launch.lock'} (give the spec file, or "
                             f"--storage with the sweep's storage folder)")
        if holder.get("host") != socket.gethostname():
            raise UserError(f"sweep {name} runs on {holder.get('host')} (process "
                             f"{holder.get('pid')}): run `podd-sweep stop` there")
        try:
            os.kill(int(holder["pid"]), signal.SIGINT)  # the driver's graceful stop
        except ProcessLookupError:
            raise UserError(f"sweep {name}: its driver (process {holder['pid']}) has just "
                             f"ended") from None
    console.print(f"asked sweep {name} (process {holder['pid']}) to stop: its trials save a "
                  f"checkpoint, then its launch exits 130; launch it again to resume",
                  highlight=False)


STATUS_ROWS = 40  # longer sweeps show their unfinished and best trials unless --all


@app.command("status", epilog="Example: `podd-sweep status smoke`")
def status_command(
    sweep: Annotated[Optional[str], typer.Argument(help="Sweep name (default: all sweeps).")] = None,
    tracking_uri: TrackingUriOption = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "podd-sweep",
    all_trials: Annotated[bool, typer.Option(
        "--all", help=f"List every trial (a sweep of more than {STATUS_ROWS} shows the "
                      f"unfinished ones and the 10 best finished).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON (every sweep, its counts and every trial) instead.")] = False,
) -> None:
    """Trials of a sweep by state, with their best test accuracy so far (from MLflow)."""
    import json

    from orchestrator.status import INTERRUPTED, sweep_status

    with user_errors():
        sweeps = sweep_status(tracking_uri, experiment, sweep)
    if as_json:
        print(json.dumps([entry.to_dict() for entry in sweeps], indent=1))
        return
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
        if entry.status == INTERRUPTED:
            console.print(f"no driver runs sweep {entry.name} any more, yet it was never closed "
                          f"(its driver was killed, its machine went down, or it could not "
                          f"reach the store as it ended): `{entry.resume}` (from the folder it "
                          f"was launched in) resumes it from its checkpoints", highlight=False,
                          soft_wrap=True)
        if entry.search is not None:
            from orchestrator.search_record import describe

            for search in entry.search["searches"]:
                console.print("search " + "\n".join(describe(search,
                                                              entry.search["criterion"])),
                              highlight=False, soft_wrap=True)


@app.command("ui", epilog="Example: `podd-sweep ui --port 5000`")
def ui_command(
    tracking_uri: TrackingUriOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    workers: Annotated[int, typer.Option(
        help="Server worker processes (MLflow's default is 4; one answers in seconds and "
             "serves one person).", min=1)] = 1,
) -> None:
    """Start the MLflow UI on the sweep store (open http://HOST:PORT in a browser). A folder
    without a store is refused: the UI would create and serve an empty one."""
    import importlib.util
    import os
    import sys

    from orchestrator.store import check_local_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    with user_errors():
        if importlib.util.find_spec("mlflow") is None:
            raise UserError("mlflow is not installed in this environment: pip install -e . "
                             "installs it")
        if uri.startswith(("http://", "https://")):
            raise UserError(f"--tracking-uri {uri} is a tracking server: open it in a browser "
                             f"directly, it already serves the UI")
        check_local_store(uri)  # says where the store was expected, and --tracking-uri
    err_console.print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)")
    # this interpreter's mlflow, not whichever `mlflow` is first on PATH (podd-sweep may run
    # from a virtual environment that is not activated)
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                              "--host", host, "--port", str(port), "--workers", str(workers)])
