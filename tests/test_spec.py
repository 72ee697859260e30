"""Sweep specs: validation with field paths, grid expansion, stable keys, the shipped sweeps,
and `launch --dry-run` (no Ray needed)."""

from pathlib import Path

import pytest
from datafiles import write_cifar_folder
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.spec import parse_spec
from orchestrator.spec_file import SpecError
from orchestrator.sweep import expand, load_sweep
from podd_engine.data import create_dataset

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
runner = CliRunner()

TINY = """
name: t
dataset: digits
ipc: [0.5, 1.0]
patch_grid: ["4x2", [6, 3]]
class_order: identity
seeds: [0, 1]
include:
  - {method: rat-bptt, ipc: 1}
settings: {width: 8, steps: 4, total_inner_steps: 4, window: 2, distill_batch: 16,
           real_batch: 64, eval_models: 1, eval_steps: [10]}
"""


def digits_info(name):
    return create_dataset(name)


@pytest.mark.parametrize("text, message", [
    ("name: t\ndataset: digits\nipc: 1\nipcs: [1]\n", "ipcs: unknown key; valid keys here:"),
    ("name: t\ndataset: digits\nipc: [0.5, -1]\n", "ipc[1]: Input should be greater than 0 (got -1)"),
    ("name: t\ndataset: digits\nipc: [0.5, abc]\n", "ipc[1]: Input should be a valid number"),
    ("name: t\ndataset: digits\nipc: 1\nmethod: [podd, mtt]\n",
     "method[1]: Input should be 'podd', 'rat-bptt' or 'random-real' (got 'mtt')"),
    ("name: t\ndataset: digits\nipc: 1\npatch_grid: 16by6\n", "patch_grid: grid '16by6' is not"),
    ("name: t\ndataset: digits\nipc: 1\nseeds: []\n", "seeds: List should have at least 1 item"),
    ("name: t\ndataset: digits\nipc: 1\nseeds: [0, 1, 0]\n",
     "seeds[2]: 0 is given twice (also at [0]): keep one"),
    ("name: t\ndataset: digits\nipc: [0.5, 1, 1.0]\n",
     "ipc[2]: 1.0 is given twice (also at [1]): keep one"),
    ("name: t\ndataset: digits\nipc: 1\npatch_grid: [16x6, [16, 6]]\n",
     "patch_grid[1]: '16x6' is given twice (also at [0]): keep one"),
    # found by the property test: a null data set was a KeyError when the trials were made
    ("name: t\ndataset: null\nipc: 1\n", "dataset: Input should be a valid string (got None)"),
    ("name: t\ndataset: digits\nipc: null\n", "ipc: Input should be a valid number (got None)"),
    ("name: t\ndataset: digits\nipc: 1\ninclude: [{method: rat-bptt, ipcs: 1}]\n",
     "include[0].ipcs: unknown key"),
    ("name: t\ndataset: digits\nipc: 1\nresources: {cpu: 1, gpus: 1}\n",
     "resources.gpus: unknown key; valid keys here: cpu, gpu"),
    ("name: t\ndataset: digits\nipc: 1\nresources: {gpu: -0.5}\n",
     "resources.gpu: Input should be greater than or equal to 0"),
    ("name: t\ndataset: digits\nipc: 1\nschedules: [{width: 8}, {widht: 8}]\n",
     "schedules[1]: unknown engine setting 'widht'"),
    ("name: t\ndataset: digits\nipc: 1\nschedules: [{seed: 3}]\n",
     "schedules[0]: 'seed' is set at the top level of the spec (seeds:)"),
    ("name: t\ndataset: digits\nipc: 1\nschedules: [{}]\n", "schedules[0]: an empty schedule"),
    ("name: t\ndataset: digits\nipc: 1\nsettings: {widht: 8}\n",
     "settings: unknown engine setting 'widht'"),
    ("name: t\ndataset: digits\nipc: 1\nsettings: {ipc: 2}\n",
     "settings: 'ipc' is set at the top level of the spec (ipc:)"),
    ("name: t\ndataset: digits\nipc: 1\nclass_order: given\n",
     "class_order 'given' needs order_grid"),
    ("name: my sweep\ndataset: digits\nipc: 1\n", "name: String should match pattern"),
    ("dataset: digits\nipc: 1\n", "name: is required"),
    ("name: t\ndataset: digits\nipc: 1\nmax_failures: many\n", "max_failures: Input should be"),
    ("name: t\ndataset: digits\nipc: 1\nstorage: s3://bucket/ray\n",
     "storage: must be a folder, got the URI 's3://bucket/ray'"),
    ("name: t\n  dataset: [\n", "is not valid YAML"),
    ("- just\n- a list\n", "a sweep spec is a YAML mapping"),
    # issue 15's bad inputs: each once accepted, or a traceback
    ("name: a\nname: b\ndataset: digits\nipc: 1\n",
     "line 2: key 'name' is given twice (also on line 1): keep one"),
    ("name: t\ndataset: digits\nipc: 1\nsettings: {width: 8, width: 16}\n",
     "key 'width' is given twice"),
    ("name: t\ndataset: digits\nipc: .inf\n", "ipc: Input should be a finite number"),
    ("name: t\ndataset: digits\nipc: [0.5, .nan]\n", "ipc[1]: Input should be greater than 0 (got nan)"),
    ("name: t\ndataset: digits\nipc: true\n", "ipc: Input should be a number, not the boolean"),
    ("name: t\ndataset: digits\nipc: 1\nseeds: [0, false]\n",
     "seeds[1]: Input should be a number, not the boolean False"),
])
def test_bad_specs_name_the_field(text, message):
    with pytest.raises(SpecError) as error:
        parse_spec(text, "s.yaml")
    assert str(error.value).startswith("s.yaml")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("name: t\ndataset: digits\nipc: [1, 0.05]\npatch_grid: 4x2\n",
     "ipc[1]: ipc 0.05 gives a"),
    ("name: t\ndataset: digits\nipc: 1\nclass_grid: 3x3\n", "class_grid: class_grid 3x3 has 9"),
    ("name: t\ndataset: digits\nipc: 1\ninclude: [{method: rat-bptt, ipc: 0.5}]\n",
     "include[0].ipc: ipc 0.5 is not a whole number"),
    ("name: t\ndataset: digits\nipc: 1\nsettings: {window: 50, total_inner_steps: 10}\n",
     "settings.window: window (50) must not exceed"),
    # found by the property test: a wrongly typed setting was a TypeError deep in validation
    ("name: t\ndataset: digits\nipc: 1\nsettings: {width: []}\n",
     "settings.width: width must be a whole number, got []"),
    ("name: t\ndataset: digits\nipc: 1\nsettings: {eval_steps: [10, x]}\n",
     "settings.eval_steps: eval_steps must be a list of whole numbers"),
    ("name: t\ndataset: digits\nipc: 1\nschedules: [{window: 2, total_inner_steps: 4},"
     " {window: 9, total_inner_steps: 4}]\n",
     "schedules[1].window: window (9) must not exceed total_inner_steps (4)"),
    ("name: t\ndataset: digits\nipc: 1e12\n",
     "ipc: ipc 1e+12 is more than the data set's 143.8 training images per class"),
    ("name: t\ndataset: digits\nipc: 1\npatch_grid: 100000x100000\n",
     "patch_grid: patch_grid 100000x100000 has more patches across or down than the 16x40 "
     "poster has pixels (at most 40x16)"),
    ("name: t\ndataset: digits\nipc: 1\nsettings: {steps: .inf}\n",
     "settings.steps: steps must be a whole number"),
    ("name: t\ndataset: digits\nipc: 1\nsettings: {lr: .inf}\n",
     "settings.lr: lr must be a positive finite number, got inf"),
])
def test_impossible_combinations_are_found_before_anything_runs(text, message):
    with pytest.raises(SpecError, match=None) as error:
        expand(parse_spec(text, "s.yaml"), source="s.yaml", dataset_info=digits_info)
    assert message in str(error.value), str(error.value)


