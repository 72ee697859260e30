"""Command-line overrides of a sweep spec (`launch SPEC key=value ...`): parsed as YAML,
dotted keys into mappings, validated like the file, recorded with the sweep."""

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.overrides import apply_overrides, parse_override, parse_overrides
from orchestrator.spec_file import SpecError
from orchestrator.sweep import load_sweep
from podd_engine.data import create_dataset
from podd_engine.errors import UserError

runner = CliRunner()

SPEC = ("name: ov\ndataset: digits\nclass_order: identity\npatch_grid: 4x2\nipc: [0.5, 1.0]\n"
        "seeds: [0, 1]\nmax_concurrent: 2\n"
        "settings: {width: 8, steps: 6, total_inner_steps: 4, window: 2, distill_batch: 16, "
        "real_batch: 64, real_chunk: 64, eval_models: 1, eval_steps: [20]}\n")


def spec_file(folder: Path) -> Path:
    path = folder / "ov.yaml"
    path.write_text(SPEC + f"storage: {folder / 'ray'}\n"
                           f"tracking_uri: sqlite:///{folder / 'mlflow.db'}\n")
    return path


@pytest.mark.parametrize("text, path, value", [
    ("seeds=[0]", ("seeds",), [0]),
    ("ipc=0.5", ("ipc",), 0.5),
    ("settings.steps=300", ("settings", "steps"), 300),
    ("dataset=parquet:../shared/datasets/cifar10-jpeg", ("dataset",),
     "parquet:../shared/datasets/cifar10-jpeg"),
    ("method=[podd, rat-bptt]", ("method",), ["podd", "rat-bptt"]),
    ("max_concurrent=null", ("max_concurrent",), None),
    ("resources.cpu=2", ("resources", "cpu"), 2),
])
def test_an_override_is_a_dotted_key_and_a_yaml_value(text, path, value):
    o = parse_override(text)
    assert (o.path, o.value, o.text) == (path, value, text)


def test_overrides_apply_to_a_copy_and_null_restores_the_default():
    spec = {"name": "s", "settings": {"steps": 10}, "max_concurrent": 2}
    resolved = apply_overrides(spec, parse_overrides(
        ["settings.steps=300", "settings.width=16", "resources.cpu=2", "max_concurrent=null"]))
    assert resolved == {"name": "s", "settings": {"steps": 300, "width": 16},
                        "resources": {"cpu": 2}}
    assert spec == {"name": "s", "settings": {"steps": 10}, "max_concurrent": 2}


@pytest.mark.parametrize("texts, message", [
    (["steps"], "override 'steps': give KEY=VALUE"),
    (["seeds="], "override 'seeds=': no value after '='"),
    (["seeds=[0"], "is not a YAML value"),
    (["9x=1"], "'9x' is not a spec key"),
    (["ipc=1", "ipc=2"], "ipc is set twice"),
])
def test_a_malformed_override_is_one_line_naming_it(texts, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as caught:
        parse_overrides(texts)
    assert "\n" not in str(caught.value)


def test_an_overridden_spec_is_checked_like_the_file(tmp_path):
    path = spec_file(tmp_path)
    sweep = load_sweep(path, dataset_info=create_dataset,
                       overrides=["seeds=[3]", "ipc=1", "settings.steps=4", "name=ov-s3"])
    assert sweep.name == "ov-s3" and len(sweep.trials) == 1
    (trial,) = sweep.trials
    assert (trial.config.seed, trial.config.ipc, trial.config.steps) == (3, 1.0, 4)
    assert path.read_text().startswith("name: ov\n")  # the file is left alone
    resolved = yaml.safe_load(sweep.resolved_text())
    assert resolved["seeds"] == [3] and resolved["settings"]["steps"] == 4
    assert sweep.resolved_text().startswith(f"# {path} with seeds=[3] ipc=1")

    for overrides, message in [
            (["settings.steps=abc"], "(with settings.steps=abc): settings.steps: steps must be a "
                                     "whole number"),
            (["ipc=[0.5, -1]"], "(with ipc=[0.5, -1]): ipc[1]:"),
            (["name.first=x"], "name is str 'ov' in the spec, not a mapping"),
            (["bogus=1"], "(with bogus=1): bogus: unknown key")]:
        with pytest.raises(SpecError) as caught:
            load_sweep(path, dataset_info=create_dataset, overrides=overrides)
        assert message in str(caught.value), str(caught.value)


def test_print_spec_shows_the_resolved_spec_and_bad_overrides_exit_2(tmp_path):
    path = spec_file(tmp_path)
    shown = runner.invoke(app, ["launch", str(path), "seeds=[0]", "settings.steps=3",
                                "--print-spec"])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout)["settings"]["steps"] == 3
    assert shown.stdout.startswith(f"# {path} with seeds=[0] settings.steps=3\n")
    bad = runner.invoke(app, ["launch", str(path), "settings.steps=", "--dry-run"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "error: override 'settings.steps=': no value after '=': give one (e.g. "
        "settings.steps=...), or settings.steps=null to use the default"]
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_dry_run_lists_the_overridden_trials(tmp_path):
    result = runner.invoke(app, ["launch", str(spec_file(tmp_path)), "seeds=[0,1,2]",
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 trials" in result.output


@pytest.mark.usefixtures("ray_local")
def test_a_launch_with_overrides_records_them_and_the_spec_that_ran(tmp_path):
    from orchestrator.tune import launch

    path = spec_file(tmp_path)
    sweep = load_sweep(path, dataset_info=create_dataset,
                       overrides=["seeds=[0]", "ipc=1", "settings.steps=2"])
    outcome = launch(sweep, verbose=0)
    assert set(outcome.states.values()) == {"FINISHED"} and len(outcome.states) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("podd-sweep").experiment_id],
        "tags.`podd.role` = 'sweep'")
    assert parent.data.params["overrides"] == "seeds=[0] ipc=1 settings.steps=2"
    recorded = Path(client.download_artifacts(parent.info.run_id, "sweep.yaml",
                                              str(tmp_path / "p"))).read_text()
    assert recorded == sweep.resolved_text()
    assert yaml.safe_load(recorded)["settings"]["steps"] == 2


@pytest.mark.parametrize("text, value", [("0x10", "0x10"), ("017", "017"), ("1:20", "1:20"),
                                         ("16", 16), ("-3", -3), ("1_000", 1000),
                                         ("0.5", 0.5), (".inf", float("inf")),
                                         ("[0, 1]", [0, 1]), ("16x6", "16x6")])
def test_only_decimal_numbers_are_numbers(text, value):
    """YAML 1.1 reads 0x10 as 16 (hex), 017 as 15 (octal), 1:20 as 80 (base 60): a grid typed
    as 0x10 was refused as "grid '16' is not COLSxROWS", a grid the user never wrote."""
    from orchestrator.overrides import load_yaml
    from orchestrator.spec_file import read_spec_mapping

    assert load_yaml(text) == value
    assert read_spec_mapping(f"x: {text}\n")["x"] == value


def test_a_zero_grid_is_refused_as_written(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ndataset: digits\nipc: 1\n")
    result = runner.invoke(app, ["launch", str(spec), "patch_grid=0x10", "--print-spec"])
    assert result.exit_code == 2
    assert "patch_grid: grid 0x10 needs at least one column and one row" in result.stderr
    result = runner.invoke(app, ["distill", "--dataset", "digits", "--ipc", "1",
                                 "--print-config", "--set", "patch_grid=0x5"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: patch_grid 0x5 needs at least one column and one row"
