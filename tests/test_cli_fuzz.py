"""Property: any `--set KEY=VALUE` and any launch override is either accepted (the resolved
settings print) or refused with exit code 2 and one `error:` line; never a traceback, and
nothing is written."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.cli import app
from podd_engine.config import TrialConfig

runner = CliRunner()
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
