"""Property: any malformed sweep spec is refused by `launch` with exit code 2 and one line that
names the field, before Ray could start; never a traceback."""

import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import orchestrator.cli as cli
import orchestrator.cli_sweeps as cli_sweeps
import orchestrator.tune as tune
from orchestrator.spec import AXES, SweepSpec

runner = CliRunner()

VALID = {"name": "fuzz", "dataset": "digits", "ipc": [0.5, 1.0], "patch_grid": "4x2",
         "class_order": "identity", "seeds": [0],
         "settings": {"width": 8, "steps": 2, "total_inner_steps": 4, "window": 2},
         "resources": {"cpu": 1}, "include": [{"method": "rat-bptt", "ipc": 1}]}
KEYS = sorted(SweepSpec.model_fields) + ["ipcs", "Name", "resource", "seed"]
NESTED = {"settings": ["width", "window", "steps", "lr", "widht", "ipc", "eval_steps"],
          "resources": ["cpu", "gpu", "gpus"], "include": list(AXES) + ["ipcc"]}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300),
                    st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from(["", "16x6", "0x3", "podd", "rat-bptt", "mtt", "poco",
                                     "given", "learned", "digits", "parquet:/nowhere", "a b"]),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mutated_specs(draw):
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "delete", "nested"]))
        if action == "set":
            doc[draw(st.sampled_from(KEYS))] = draw(values)
        elif action == "delete" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
        else:
            parent = draw(st.sampled_from(sorted(NESTED)))
            key = draw(st.sampled_from(NESTED[parent]))
            if parent == "include":
                doc["include"] = [{key: draw(values)}]
            elif isinstance(doc.get(parent), dict):
                doc[parent][key] = draw(values)
    return doc


def run_launch(tmp_path, monkeypatch, text: str):
    started = []
    monkeypatch.setattr(tune, "launch", lambda *a, **k: started.append(1) or (_ for _ in ()).throw(
        AssertionError("a valid spec reached launch")))
    monkeypatch.setattr(cli_sweeps, "_embedder_problems", lambda sweep: [])  # has its own test
    # a relative path in the spec (cache_dir: poco) resolves against the working folder, as
    # for a user: keep it in the test's own folder, not the one pytest runs from
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(text)
    result = runner.invoke(app_, ["launch", str(path)])
    return result, started


app_ = cli.app


def surely_invalid(doc) -> str | None:
    """An independent oracle for the mutations that can never be valid: why, or None."""
    if not isinstance(doc, dict):
        return "not a mapping"
    unknown = set(doc) - set(SweepSpec.model_fields)
    if unknown:
        return f"unknown keys {sorted(unknown)}"
    missing = {"name", "dataset", "ipc"} - set(doc)
    if missing:
        return f"missing {sorted(missing)}"
    ipcs = doc["ipc"] if isinstance(doc["ipc"], list) else [doc["ipc"]]
    if not ipcs or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                       for v in ipcs):
        return f"ipc {doc['ipc']!r}"
    settings_ = doc.get("settings")
    if isinstance(settings_, dict) and {"widht", "ipc"} & set(settings_):
        return f"settings {sorted(settings_)}"
    resources = doc.get("resources")
    if isinstance(resources, dict) and "gpus" in resources:
        return "resources.gpus"
    if any(isinstance(e, dict) and "ipcc" in e for e in doc.get("include") or []):
        return "include[].ipcc"
    return None


def check_refused_or_valid(result, started, doc):
    assert "Traceback" not in result.output
    if started:  # it got as far as launch (stubbed): it must not be surely invalid
        assert surely_invalid(doc) is None, (surely_invalid(doc), doc)
        return
    assert result.exit_code == 2, (result.exit_code, result.output, doc)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    # the message starts with the path of the field at fault: a key of the spec, a required
    # key it lacks, or a trial's axis values when a combination is impossible
    match = re.match(r"error: \S*s\.yaml: ([^\s:\[.]+)", lines[0])
    assert match, lines[0]
    assert match.group(1) in set(doc) | {"name", "dataset", "ipc", "trial", "(top"}, lines[0]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=mutated_specs())
def test_mutated_specs_are_refused_cleanly(doc, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        result, started = run_launch(tmp_path, patch, yaml.safe_dump(doc))
    check_refused_or_valid(result, started, doc)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_arbitrary_text_is_refused_cleanly(text, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        result, started = run_launch(tmp_path, patch, text)
    assert not started and result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
