"""Every command's --help says all it should: each option's help, its default and environment
variable (rich markup once swallowed text in [brackets]), flags as flags, and an example."""

import re

import pytest
import typer
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
COMMAND = typer.main.get_command(app)


def commands():
    """(path, click command) for every command and subcommand."""
    found = []

    def walk(group, path):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group (typer vendors its own click)
                walk(command, path + [name])
                if command.callback is not None:
                    found.append((path + [name], command))
            else:
                found.append((path + [name], command))

    walk(COMMAND, [])
    return found


def flat(text: str) -> str:
    """The help text without box drawing, line breaks or repeated spaces (and without the
    backticks of code spans, which the markdown help renders as code)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text.replace("`", "")).split())


@pytest.mark.parametrize("path, command", commands(), ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_help_shows_every_option_in_full_with_its_default_and_env(path, command):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    shown = flat(result.output)
    for param in command.params:
        if param.name == "help" or getattr(param, "hidden", False):
            continue
        help_text = flat(param.help or "")
        assert help_text in shown, f"{' '.join(path)} {param.opts}: {help_text!r} lost"
        if getattr(param, "envvar", None):
            assert f"env var: {param.envvar}" in shown, (path, param.opts)
        if isinstance(param.show_default, str):
            assert param.show_default in shown, (path, param.opts)
        if getattr(param, "is_flag", False):
            line = next(line for line in result.output.splitlines() if param.opts[0] in line)
            assert "<bool>" not in line, f"{param.opts[0]} shown as taking a value: {line}"
    if command.callback is not None:
        assert "Example: podd-sweep " + " ".join(path) in shown, f"{path}: no example"


def test_completion_can_be_installed():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in result.output and "--show-completion" in result.output
