"""A labelled image data set as uint8 tensors, and the error a data set that cannot be
loaded raises. Every reader (`podd_engine.readers`) returns an ImageDataset."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from podd_engine.errors import UserError

# (stage, done, total): called while decoding so a CLI can draw a progress bar.
ProgressFn = Callable[[str, int, int], None]


class DatasetError(UserError):
    """A data set cannot be loaded; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image data set held as uint8 tensors of shape [N, C, H, W]."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]
    # the benchmark this data set is, for comparisons and the paper's presets and baselines
    # (`dataset_family`); a data set of no benchmark is its own family, named like itself
    family: str = ""
    family_source: str = ""  # registry | declared | class names | none

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.name)
            object.__setattr__(self, "family_source", "none")
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise DatasetError(f"{self.name}: {split} images must be uint8 [N, C, H, W], "
                                   f"got {images.dtype} {tuple(images.shape)}")
            if labels.ndim != 1 or len(labels) != len(images):
                raise DatasetError(f"{self.name}: {split} has {len(images)} images but "
                                   f"{len(labels)} labels")
            check_label_range(self.name, split, labels, len(self.class_names))
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(f"{self.name}: train images are {_shape_str(self.train_images)} but "
                               f"test images are {_shape_str(self.test_images)}: use one size")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @cached_property
    def content_hash(self) -> str:
        """What the data is, not where it was read from: SHA-256 (16 hex digits) of the class
        names and the decoded train and test tensors, so two copies of a data set (another
        folder, another file format) hash alike and an edited or damaged copy does not. About
        0.1 s for CIFAR-10 on one core; computed once per data set object."""
        h = hashlib.sha256("\0".join(self.class_names).encode())
        for split in ("train_images", "train_labels", "test_images", "test_labels"):
            tensor = getattr(self, split).contiguous()
            h.update(f"\n{split} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            h.update(tensor.numpy())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {"name": self.name, "family": self.family, "family_source": self.family_source,
                "train": len(self.train_images), "test": len(self.test_images),
                "channels": self.channels, "image_size": list(self.image_size),
                "num_classes": self.num_classes, "class_names": list(self.class_names)}


def check_label_range(name: str, split: str, labels: torch.Tensor, num_classes: int) -> None:
    if num_classes == 0:
        raise DatasetError(f"{name}: the class-name list is empty: give one name per label index")
    if len(labels) == 0:
        raise DatasetError(f"{name}: the {split} split is empty: it needs at least one image")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DatasetError(f"{name}: {split} labels span {low}..{high} but there are {num_classes} "
                           f"class names: labels must be 0..{num_classes - 1}")


def _shape_str(images: torch.Tensor) -> str:
    return "x".join(str(s) for s in images.shape[1:])
