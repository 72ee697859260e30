"""Property: any `--set KEY=VALUE`, any launch override and any edit of an artifact's
poster.json is either accepted or refused with exit code 2 and one `error:` line; never a
traceback, and nothing is written."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.cli import app
from podd_engine.config import TrialConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def saved_artifact(tmp_path_factory):
    """A tiny real poster artifact (digits, 2 outer steps)."""
    out = tmp_path_factory.mktemp("saved") / "art"
    result = runner.invoke(app, [
        "distill", "--dataset", "digits", "--ipc", "0.6", "--steps", "2", "--eval-models", "1",
        "--out", str(out), "--set", "width=8", "--set", "total_inner_steps=4", "--set",
        "window=2", "--set", "distill_batch=16", "--set", "real_batch=64", "--set",
        "real_chunk=64", "--set", "eval_steps=[10]", "--set", "patch_grid=8x3", "--order",
        "identity", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


FIELDS = sorted(TrialConfig.__dataclass_fields__) + ["widht", "seeds", "", "a.b", "-x"]
VALUE_TEXTS = st.one_of(
    st.sampled_from(["", "null", "[", "[1,2", "{a: 1", "true", "-1", "0", ".inf", ".nan",
                     "1e12", "16x6", "[300, x]", "'quoted'", "poco", "cuda", "[[0, 1]]"]),
    st.integers(-5, 10 ** 6).map(str), st.floats(allow_nan=True).map(str),
    st.text(max_size=10))


def assert_one_line_or_ok(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(FIELDS), value=VALUE_TEXTS)
def test_any_set_value_is_accepted_or_one_line(key, value, tmp_path_factory):
    folder = tmp_path_factory.mktemp("set")
    result = runner.invoke(app, ["distill", "--dataset", "digits", "--ipc", "1", "--set",
                                 f"{key}={value}", "--print-config", "--out",
                                 str(folder / "out")])
    assert_one_line_or_ok(result)
    assert list(folder.iterdir()) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["name", "ipc", "seeds", "settings.steps", "settings.window",
                            "resources.cpu", "patch_grid", "method", "max_concurrent",
                            "name.x", "bogus", "9", "settings"]), value=VALUE_TEXTS)
def test_any_launch_override_is_accepted_or_one_line(key, value, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov")
    spec = folder / "s.yaml"
    spec.write_text("name: s\ndataset: digits\nipc: 1\nclass_order: identity\npatch_grid: 4x2\n"
                    "settings: {width: 8, steps: 2}\n")
    result = runner.invoke(app, ["launch", str(spec), f"{key}={value}", "--print-spec"])
    assert_one_line_or_ok(result)
    assert sorted(p.name for p in folder.iterdir()) == ["s.yaml"]


ARTIFACT_KEYS = ["config", "geometry", "label_mode", "class_names", "format_version", "sha256",
                 "label_grid", "metrics", "preprocessing", "embedder"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(ARTIFACT_KEYS),
       value=st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=5), st.lists(
           st.integers(0, 9), max_size=3), st.dictionaries(st.sampled_from(
               ["width", "ipc", "channels", "x"]), st.integers(-1, 64), max_size=2)),
       sealed=st.booleans())
def test_an_edited_artifact_is_refused_in_one_line_or_loads(key, value, sealed, saved_artifact,
                                                            tmp_path_factory):
    """poster.json edited anyhow: `evaluate` either works or says in one line what is wrong
    (a sealed file is always refused; an older unsealed one is checked field by field)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("art") / "art"
    shutil.copytree(saved_artifact, folder)
    meta = json.loads((folder / "poster.json").read_text())
    changed = key not in meta or meta[key] != value
    meta[key] = value
    if not sealed:
        meta.pop("metadata_sha256")
    (folder / "poster.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["evaluate", str(folder), "--models", "1", "--device", "cpu"])
    assert_one_line_or_ok(result)
    if sealed and changed:  # (a field set to the value it had is no edit)
        assert result.exit_code == 2 and "was changed after the distillation" in result.stderr


@pytest.mark.parametrize("key", ARTIFACT_KEYS)
def test_every_field_of_an_unsealed_artifact_is_checked(key, saved_artifact, tmp_path):
    """Each field set to null, a number and an empty list in an older (unsealed) poster.json:
    sampling alone once missed one field for many CI runs, so every field is tried."""
    import json
    import shutil

    for value in (None, 3, []):
        folder = tmp_path / f"art-{value!r}"
        shutil.copytree(saved_artifact, folder)
        meta = json.loads((folder / "poster.json").read_text())
        meta[key] = value
        meta.pop("metadata_sha256")
        (folder / "poster.json").write_text(json.dumps(meta))
        result = runner.invoke(app, ["evaluate", str(folder), "--models", "1", "--device", "cpu"])
        assert_one_line_or_ok(result)


DISTILL_OPTIONS = ["--ipc", "--steps", "--eval-models", "--seed", "--device", "--preset",
                   "--method", "--labels", "--order", "--embedder", "--class-grid",
                   "--patch-grid"]


@settings(max_examples=60, deadline=None)
@given(option=st.sampled_from(DISTILL_OPTIONS), value=VALUE_TEXTS)
def test_any_typed_distill_option_is_accepted_or_one_line(option, value):
    """The typed options, parsed by the command line itself (a number that is no number, a
    choice that is none): `--print-config` resolves the settings and runs nothing."""
    result = runner.invoke(app, ["distill", "--dataset", "digits", "--print-config", option,
                                 value])
    assert_one_line_or_ok(result)


def test_every_typed_option_of_every_command_refuses_garbage_in_one_line():
    """Each option that takes a number, of every command, given something that is none: one
    line naming the command and the option (typer's own is a boxed, multi-line message)."""
    import typer

    command = typer.main.get_command(app)
    checked = 0
    for name, sub in command.commands.items():
        for path, leaf in ([([name], sub)] if not hasattr(sub, "commands") else
                           [([name, n], c) for n, c in sub.commands.items()]):
            for param in leaf.params:
                # (typer vendors its own click: the option's kind by name, not by class)
                if param.param_type_name != "option" or getattr(param, "is_flag", False):
                    continue
                if param.type_descriptor.annotation not in (int, float):
                    continue
                args = [*path, *(["SPEC"] if name == "launch" else []), param.opts[0], "abc"]
                result = runner.invoke(app, args)
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
                assert lines[0].startswith(f"error: podd-sweep {' '.join(path)}: Invalid "
                                           f"value for '{param.opts[0]}'"), lines[0]
                checked += 1
    assert checked >= 6  # --ipc, --steps, --eval-models, --seed, --models, --port, --workers...
