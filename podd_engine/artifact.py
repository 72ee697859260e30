"""A distilled poster on disk: self-describing, checksummed, and rendered as a picture.

    ARTIFACT/
      poster.pt     tensors: poster, label array (or fixed labels), class order
      poster.json   the TrialConfig, geometry, class names and order, label mode, embedder,
                    preprocessing (kind + the training set it was fitted on), metrics, and the
                    sha256 of poster.pt
      poster.png    the poster de-whitened for viewing, class grid drawn

`podd-sweep evaluate ARTIFACT` needs nothing else: the preprocessing is refitted (or read from
the cache) from the data set named in the config, and checked against the recorded fingerprint.
Every file is written to a temporary name and renamed, poster.json last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from podd_engine.config import TrialConfig
from podd_engine.errors import UserError, first_line
from podd_engine.fileio import atomic_write_bytes
from podd_engine.labels import PosterLabels, create_labels
from podd_engine.poster import PosterGeometry, evenly_spaced
from podd_engine.preprocess import ChannelNormalization, Preprocessing, ZCAWhitening

FORMAT_VERSION = 1


class ArtifactError(UserError):
    """A poster artifact is missing, corrupt or from an unknown format."""


@dataclass
class PosterArtifact:
    config: TrialConfig
    geometry: PosterGeometry
    poster: torch.Tensor  # [C, H, W] in preprocessed (e.g. whitened) space
    labels: PosterLabels
    class_order: torch.Tensor  # [rows, cols]
    class_names: tuple[str, ...]
    metadata: dict


def _geometry_dict(g: PosterGeometry) -> dict:
    return {"channels": g.channels, "image_size": list(g.image_size),
            "num_classes": g.num_classes, "class_grid": list(g.class_grid),
            "patch_grid": list(g.patch_grid), "poster_size": list(g.poster_size),
            "requested_ipc": g.requested_ipc}


# What an artifact folder holds: distill writes only into a folder of these (or a new one)
ARTIFACT_FILES = ("poster.pt", "poster.json", "poster.png")


def save_artifact(folder: str | os.PathLike, *, config: TrialConfig, geometry: PosterGeometry,
                  poster: torch.Tensor, labels: PosterLabels, class_order: torch.Tensor,
                  class_names: tuple[str, ...], preprocessing: Preprocessing,
                  preprocessing_key: str, metrics: dict | None = None,
                  embedder: str | None = None, render: bool = True) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"poster": poster.detach().cpu(), "label_array": labels.array.detach().cpu(),
                "class_order": class_order.cpu()}, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(payload, folder / "poster.pt")
    if render:
        png = render_poster_png(poster, geometry, preprocessing, class_order, class_names)
        atomic_write_bytes(png, folder / "poster.png")
    metadata = {
        "format_version": FORMAT_VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "config": config.to_dict(),
        "geometry": _geometry_dict(geometry),
        "achieved_ipc": geometry.achieved_ipc,
        "class_names": list(class_names),
        "class_order": class_order.tolist(),
        "label_mode": labels.mode,
        "label_grid": list(labels.label_grid) if labels.label_grid else None,
        "label_parameters": labels.num_parameters,
        "storage_bytes": poster.numel() * 4 + labels.num_parameters * 4,
        "embedder": embedder,
        "preprocessing": {"kind": preprocessing.state_dict()["kind"],
                          "regularization": getattr(preprocessing, "regularization", None),
                          "training_set_key": preprocessing_key},
        "metrics": metrics or {},
    }
    metadata[METADATA_SHA] = _metadata_checksum(metadata)
    atomic_write_bytes(json.dumps(metadata, indent=2).encode(), folder / "poster.json")
    return folder


IDENTITY_SETTINGS = ("dataset", "method", "ipc", "patch_grid", "seed")
METADATA_SHA = "metadata_sha256"  # of poster.json itself: its settings and results are sealed


def _metadata_checksum(metadata: dict) -> str:
    sealed = {k: v for k, v in metadata.items() if k != METADATA_SHA}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True).encode()).hexdigest()


def load_artifact(folder: str | os.PathLike) -> PosterArtifact:
    folder = Path(folder)
    meta_path, tensor_path = folder / "poster.json", folder / "poster.pt"
    if not meta_path.exists() or not tensor_path.exists():
        raise ArtifactError(f"{folder} is not a poster artifact: it needs poster.json and "
                            f"poster.pt (written by podd-sweep distill --out)")
    try:
        metadata = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{meta_path} is not valid JSON ({exc}): the artifact is corrupt; "
                            f"re-run the distillation") from exc
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{meta_path} is not an artifact's metadata (a JSON object): the "
                            f"artifact is corrupt; re-run the distillation")
    # artifacts written before the metadata was sealed have no checksum and are taken as is
    if METADATA_SHA in metadata and metadata[METADATA_SHA] != _metadata_checksum(metadata):
        raise ArtifactError(f"{meta_path} was changed after the distillation wrote it (its "
                            f"checksum does not match): its settings and results no longer "
                            f"describe the poster; restore it or re-run the distillation")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}: artifact format {metadata.get('format_version')} is not "
                            f"{FORMAT_VERSION}: upgrade podd-sweep or re-run the distillation")
    payload = tensor_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != metadata.get("sha256"):
        raise ArtifactError(f"{tensor_path} does not match the checksum in poster.json: the file "
                            f"is truncated or corrupt; re-run the distillation")
    tensors = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    try:
        recorded = metadata["config"]
        # what names the trial cannot fall back to a default: an artifact holds all of them
        for name in IDENTITY_SETTINGS:
            recorded[name]  # noqa: B018 (a KeyError names the missing setting)
        config = TrialConfig.from_dict(recorded)
        config.validate()
        g = metadata["geometry"]
        geometry = PosterGeometry(g["channels"], tuple(g["image_size"]), g["num_classes"],
                                  tuple(g["class_grid"]), tuple(g["patch_grid"]),
                                  tuple(g["poster_size"]), g.get("requested_ipc"))
        class_names = _class_names(metadata["class_names"], geometry.num_classes)
        if not isinstance(metadata["preprocessing"]["training_set_key"], str):
            raise ValueError(f"preprocessing {metadata['preprocessing']!r} (its training_set_key "
                             f"names the data set the poster was distilled on)")
        if not isinstance(metadata.get("embedder"), (str, type(None))):
            raise ValueError(f"embedder {metadata['embedder']!r} (a name or null)")
        order = tensors["class_order"]
        label_mode = metadata["label_mode"]
        if label_mode == "learned":
            label_grid = metadata["label_grid"]
            labels = create_labels("learned", geometry, order,
                                   tuple(label_grid) if label_grid else None,
                                   config.label_pooling)
            labels.array = tensors["label_array"]
        elif label_mode == "fixed":
            labels = PosterLabels("fixed", None, tensors["label_array"])
        else:
            raise ValueError(f"label_mode {label_mode!r} (fixed or learned)")
    except (KeyError, TypeError, ValueError) as exc:
        what = f"lacks {exc}" if isinstance(exc, KeyError) else f"holds {first_line(exc)}"
        raise ArtifactError(f"{meta_path} {what}: the artifact is corrupt; re-run the "
                            f"distillation") from None
    return PosterArtifact(config, geometry, tensors["poster"], labels, order, class_names,
                          metadata)


def _class_names(names, num_classes: int) -> tuple[str, ...]:
    if not isinstance(names, list) or len(names) != num_classes or not all(
            isinstance(n, str) for n in names):
        raise ValueError(f"class_names {names!r} (a list of {num_classes} names)")
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def poster_for_display(poster: torch.Tensor, geometry: PosterGeometry,
                       preprocessing: Preprocessing) -> torch.Tensor:
    """[C, H, W] in [0, 1]. ZCA is defined on image-sized windows, so the poster is undone window
    by window (a quarter-image stride) and the windows are blended with a tapered (Hann) weight:
    a window's edges, which ZCA reconstructs worst, count least, so no seams show."""
    poster = poster.detach().cpu().float()
    if isinstance(preprocessing, ChannelNormalization):
        return preprocessing.inverse(poster[None])[0].clamp(0, 1)
    assert isinstance(preprocessing, ZCAWhitening)
    (ph, pw), (h, w) = geometry.poster_size, geometry.image_size
    ys = evenly_spaced(ph, h, max(1, -(-4 * (ph - h) // h) + 1))
    xs = evenly_spaced(pw, w, max(1, -(-4 * (pw - w) // w) + 1))
    taper = (torch.hann_window(h + 2, periodic=False)[1:-1, None]
             * torch.hann_window(w + 2, periodic=False)[None, 1:-1])
    out = torch.zeros_like(poster)
    weight = torch.zeros(1, ph, pw)
    for y in ys:
        windows = torch.stack([poster[:, y:y + h, x:x + w] for x in xs])
        for x, window in zip(xs, preprocessing.inverse(windows)):
            out[:, y:y + h, x:x + w] += window * taper
            weight[:, y:y + h, x:x + w] += taper
    out /= weight
    low, high = torch.quantile(out.flatten(), torch.tensor([0.005, 0.995]))
    return ((out - low) / (high - low + 1e-12)).clamp(0, 1)


def render_poster_png(poster: torch.Tensor, geometry: PosterGeometry,
                      preprocessing: Preprocessing, class_order: torch.Tensor | None = None,
                      class_names: tuple[str, ...] | None = None, scale: int | None = None,
                      draw_grid: bool = True) -> bytes:
    """PNG bytes of the poster, enlarged (nearest) so small posters stay visible, with the class
    grid and (when there is room) the class names drawn on it."""
    from PIL import Image, ImageDraw

    image = poster_for_display(poster, geometry, preprocessing)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = array[:, :, 0]
    ph, pw = geometry.poster_size
    scale = scale or max(1, min(8, 1024 // max(ph, pw)))
    picture = Image.fromarray(array).resize((pw * scale, ph * scale), Image.Resampling.NEAREST)
    picture = picture.convert("RGB")
    if draw_grid and class_order is not None:
        draw = ImageDraw.Draw(picture)
        rows, cols = class_order.shape
        for c in range(1, cols):
            x = (c * pw // cols) * scale
            draw.line([(x, 0), (x, ph * scale)], fill=(255, 255, 255), width=1)
        for r in range(1, rows):
            y = (r * ph // rows) * scale
            draw.line([(0, y), (pw * scale, y)], fill=(255, 255, 255), width=1)
        cell_w = pw * scale // cols
        if class_names is not None and cell_w >= 48:
            for r in range(rows):
                for c in range(cols):
                    name = class_names[int(class_order[r, c])][: max(3, cell_w // 7)]
                    x, y = (c * pw // cols) * scale + 2, (r * ph // rows) * scale + 1
                    draw.text((x + 1, y + 1), name, fill=(0, 0, 0))
                    draw.text((x, y), name, fill=(255, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
