"""The `podd-sweep` command line: listing, preparing, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datafiles import write_parquet_dataset
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "podd-sweep"
    assert exe.exists(), "pip install should put podd-sweep beside the interpreter"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("podd-sweep ")


def test_datasets_lists_every_registry_entry():
    result = run("datasets", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["cifar10", "cifar100", "cub200", "tiny-imagenet",
                                         "parquet:PATH", "imagefolder:PATH", "digits"]
    status = {r["name"]: r["status"] for r in rows}
    assert status["cifar10"] == "downloads on first use"  # the test's empty data root


def test_datasets_table_and_cache_location(tmp_path):
    result = run("datasets")
    assert result.exit_code == 0
    for name in ("cifar100", "tiny-imagenet", "imagefolder:PATH", "digits"):
        assert name in result.stdout
    assert str(tmp_path / "cache" / "datasets") in result.stdout.replace("\n", "")


def test_prepare_fills_the_cache_and_reports(tmp_path):
    write_parquet_dataset(tmp_path / "pq")
    result = run("datasets", "prepare", f"parquet:{tmp_path / 'pq'}")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["train"], summary["test"], summary["num_classes"]) == (12, 6, 3)
    assert (tmp_path / "cache" / "datasets").glob("parquet-pq-*.pt")
    assert list((tmp_path / "cache" / "preprocessing").glob("zca-*.pt"))
    listed = {r["name"]: r for r in json.loads(run("datasets", "--json").stdout)}
    assert listed["digits"]["status"] == "files present"


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # one line, and last
    assert "Traceback" not in result.output
    return errors[0]


def test_unknown_dataset_exit_code_2():
    line = one_error_line(run("datasets", "prepare", "imagenet21k"))
    assert "unknown data set 'imagenet21k'" in line and "cifar10" in line


def test_missing_folder_exit_code_2(tmp_path):
    line = one_error_line(run("datasets", "prepare", "cifar10", "--no-download",
                              "--data-root", str(tmp_path / "none")))
    assert "cifar-10-batches-py" in line


@pytest.mark.parametrize("classes_json,message", [
    (None, "no column 'image'"),
    ('{"classes": ["cat", "dog"]}', "train labels span 0..2 but there are 2 class names"),
    ('{"classes": []}', "the class-name list is empty"),
    ('{"names": []}', "classes.json is not valid"),
])
def test_bad_parquet_exit_code_2(tmp_path, classes_json, message):
    write_parquet_dataset(tmp_path / "pq", image_column="img" if classes_json is None else "image")
    if classes_json is not None:
        (tmp_path / "pq" / "classes.json").write_text(classes_json)
    line = one_error_line(run("datasets", "prepare", f"parquet:{tmp_path / 'pq'}"))
    assert message in line
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
