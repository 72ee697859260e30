"""What a trial records of where it came from (podd_engine/provenance.py), on real git
repositories made for the test."""

import subprocess
from importlib.metadata import version

import pytest
import torch

from podd_engine import provenance


def git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A checkout with the engine's code in it, standing in for the project's."""
    root = tmp_path / "checkout"
    (root / "podd_engine").mkdir(parents=True)
    (root / "podd_engine" / "rat_bptt.py").write_text("x = 1\n")
    (root / "README.md").write_text("docs\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(provenance, "SOURCE", root.resolve())
    provenance.engine_revision.cache_clear()
    yield root
    provenance.engine_revision.cache_clear()


def revision():
    provenance.engine_revision.cache_clear()
    return provenance.engine_revision()


def head(root):
    return subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_checkout_records_its_commit_and_whether_the_engine_code_was_changed(source):
    base = version("podd-sweep")
    assert revision() == f"{base}+g{head(source)}"
    (source / "README.md").write_text("other docs\n")  # not code: the results are the same
    assert revision() == f"{base}+g{head(source)}"
    (source / "podd_engine" / "rat_bptt.py").write_text("x = 2\n")
    assert revision() == f"{base}+g{head(source)}.dirty"


def test_outside_its_own_checkout_only_the_version_is_recorded(source, tmp_path, monkeypatch):
    inside = source / "venv" / "site-packages"  # installed into a folder of another repo
    inside.mkdir(parents=True)
    monkeypatch.setattr(provenance, "SOURCE", inside.resolve())
    assert revision() == version("podd-sweep")
    plain = tmp_path / "plain"  # no git at all
    plain.mkdir()
    monkeypatch.setattr(provenance, "SOURCE", plain.resolve())
    assert revision() == version("podd-sweep")


def test_the_device_is_named_as_it_ran():
    assert provenance.device_used("cpu") == "cpu"
    facts = provenance.provenance(torch.device("cpu"))
    assert facts["torch_version"] == torch.__version__ and facts["device_used"] == "cpu"
    if torch.cuda.is_available():  # the GPU machine: its name, and TF32 when cuDNN uses it
        assert provenance.device_used("cuda").startswith(
            f"cuda ({torch.cuda.get_device_name(0)}")
