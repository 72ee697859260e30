"""Where a result came from: the engine's revision, the torch build and the device it ran on.

Every trial records these (params `engine_revision`, `torch_version`, `device_used`, through
`Trial.summary`), so that the report can say when the runs it compares did not come from the
same code and hardware: a change of the engine can move an accuracy by tenths of a point, and
on CUDA cuDNN runs fp32 convolutions as TF32 by default. They are not settings: runs that
differ only here are still compared, and the report names the difference.
"""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parents[1]  # the folder holding podd_engine/
CODE = ("podd_engine", "orchestrator")  # what a result depends on (not docs, not tests)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()


@functools.lru_cache(maxsize=1)
def engine_revision() -> str:
    """'0.1.0+g1a2b3c4d5e' in a git checkout of the project ('.dirty' added when the engine's
    code differs from that commit), the installed version elsewhere ('0.1.0')."""
    try:
        base = version("podd-sweep")
    except PackageNotFoundError:
        base = "unknown"
    try:
        # only the project's own checkout: an install inside another repository is not it
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != SOURCE:
            return base
        commit = _git("rev-parse", "--short=10", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE)
    except (OSError, subprocess.SubprocessError):
        return base
    return f"{base}+g{commit}" + (".dirty" if dirty else "")


def device_used(device: torch.device | str) -> str:
    """'cpu', or 'cuda (NVIDIA H100 80GB HBM3, TF32 convolutions)'."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    return f"cuda ({name}{', TF32 convolutions' if torch.backends.cudnn.allow_tf32 else ''})"


def provenance(device: torch.device | str) -> dict[str, str]:
    return {"engine_revision": engine_revision(), "torch_version": torch.__version__,
            "device_used": device_used(device)}
