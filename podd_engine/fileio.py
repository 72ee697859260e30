"""Atomic file writes: a reader never sees a half-written cache, artifact or checkpoint.

Everything is written to a temporary file in the destination folder and renamed over the
destination only once complete (`os.replace` is atomic on POSIX and Windows within a folder).
If writing fails, the temporary file is removed and any previous destination file is untouched.

Torch is imported only by `atomic_torch_save`, so that writers of plain files (the report's
JSON/CSV/Parquet, PNGs) do not pay seconds for it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` to produce the file, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; honour the umask instead
        with open(tmp, "rb") as f:  # make the bytes durable before they become visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(text: str, path: str | os.PathLike, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(text.encode(encoding), path)


def __getattr__(name: str) -> Any:
    """`fileio.torch`, imported on first use (tests patch `fileio.torch.save`)."""
    if name == "torch":
        import torch

        return torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