def test_expansion_crosses_the_axes_and_folds_baselines():
    trials = expand(parse_spec(TINY), dataset_info=digits_info)
    podd = [t for t in trials if t.config.method == "podd"]
    baseline = [t for t in trials if t.config.method == "rat-bptt"]
    assert len(podd) == 2 * 2 * 2  # ipc x patch grid x seed
    # the baseline ignores patch grids and orderings: one trial per seed, not per patch grid
    assert len(baseline) == 2 and {t.config.seed for t in baseline} == {0, 1}
    assert {t.config.patch_grid for t in podd} == {"4x2", "6x3"}
    assert all(t.config.device == "cpu" for t in trials)  # no GPU asked for: none used
    assert len({t.key for t in trials}) == len(trials)
    small = next(t for t in podd if t.config.ipc == 0.5)
    assert 0.45 < small.achieved_ipc < 0.55 and small.poster_size[0] * small.poster_size[1] > 0


def test_schedules_cross_the_whole_grid_with_their_settings():
    text = TINY + "schedules:\n  - {window: 1}\n  - {window: 4, width: 12}\n"
    trials = expand(parse_spec(text), dataset_info=digits_info)
    plain = expand(parse_spec(TINY), dataset_info=digits_info)
    assert len(trials) == 2 * len(plain)
    # the top-level settings hold where a schedule does not override them
    assert {(t.config.window, t.config.width) for t in trials} == {(1, 8), (4, 12)}
    first, second = trials[:len(plain)], trials[len(plain):]  # grouped by schedule, in order
    assert {t.config.window for t in first} == {1} and {t.config.window for t in second} == {4}
    assert all(t.config.steps == 4 for t in trials)
    assert len({t.key for t in trials}) == len(trials)


