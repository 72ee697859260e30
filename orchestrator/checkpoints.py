"""A trial's checkpoints on disk: what one holds, how it is checked, which one a trial resumes
from.

A checkpoint folder holds `progress.json` (the outer step it was taken at and the sha256 of
the state), `state.pt` (the distiller's state: poster, labels, optimiser, generator) and
`poster.png`; the final one holds the poster artifact (`artifact/`) instead of a state.
Torch is imported only to read and write a state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.protocol import ARTIFACT_DIR, EVENT, FINAL, METRICS, POSTER_PNG, STEP

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(folder: Path, state: dict | None, step: int,
                     poster_png: bytes | None) -> None:
    """A trial checkpoint: the distiller state, its sha256 and step, and the poster picture."""
    from podd_engine.fileio import atomic_torch_save, atomic_write_bytes

    progress: dict[str, Any] = {"step": step}
    if state is not None:
        atomic_torch_save(state, folder / STATE_FILE)
        progress["sha256"] = _sha256(folder / STATE_FILE)
    if poster_png is not None:
        atomic_write_bytes(poster_png, folder / POSTER_PNG)
    atomic_write_bytes(json.dumps(progress).encode(), folder / PROGRESS_FILE)


def _read_progress(folder: Path) -> dict:
    """The checkpoint's progress record; ValueError when it is not valid JSON (a torn write)."""
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    if not isinstance(progress, dict):
        raise ValueError(f"{PROGRESS_FILE} is not a JSON object")
    return progress


def verify_checkpoint_state(folder: Path) -> bool:
    """False when the folder holds no state; raises when the state is damaged or unrecorded."""
    progress_path = folder / PROGRESS_FILE
    if not (folder / STATE_FILE).exists():
        return False
    if not progress_path.exists():
        raise RuntimeError(f"checkpoint {folder} has {STATE_FILE} but no {PROGRESS_FILE}: it "
                           f"was not written by podd-sweep or is incomplete")
    try:
        expected = _read_progress(folder).get("sha256")
    except ValueError:
        raise RuntimeError(f"checkpoint {progress_path} is not valid JSON (truncated?): delete "
                           f"that checkpoint folder to resume from the one before") from None
    if expected != _sha256(folder / STATE_FILE):
        raise RuntimeError(f"checkpoint {folder / STATE_FILE} is corrupt (sha256 mismatch): "
                           f"delete that checkpoint folder to resume from the one before")
    return True


def read_checkpoint_state(folder: Path) -> dict | None:
    """The distiller state saved in a checkpoint folder, after checking its checksum."""
    import torch

    if not verify_checkpoint_state(folder):
        return None
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)


@dataclass(frozen=True)
class DamagedCheckpoint:
    """A checkpoint folder that cannot be resumed from, and why."""

    folder: Path
    reason: str

    def line(self) -> str:
        return f"{self.folder}: {self.reason}"


@dataclass
class CheckpointScan:
    newest: Path | None = None  # the most advanced intact checkpoint
    damaged: list[DamagedCheckpoint] = field(default_factory=list)  # skipped, with the reason

    def is_damaged(self, folder: str | os.PathLike) -> bool:
        resolved = Path(folder).resolve()
        return any(d.folder.resolve() == resolved for d in self.damaged)


class _Damaged(Exception):
    """Why a checkpoint folder cannot be resumed from."""


def _resume_rank(folder: Path) -> int:
    """How far a checkpoint lets its trial get: its step, plus one for a final checkpoint (it
    outranks a state saved at the same step). Raises _Damaged with the reason."""
    if not (folder / PROGRESS_FILE).exists():
        raise _Damaged(f"no {PROGRESS_FILE} (an incomplete copy)")
    try:
        progress = _read_progress(folder)
        step = int(progress["step"])
    except (ValueError, KeyError, TypeError):
        raise _Damaged(f"{PROGRESS_FILE} is unreadable (truncated or not written by "
                       f"podd-sweep)") from None
    if (folder / ARTIFACT_DIR / "poster.json").exists():
        return step + 1
    if not (folder / STATE_FILE).exists():
        raise _Damaged(f"{PROGRESS_FILE} (step {step}) but no {STATE_FILE} (an incomplete copy)")
    if progress.get("sha256") != _sha256(folder / STATE_FILE):
        raise _Damaged(f"{STATE_FILE} does not match its sha256 (corrupt or truncated)")
    return step


def scan_checkpoints(trial_storage: Path) -> CheckpointScan:
    """The trial's most advanced intact checkpoint in its storage folder, and the damaged ones.

    Tune restores a trial from the checkpoint its last experiment snapshot recorded; after a
    killed driver that can be a few checkpoints behind the newest one persisted, which would
    redo those steps. Every checkpoint records its step (and its state's sha256), so the newest
    intact one is found directly. Damaged or half-copied ones are skipped and listed, so that
    the trial can report them (a warning and an MLflow tag, `orchestrator.tracking`)."""
    scan, best_step = CheckpointScan(), -1
    for folder in sorted(trial_storage.glob("checkpoint_*")) if trial_storage.is_dir() else []:
        try:
            step = _resume_rank(folder)
        except _Damaged as why:
            scan.damaged.append(DamagedCheckpoint(folder, str(why)))
            continue
        if step > best_step:
            scan.newest, best_step = folder, step
    return scan


def newest_checkpoint(trial_storage: Path) -> Path | None:
    """The trial's most advanced intact checkpoint (`scan_checkpoints`)."""
    return scan_checkpoints(trial_storage).newest


def final_report_from(folder: Path) -> dict | None:
    """A checkpoint that already holds the final artifact: the trial had finished."""
    meta = folder / ARTIFACT_DIR / "poster.json"
    if not meta.exists():
        return None
    metrics = json.loads(meta.read_text())["metrics"]
    step = json.loads((folder / PROGRESS_FILE).read_text())["step"]
    # started_at_step = step: a trial replayed from its final checkpoint redoes no step
    return {EVENT: FINAL, STEP: step, METRICS: {
        "trial_seconds": metrics.get("seconds", 0.0), "started_at_step": step,
        **{k: v for k, v in metrics.items() if k.startswith("test_accuracy")}}}
