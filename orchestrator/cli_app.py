"""The `podd-sweep` app and what its commands share: the typer app, the consoles, the shared
options, `user_errors` (an error the user can fix: one line `error: ...`, exit code 2) and the
progress bar. The commands (cli_engine, cli_sweeps, cli_report) import it; `orchestrator.cli`
imports them, so no two modules import each other.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn)

from podd_engine.errors import first_line

if TYPE_CHECKING:
    from podd_engine import data

app = typer.Typer(
    name="podd-sweep",
    help="Sweeps of Poster Dataset Distillation (PoDD) on Ray Tune, recorded in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # paragraphs reflow; [brackets] stay text
    add_completion=True,  # --install-completion / --show-completion for the user's shell
)
datasets_app = typer.Typer(help="List data sets, or fill the decoded-tensor cache.",
                           invoke_without_command=True,
                           epilog="Example: `podd-sweep datasets --json`")
app.add_typer(datasets_app, name="datasets")

# Piped output (logs, CI) gets room for the trial tables rather than rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

USER_ERROR_EXIT_CODE = 2

# Defaults and environment variables are given to typer (envvar/show_default), which shows
# them escaped: text in [brackets] inside a help string is rich markup and would vanish.
DataRootOption = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Folder holding downloaded data sets.", envvar="PODD_DATA_ROOT",
    show_default="./data")]
CacheDirOption = Annotated[Optional[Path], typer.Option(
    "--cache-dir", help="Decoded-tensor cache.", envvar="PODD_CACHE_DIR",
    show_default="~/.cache/podd-sweep")]
TrackingUriOption = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow store (else the spec's tracking_uri).",
    envvar="MLFLOW_TRACKING_URI", show_default="sqlite:///mlflow.db in this folder")]


def _flags_take_no_value() -> None:
    """Typer's rich help gives every option a type column, flags too (`--dry-run <bool>`),
    which reads as if the flag took a value; a flag has no type to show."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_podd_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._podd_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()


def _usage_errors_in_one_line() -> None:
    """A bad option or argument (`--ipc abc`, an unknown option, a missing SPEC) is one line
    `error: ...` naming the command and the fix, like every other bad input (typer's own is
    a usage line, a hint and a boxed message). The exit code stays click's 2."""
    from typer import rich_utils

    if getattr(rich_utils.rich_format_error, "_podd_one_line", False):
        return

    def one_line(error) -> None:
        if error.__class__.__name__ == "NoArgsIsHelpError":  # the help is shown instead
            return
        ctx = getattr(error, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        fix = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = " ".join(error.format_message().split())
        err_console.print(f"[bold red]error:[/] {escape(where + message + fix)}",
                          highlight=False, soft_wrap=True)

    one_line._podd_one_line = True
    rich_utils.rich_format_error = one_line


_usage_errors_in_one_line()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors the user can fix into one line on stderr and exit code 2. They are raised
    as `UserError` (podd_engine.errors: with the field at fault where known); a ValueError or a
    missing file from a library below is shown the same way rather than as a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:  # UserError is a ValueError
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
