"""Readers: one per source format, each turning a folder into an ImageDataset (CIFAR's
pickles, Parquet, an image folder, CUB-200-2011, Tiny-ImageNet-200, scikit-learn's digits),
and the threaded image decoder they share."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from podd_engine.images import DatasetError, ImageDataset, ProgressFn, check_label_range

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CUB_LAYOUT = ("expected CUB_200_2011/ with images/, images.txt, image_class_labels.txt, "
              "train_test_split.txt and classes.txt (the official CUB_200_2011.tgz)")
TINY_LAYOUT = ("expected tiny-imagenet-200/ with wnids.txt, words.txt, train/WNID/images/ and "
               "val/ (as in the official tiny-imagenet-200.zip)")


# Decoding images in parallel (PIL releases the GIL while it decodes)

def decode_images(
    sources: Sequence[bytes | Path],
    *,
    what: str,
    resize: tuple[int, int] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Decode encoded images (bytes or file paths) into one uint8 tensor [N, C, H, W].

    All images must have one size (unless `resize` is given). Colour images give 3 channels;
    if every image is grayscale the result has 1 channel.
    """
    from PIL import Image

    if len(sources) == 0:
        raise DatasetError(f"{what}: no images found")

    def decode(src: bytes | Path) -> tuple[np.ndarray, bool]:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            img = img.convert("RGB")
            if resize is not None and img.size != (resize[1], resize[0]):
                img = img.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
            return np.asarray(img), gray

    first, _ = decode(sources[0])
    out = np.empty((len(sources), *first.shape), dtype=np.uint8)
    grayscale = np.zeros(len(sources), dtype=bool)
    chunk = 1024

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + chunk, len(sources))):
            try:
                array, grayscale[i] = decode(sources[i])
            except Exception as exc:
                raise DatasetError(f"{what}: image {_describe(sources, i)} cannot be decoded "
                                   f"({exc}): remove or replace it") from exc
            if array.shape != first.shape:
                raise DatasetError(
                    f"{what}: image {_describe(sources, i)} is {array.shape[1]}x{array.shape[0]} "
                    f"but the first is {first.shape[1]}x{first.shape[0]}: resize all images to "
                    f"one size")
            out[i] = array

    starts = range(0, len(sources), chunk)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(decode_chunk, starts), start=1):
            if progress:
                progress(what, min(done * chunk, len(sources)), len(sources))
    images = torch.from_numpy(out).permute(0, 3, 1, 2)
    if grayscale.all():
        images = images[:, :1]
    return images.contiguous()


def _describe(sources: Sequence[bytes | Path], i: int) -> str:
    src = sources[i]
    return str(src) if isinstance(src, Path) else f"#{i}"


