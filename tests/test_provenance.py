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
    (root / "orchestrator").mkdir()
    (root / "orchestrator" / "tune.py").write_text("y = 1\n")
    (root / "README.md").write_text("docs\n")
    git(root, "init", "-q")
    commit(root, "one")
    monkeypatch.setattr(provenance, "SOURCE", root.resolve())
    return root


def commit(root, message):
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)


def head(root):
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_checkout_records_its_code_and_changes_to_it_not_to_its_docs(source):
    base = version("podd-sweep")
    first, commit_one = provenance.read_revision()
    assert first.startswith(f"{base}+code.") and "dirty" not in first
    assert commit_one == head(source)
    (source / "README.md").write_text("other docs\n")  # not code: the results are the same
    commit(source, "docs")
    assert provenance.read_revision() == (first, head(source))
    (source / "podd_engine" / "rat_bptt.py").write_text("x = 2\n")  # an uncommitted edit
    edited, _ = provenance.read_revision()
    assert edited.startswith(f"{first}.dirty.")
    (source / "podd_engine" / "rat_bptt.py").write_text("x = 3\n")  # another one
    assert provenance.read_revision()[0] not in (first, edited)
    (source / "podd_engine" / "rat_bptt.py").write_text("x = 1\n")
    (source / "orchestrator" / "new_module.py").write_text("z = 1\n")  # a new, untracked one
    assert ".dirty." in provenance.read_revision()[0]
    commit(source, "code")
    committed, _ = provenance.read_revision()
    assert committed != first and "dirty" not in committed


def test_outside_its_own_checkout_only_the_version_is_recorded(source, tmp_path, monkeypatch):
    inside = source / "venv" / "site-packages"  # installed into a folder of another repo
    inside.mkdir(parents=True)
    monkeypatch.setattr(provenance, "SOURCE", inside.resolve())
    assert provenance.read_revision() == (version("podd-sweep"), "")
    plain = tmp_path / "plain"  # no git at all
    plain.mkdir()
    monkeypatch.setattr(provenance, "SOURCE", plain.resolve())
    assert provenance.read_revision() == (version("podd-sweep"), "")


def test_the_device_is_named_as_it_ran():
    assert provenance.device_used("cpu") == "cpu"
    facts = provenance.provenance(torch.device("cpu"))
    assert facts["torch_version"] == torch.__version__ and facts["device_used"] == "cpu"
    if torch.cuda.is_available():  # the GPU machine: its name, and TF32 when cuDNN uses it
        named = provenance.device_used("cuda")
        assert named.startswith(f"cuda ({torch.cuda.get_device_name(0)}")
        assert named.endswith(", TF32 convolutions)") == torch.backends.cudnn.allow_tf32