def test_family_decides_the_paper_preset_not_the_shape(tmp_path):
    from datafiles import write_parquet_dataset

    # ten classes of 32x32 images that are not CIFAR-10 (an SVHN copy, say)
    write_parquet_dataset(tmp_path / "svhn", classes=tuple(str(d) for d in range(10)),
                          size=(32, 32), n_train=20)
    base = f"name: t\ndataset: parquet:{tmp_path / 'svhn'}\nipc: 1\npreset: paper\n"

    def info(name):
        return create_dataset(name, cache_dir=tmp_path / "cache")

    with pytest.raises(SpecError, match=r"s.yaml: preset: no paper preset for 'parquet:"):
        expand(parse_spec(base, "s.yaml"), source="s.yaml", dataset_info=info)
    # declared a copy of CIFAR-10, it gets CIFAR-10's settings and records the declaration
    (trial,) = expand(parse_spec(base + "family: cifar10\n"), dataset_info=info)
    assert (trial.config.patch_grid, trial.config.window, trial.config.family) == \
        ("16x6", 60, "cifar10")
    with pytest.raises(SpecError, match="s.yaml: family: .* says it is cifar100, which has 100"):
        expand(parse_spec(base + "family: cifar100\n", "s.yaml"), source="s.yaml",
               dataset_info=info)
    # the declaration is a label, not a setting: it does not change the trial key
    plain = expand(parse_spec(base.replace("preset: paper\n", "") + "family: cifar10\n"),
                   dataset_info=info)
    unlabelled = expand(parse_spec(base.replace("preset: paper\n", "")), dataset_info=info)
    assert plain[0].key == unlabelled[0].key


def test_keys_are_stable_and_ignore_where_files_live():
    first = expand(parse_spec(TINY), dataset_info=digits_info)
    again = expand(parse_spec(TINY.replace("seeds: [0, 1]", "seeds: [1, 0]")
                              + "cache_dir: /elsewhere\nresources: {cpu: 1, gpu: 1}\n"),
                   dataset_info=digits_info)
    assert sorted(t.key for t in first) == sorted(t.key for t in again)
    changed = expand(parse_spec(TINY.replace("width: 8", "width: 16")), dataset_info=digits_info)
    assert not {t.key for t in first} & {t.key for t in changed}


@pytest.mark.parametrize("sweep, count", [("ipc_grid.yaml", 8 * 3 + 3),
                                          ("patch_grid.yaml", 7 * 2),
                                          ("class_order.yaml", 2 * 5),
                                          ("smoke.yaml", 2 * 2 + 2)])