def _labels(values: Sequence[int] | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


# Readers

def read_cifar(folder: Path, *, train_files: Sequence[str], test_files: Sequence[str],
                meta_file: str, label_key: str, names_key: str, name: str) -> ImageDataset:
    """CIFAR's python pickle batches (the layout torchvision downloads)."""

    def load(file: str) -> dict:
        path = folder / file
        if not path.exists():
            raise DatasetError(f"{name}: {path} is missing: the folder must hold "
                               f"{', '.join([*train_files, *test_files, meta_file])}")
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")

    def split(files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [load(f) for f in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), _labels(labels)

    train_x, train_y = split(train_files)
    test_x, test_y = split(test_files)
    classes = tuple(str(c) for c in load(meta_file)[names_key])
    return ImageDataset(name, train_x, train_y, test_x, test_y, classes)


def read_parquet(folder: Path, progress: ProgressFn | None) -> ImageDataset:
    """train.parquet + test.parquet with `image` (encoded bytes) and `label` columns."""
    import pyarrow.parquet as pq

    name = f"parquet:{folder}"
    tables = {}
    for split in ("train", "test"):
        path = folder / f"{split}.parquet"
        if not path.exists():
            raise DatasetError(f"{name}: {path.name} is missing: the folder needs train.parquet "
                               f"and test.parquet with columns 'image' (bytes) and 'label' (int)")
        table = pq.read_table(path)
        missing = [c for c in ("image", "label") if c not in table.column_names]
        if missing:
            raise DatasetError(f"{name}: {path.name} has no column {', '.join(map(repr, missing))} "
                               f"(it has {table.column_names}): rename the image-bytes column to "
                               f"'image' and the class-index column to 'label'")
        tables[split] = table
    metadata = {**(tables["test"].schema.metadata or {}), **(tables["train"].schema.metadata or {})}
    classes = _parquet_class_names(folder, metadata, name)

    splits = {}
    for split, table in tables.items():  # check the cheap things before the slow decode
        labels = table.column("label").to_numpy(zero_copy_only=False)
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{name}: {split}.parquet column 'label' is {labels.dtype}: store "
                               f"class indices as integers")
        labels = _labels(labels)
        check_label_range(name, split, labels, len(classes))
        column = table.column("image").combine_chunks()
        if hasattr(column.type, "get_field_index") and column.type.get_field_index("bytes") >= 0:
            column = column.field("bytes")  # Hugging Face's {bytes, path} image struct
        blobs = column.to_pylist()
        if any(b is None for b in blobs):
            raise DatasetError(f"{name}: {split}.parquet has empty 'image' cells: drop those rows")
        splits[split] = (decode_images(blobs, what=f"{name} {split}", progress=progress), labels)
    return ImageDataset(name, *splits["train"], *splits["test"], classes)


def _parquet_class_names(folder: Path, metadata: dict[bytes, bytes], name: str) -> tuple[str, ...]:
    classes_json = folder / "classes.json"
    if classes_json.exists():
        try:
            return tuple(json.loads(classes_json.read_text())["classes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{name}: {classes_json} is not valid ({exc}): it must be JSON "
                               f'like {{"classes": ["cat", "dog"]}}') from exc
    if b"classes" in metadata:
        return tuple(json.loads(metadata[b"classes"]))
    raise DatasetError(f"{name}: no class names: add classes.json with "
                       f'{{"classes": [...]}} (one name per label index)')


def _class_folders(split_dir: Path, name: str) -> list[Path]:
    if not split_dir.is_dir():
        raise DatasetError(f"{name}: {split_dir} is missing: the folder needs train/ and test/, "
                           f"each with one sub-folder of images per class")
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{name}: {split_dir} has no class sub-folders: put each class's "
                           f"images in {split_dir}/CLASS_NAME/")
    return folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def read_imagefolder(folder: Path, progress: ProgressFn | None) -> ImageDataset:
    """train/CLASS/*.png and test/CLASS/*.png; classes are the train sub-folders, sorted."""
    name = f"imagefolder:{folder}"
    classes = [p.name for p in _class_folders(folder / "train", name)]
    splits = {}
    for split in ("train", "test"):
        files, labels = [], []
        for class_dir in _class_folders(folder / split, name):
            if class_dir.name not in classes:
                raise DatasetError(f"{name}: {split}/{class_dir.name} is not a class in train/: "
                                   f"add it to train/ or remove it from {split}/")
            found = _image_files(class_dir)
            files += found
            labels += [classes.index(class_dir.name)] * len(found)
        splits[split] = (decode_images(files, what=f"{name} {split}", progress=progress),
                         _labels(labels))
    return ImageDataset(name, *splits["train"], *splits["test"], tuple(classes))


def read_cub200(folder: Path, progress: ProgressFn | None, size: int = 32) -> ImageDataset:
    """CUB-200-2011 with its official train/test split, every image resized to size x size."""
    name = "cub200"

    def table(file: str) -> list[list[str]]:
        path = folder / file
        if not path.exists():
            raise DatasetError(f"{name}: {path} is missing: {CUB_LAYOUT}")
        return [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]

    paths = {i: p for i, p in table("images.txt")}
    labels = {i: int(c) - 1 for i, c in table("image_class_labels.txt")}
    is_train = {i: t.strip() == "1" for i, t in table("train_test_split.txt")}
    # "001.Black_footed_Albatross" -> "Black footed Albatross"
    classes = tuple(c.split(".", 1)[-1].replace("_", " ") for _, c in table("classes.txt"))
    splits = {}
    for split, want in (("train", True), ("test", False)):
        ids = [i for i in paths if is_train[i] == want]
        files = [folder / "images" / paths[i] for i in ids]
        images = decode_images(files, what=f"{name} {split}", resize=(size, size),
                               progress=progress)
        splits[split] = (images, _labels([labels[i] for i in ids]))
    return ImageDataset(name, *splits["train"], *splits["test"], classes)


def read_tiny_imagenet(folder: Path, progress: ProgressFn | None) -> ImageDataset:
    """tiny-imagenet-200: train/WNID/images/*.JPEG; val either as shipped (val/images/ plus
    val_annotations.txt) or already reformatted into val/WNID/[images/]*.JPEG."""
    name = "tiny-imagenet"
    wnids_file = folder / "wnids.txt"
    if not wnids_file.exists():
        raise DatasetError(f"{name}: {wnids_file} is missing: {TINY_LAYOUT}")
    wnids = sorted(wnids_file.read_text().split())
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (folder / "words.txt").exists():
        for line in (folder / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    classes = tuple(words.get(w, w) for w in wnids)

    train_files, train_labels = [], []
    for wnid in wnids:
        found = _image_files(folder / "train" / wnid)
        train_files += found
        train_labels += [index[wnid]] * len(found)

    val_files, val_labels = [], []
    annotations = folder / "val" / "val_annotations.txt"
    if annotations.exists() and (folder / "val" / "images").is_dir():
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                if parts[1] not in index:
                    raise DatasetError(f"{name}: {annotations} names class {parts[1]} which is "
                                       f"not in wnids.txt: fix the annotation or wnids.txt")
                val_files.append(folder / "val" / "images" / parts[0])
                val_labels.append(index[parts[1]])
    else:  # reformatted: val/WNID/...
        for wnid in wnids:
            found = _image_files(folder / "val" / wnid)
            val_files += found
            val_labels += [index[wnid]] * len(found)
    train = decode_images(train_files, what=f"{name} train", progress=progress)
    val = decode_images(val_files, what=f"{name} val", progress=progress)
    return ImageDataset(name, train, _labels(train_labels), val, _labels(val_labels), classes)


def read_digits(folder: Path, progress: ProgressFn | None) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (0..16 -> 0..255); every 5th image is a test image."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    test = np.arange(len(images)) % 5 == 4
    x, y = torch.from_numpy(images), _labels(bunch.target)
    t = torch.from_numpy(test)
    return ImageDataset("digits", x[~t].contiguous(), y[~t], x[t].contiguous(), y[t],
                        tuple(str(d) for d in range(10)))


def sklearn_digits_file(root: Path, arg: str | None) -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
