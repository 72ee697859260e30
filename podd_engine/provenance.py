"""Where a result came from: the engine's code, the torch build and the device it ran on.

Every trial records these (params `engine_revision`, `engine_commit`, `torch_version`,
`device_used`, through `Trial.summary`), so that the report can say when the runs it compares
did not come from the same code and hardware: a change of the engine can move an accuracy by
tenths of a point, and on CUDA cuDNN runs fp32 convolutions as TF32 by default. They are not
settings: runs that differ only here are still compared, and the report names the difference.

`engine_revision` names the engine's code itself (the git trees of podd_engine/ and
orchestrator/, plus a hash of uncommitted changes to them), so a commit that changes only docs
or tests keeps it; `engine_commit` says which commit to check out to read the code.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parents[1]  # the folder holding podd_engine/
CODE = ("podd_engine", "orchestrator")  # what a result depends on (not docs, not tests)


def _git(*args: str) -> str:
    # no optional locks: trials starting together must not take the index lock from a user's
    # `git commit`; GIT_DIR and friends would point git elsewhere than SOURCE
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(["git", "--no-optional-locks", "-C", str(SOURCE), *args],
                          capture_output=True, text=True, timeout=10, check=True,
                          env=env).stdout.strip()


def _short(text: str, n: int = 10) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def read_revision() -> tuple[str, str]:
    """(engine_revision, engine_commit): '0.1.0+code.1a2b3c4d5e' ('.dirty.9f8e7d' added when
    the engine's code differs from the commit) and the commit, in a git checkout of the
    project; the installed version and '' elsewhere."""
    try:
        base = version("podd-sweep")
    except PackageNotFoundError:
        base = "unknown"
    try:
        # only the project's own checkout: an install inside another repository is not it
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != SOURCE:
            return base, ""
        commit = _git("rev-parse", "HEAD")
        trees = _git("rev-parse", *(f"HEAD:{folder}" for folder in CODE))
        changes = (_git("diff", "HEAD", "--", *CODE) +
                   _git("ls-files", "--others", "--exclude-standard", "--", *CODE))
    except (OSError, subprocess.SubprocessError):
        return base, ""
    revision = f"{base}+code.{_short(trees)}"
    return (revision + (f".dirty.{_short(changes, 6)}" if changes else "")), commit


# read once, when the engine is imported: it describes the code this process runs
ENGINE_REVISION, ENGINE_COMMIT = read_revision()


def device_used(device: torch.device | str) -> str:
    """'cpu', or 'cuda (NVIDIA H100 80GB HBM3, TF32 convolutions)'."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    return f"cuda ({name}{', TF32 convolutions' if torch.backends.cudnn.allow_tf32 else ''})"


def provenance(device: torch.device | str) -> dict[str, str]:
    return {"engine_revision": ENGINE_REVISION, "engine_commit": ENGINE_COMMIT,
            "torch_version": torch.__version__, "device_used": device_used(device)}