def test_shipped_sweeps_expand_against_cifar10_shapes(sweep, count, tmp_path, monkeypatch):
    # the paper sweeps name cifar10: tiny CIFAR-10 pickles stand in for the download
    write_cifar_folder(tmp_path / "data" / "cifar-10-batches-py")
    shapes = create_dataset("cifar10", data_root=tmp_path / "data", download=False)
    loaded = load_sweep(SWEEPS / sweep, dataset_info=lambda name: shapes)
    assert len(loaded.trials) == count
    for trial in loaded.trials:
        trial.config.validate()
        assert trial.poster_size[0] >= 32 and trial.poster_size[1] >= 32
    if sweep == "ipc_grid.yaml":
        ipcs = sorted({t.config.ipc for t in loaded.trials if t.config.method == "podd"})
        assert ipcs[0] == 0.3 and ipcs[-1] == 1.0
        assert {t.config.patch_grid for t in loaded.trials if t.config.method == "podd"} == {"16x6"}
        assert sum(t.config.method == "rat-bptt" for t in loaded.trials) == 3


def test_dry_run_prints_the_trials_and_starts_nothing(tmp_path, monkeypatch):
    import ray

    import orchestrator.tune

    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append("ray"))
    monkeypatch.setattr(orchestrator.tune, "launch", lambda *a, **k: started.append("launch"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(TINY + "storage: ray-results\n")
    result = runner.invoke(app, ["launch", "s.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sweep t: 10 trials" in result.output and "rat-bptt" in result.output
    assert "10 trials, each 1 CPU + 0 GPU" in result.output
    assert not (tmp_path / "ray-results").exists() and not (tmp_path / "mlflow.db").exists()
    assert not started  # neither a sweep nor Ray was started


@pytest.mark.parametrize("text, message", [
    ("name: t\ndataset: digits\nipc: 1\nmethod: mtt\n", "s.yaml: method: Input should be 'podd'"),
    ("name: t\ndataset: parquet:/nowhere\nipc: 1\n", "s.yaml: dataset: "),
    ("name: t\ndataset: digits\nipc: 0.01\n", "s.yaml: ipc: ipc 0.01 gives a"),
])
def test_launch_bad_spec_one_line_exit_2(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(text)
    result = runner.invoke(app, ["launch", "s.yaml"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("dataset, says", [
    ("parquet:../nowhere/cifar", "a relative path is read from the folder launch runs in"),
    ("cifar10", "set `data_root:` in the spec (or the override data_root=PATH, or "
                "PODD_DATA_ROOT) to the folder that holds cifar-10-batches-py (a dry run "
                "downloads nothing"),
])
def test_missing_data_is_explained_in_a_sweeps_words(dataset, says, tmp_path, monkeypatch):
    """launch has no --data-root (distill has): the advice names the spec's field, and a
    relative path says which folder it was read from."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(f"name: t\ndataset: {dataset}\nipc: 1\n")
    result = runner.invoke(app, ["launch", "s.yaml", "--dry-run"])
    assert result.exit_code == 2, result.output
    line = " ".join(result.stderr.split())
    assert says in line and "--data-root" not in line, line
    if dataset.startswith("parquet:"):
        assert str(tmp_path) in line


def test_launch_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["launch", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no sweep spec at" in result.stderr


def test_missing_clip_weights_stop_launch_but_not_dry_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "s.yaml").write_text("name: t\ndataset: digits\nipc: 1\nclass_order: poco\n"
                                     "settings: {embedder: clip, clip_weights: /no/weights.bin}\n")
    result = runner.invoke(app, ["launch", "s.yaml"])
    assert result.exit_code == 2
    assert "error: s.yaml: class_order: poco with embedder clip" in result.stderr
    dry = runner.invoke(app, ["launch", "s.yaml", "--dry-run"])
    assert dry.exit_code == 0 and "warning: s.yaml: class_order: poco" in dry.stderr


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: t\ndataset: digits\nipc: 1\n# caf\xe9\n")
    result = runner.invoke(app, ["launch", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {path}: not UTF-8 text (byte 0xe9 at offset 36): "
                                     f"save it as UTF-8")
