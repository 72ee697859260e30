"""The on-disk cache of decoded data sets: one memory-mapped .pt file per source folder,
named by the folder and a fingerprint of its files (path, size, modification time), written
atomically, so a second load is one read and an edited source is decoded again."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from podd_engine.fileio import atomic_torch_save
from podd_engine.images import ImageDataset

# Bump when the cached tensor layout or any reader's output changes.
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("PODD_CACHE_DIR", Path.home() / ".cache" / "podd-sweep"))


CACHED_FIELDS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


def cache_file(entry_name: str, folder: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of a source folder as it is now (it changes when any file changes).
    Keyed by the folder's resolved path (`..` and links followed), so every path to the same
    data (`../shared/x`, `/abs/shared/x`, a symlink) finds the same entry."""
    resolved = Path(folder).resolve()
    folder_hash = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    stem = f"{entry_name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', resolved.name)}-{folder_hash}"
    return (Path(cache_dir or default_cache_dir()) / "datasets"
            / f"{stem}-{_source_fingerprint(folder)}.pt")


def _source_fingerprint(folder: Path) -> str:
    """Hash of every file's relative path, size and modification time under `folder`."""
    h = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}".encode())
    if folder.is_file():
        files = [folder]
    else:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder) if p != folder else p.name}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_cache(path: Path) -> dict | None:
    """The cached fields of a data set, or None when the file cannot be used (rebuild it)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable (e.g. written by another torch version): rebuild it
        return None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_FORMAT_VERSION:
        return None
    payload["class_names"] = tuple(payload["class_names"])
    return {k: payload[k] for k in CACHED_FIELDS}


def write_cache(path: Path, dataset: ImageDataset) -> None:
    """Write the cache file atomically and remove the older fingerprints of the same source."""
    payload = {k: getattr(dataset, k) for k in CACHED_FIELDS}
    payload["class_names"] = list(dataset.class_names)
    payload["version"] = CACHE_FORMAT_VERSION
    atomic_torch_save(payload, path)
    stem = path.name.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{stem}-*.pt"):  # older fingerprints of the same source
        if stale != path:
            stale.unlink(missing_ok=True)


def cache_contents(cache_dir: str | os.PathLike | None = None) -> dict[str, tuple[int, int]]:
    """Per part of the cache (decoded data sets, fitted preprocessing): (files, bytes)."""
    root = Path(cache_dir or default_cache_dir())
    contents = {}
    for part in ("datasets", "preprocessing"):
        files = [p for p in (root / part).glob("*.pt") if p.is_file()]
        contents[part] = (len(files), sum(p.stat().st_size for p in files))
    return contents


def clear_cache(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """Remove every cached data set and preprocessing fit; (files, bytes) removed. Only the
    cache's own files (*.pt under its two parts) are touched."""
    root = Path(cache_dir or default_cache_dir())
    removed = (0, 0)
    for part in ("datasets", "preprocessing"):
        for path in (root / part).glob("*.pt"):
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed = (removed[0] + 1, removed[1] + size)
    return removed
