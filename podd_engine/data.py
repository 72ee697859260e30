"""Data-set registry: every source yields train/test uint8 tensors, class names, image size.

    ds = create_dataset("parquet:../shared/datasets/cifar10-jpeg")
    ds.train_images.shape  # (50000, 3, 32, 32), uint8
    ds.class_names         # ('airplane', 'automobile', ...)

Adding a data set is one `@register_dataset` entry: a reader that turns a folder into an
`ImageDataset`, plus (optionally) where to download it from. Decoded tensors are cached on disk,
keyed by the source folder and the size and modification time of its files, so a second load
is a single memory-mapped read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from podd_engine.errors import UserError, first_line
from podd_engine.fileio import atomic_torch_save

# (stage, done, total): called while decoding so a CLI can draw a progress bar.
ProgressFn = Callable[[str, int, int], None]

# Bump when the cached tensor layout or any reader's output changes.
CACHE_FORMAT_VERSION = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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
            _check_label_range(self.name, split, labels, len(self.class_names))
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

    def summary(self) -> dict:
        return {"name": self.name, "family": self.family, "family_source": self.family_source,
                "train": len(self.train_images), "test": len(self.test_images),
                "channels": self.channels, "image_size": list(self.image_size),
                "num_classes": self.num_classes, "class_names": list(self.class_names)}


def _check_label_range(name: str, split: str, labels: torch.Tensor, num_classes: int) -> None:
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


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Download:
    """Where an archive of a data set can be fetched from (None md5: not verified)."""

    url: str
    filename: str
    md5: str | None = None


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str
    # (data_root, path argument) -> the folder that holds the data set's files.
    folder: Callable[[Path, str | None], Path]
    read: Callable[[Path, ProgressFn | None], ImageDataset]
    layout: str = ""
    takes_path: bool = False
    # The archive's top folder must be named like `folder(...)`; it is extracted into data_root.
    download: Download | None = None
    # The family every data set of this entry is (a benchmark's own entry); None: found from the
    # data (a declaration, or its class names), else the data set is its own family.
    family: str | None = None


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"data set {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_datasets() -> list[DatasetEntry]:
    return list(_REGISTRY.values())


def parse_dataset_spec(spec: str) -> tuple[DatasetEntry, str | None]:
    """'cifar10' -> (entry, None); 'parquet:PATH' -> (entry, 'PATH')."""
    name, sep, arg = spec.partition(":")
    entry = _REGISTRY.get(name.strip().lower())
    if entry is None:
        known = ", ".join(e.name + (":PATH" if e.takes_path else "") for e in _REGISTRY.values())
        raise DatasetError(f"unknown data set {spec!r}: choose one of {known}")
    if entry.takes_path and not (sep and arg):
        raise DatasetError(f"data set {entry.name!r} needs a folder: write {entry.name}:PATH")
    if not entry.takes_path and sep:
        raise DatasetError(f"data set {entry.name!r} takes no path: write {entry.name} and set "
                           f"--data-root to the folder that holds it")
    return entry, (arg if sep else None)


def default_data_root() -> Path:
    return Path(os.environ.get("PODD_DATA_ROOT", "data"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("PODD_CACHE_DIR", Path.home() / ".cache" / "podd-sweep"))


def dataset_folder(spec: str, data_root: str | os.PathLike | None = None) -> Path:
    entry, arg = parse_dataset_spec(spec)
    return entry.folder(Path(data_root or default_data_root()), arg).expanduser().absolute()


def create_dataset(
    spec: str,
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    family_declared: str | None = None,
) -> ImageDataset:
    """Load a data set by registry spec, from the on-disk tensor cache when it is fresh.
    `family_declared` says which benchmark a path-named copy is (checked against the data)."""
    entry, arg = parse_dataset_spec(spec)
    root = Path(data_root or default_data_root()).expanduser().absolute()
    folder = entry.folder(root, arg).expanduser().absolute()
    name = entry.name if arg is None else f"{entry.name}:{arg}"
    if not folder.exists():
        if entry.download is None or not download:
            raise DatasetError(_missing_message(entry, name, folder))
        _download(entry, name, root, folder)

    cache = dataset_cache_path(spec, data_root=root, cache_dir=cache_dir)
    fields = _read_cache(cache) if use_cache and cache.exists() else None
    if fields is None:
        read = entry.read(folder, progress)
        fields = {k: getattr(read, k) for k in _CACHED_FIELDS}
        if use_cache:
            _write_cache(cache, ImageDataset(name=name, **fields))
    family, source = _family_of(entry, folder, fields["class_names"], name)
    dataset = ImageDataset(name=name, **fields, family=family, family_source=source)
    return with_declared_family(dataset, family_declared) if family_declared else dataset


# --------------------------------------------------------------------------------------------
# Families: which of the paper's benchmarks a data set is
# --------------------------------------------------------------------------------------------

_BENCHMARK_CLASSES_FILE = Path(__file__).with_name("benchmark_classes.json")


def benchmark_class_names() -> dict[str, list[list[str]]]:
    """family -> the class-name lists a copy of that benchmark may carry (CIFAR's label
    names; CUB's classes.txt; Tiny-ImageNet's wnids or their first WordNet lemma)."""
    raw = json.loads(_BENCHMARK_CLASSES_FILE.read_text())
    return {family: lists for family, lists in raw["families"].items()}


def _normalized(names: Sequence[str]) -> tuple[str, ...]:
    """Class names compared loosely in form, exactly in content: case, '_' for ' ' and CUB's
    '001.' prefixes do not matter; order and every name do."""
    return tuple(re.sub(r"^\d+\.", "", n).replace("_", " ").strip().lower() for n in names)


def family_by_class_names(names: Sequence[str]) -> str | None:
    """The benchmark whose class-name list equals `names` exactly (up to form), if any."""
    wanted = _normalized(names)
    for family, lists in benchmark_class_names().items():
        if any(_normalized(known) == wanted for known in lists):
            return family
    return None


def _data_declared_family(folder: Path) -> str | None:
    """A `family` key in the folder's classes.json, else in its Parquet schema metadata."""
    classes_json = folder / "classes.json"
    if classes_json.is_file():
        try:
            declared = json.loads(classes_json.read_text()).get("family")
        except (ValueError, AttributeError):
            declared = None  # the reader reports a bad classes.json
        if declared:
            return str(declared)
    train = folder / "train.parquet"
    if train.is_file():
        import pyarrow.parquet as pq

        metadata = pq.read_schema(train).metadata or {}
        if b"family" in metadata:
            return metadata[b"family"].decode()
    return None


def _family_of(entry: DatasetEntry, folder: Path, class_names: Sequence[str],
               name: str) -> tuple[str, str]:
    """(family, how it was found) of a data set just loaded."""
    if entry.family is not None:
        return entry.family, "registry"
    declared = _data_declared_family(folder) if folder.is_dir() else None
    if declared is not None:
        _check_family_fits(declared, class_names, name, f"{folder}'s declaration")
        return declared, "declared"
    matched = family_by_class_names(class_names)
    if matched is not None:
        return matched, "class names"
    return name, "none"


def _check_family_fits(family: str, class_names: Sequence[str], name: str, where: str) -> None:
    known = benchmark_class_names()
    if family not in known:
        raise DatasetError(f"{name}: {where} names family {family!r}, which is not one of the "
                           f"paper's benchmarks ({', '.join(known)}): remove it, or name one")
    expected = len(known[family][0])
    if len(class_names) != expected:
        raise DatasetError(f"{name}: {where} says it is {family}, which has {expected} classes, "
                           f"but it has {len(class_names)}: fix the family or the class list")


def with_declared_family(dataset: ImageDataset, declared: str) -> ImageDataset:
    """`dataset` as the benchmark `declared` (a sweep's or a config's `family`), checked: a
    data set that already is a family (by registry, declaration or class names) must agree."""
    if declared == dataset.family:
        return dataset
    if dataset.family_source != "none":
        raise DatasetError(f"{dataset.name} is {dataset.family} (by its {dataset.family_source}), "
                           f"not {declared}: remove the family setting or fix it")
    _check_family_fits(declared, dataset.class_names, dataset.name, "the family setting")
    return dataclasses.replace(dataset, family=declared, family_source="declared")


# --------------------------------------------------------------------------------------------
# Cache: one .pt file per source, named by the folder and a fingerprint of its files
# --------------------------------------------------------------------------------------------

_CACHED_FIELDS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


def dataset_cache_path(spec: str, *, data_root: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file this source would use now (it changes when any source file changes)."""
    entry, arg = parse_dataset_spec(spec)
    folder = dataset_folder(spec, data_root)
    stem = _cache_stem(entry, folder)
    fingerprint = _source_fingerprint(folder)
    return Path(cache_dir or default_cache_dir()) / "datasets" / f"{stem}-{fingerprint}.pt"


def _cache_stem(entry: DatasetEntry, folder: Path) -> str:
    folder_hash = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return f"{entry.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', folder.name)}-{folder_hash}"


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


def _read_cache(path: Path) -> dict | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable (e.g. written by another torch version): rebuild it
        return None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_FORMAT_VERSION:
        return None
    payload["class_names"] = tuple(payload["class_names"])
    return {k: payload[k] for k in _CACHED_FIELDS}


def _write_cache(path: Path, dataset: ImageDataset) -> None:
    payload = {k: getattr(dataset, k) for k in _CACHED_FIELDS}
    payload["class_names"] = list(dataset.class_names)
    payload["version"] = CACHE_FORMAT_VERSION
    atomic_torch_save(payload, path)
    stem = path.name.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{stem}-*.pt"):  # older fingerprints of the same source
        if stale != path:
            stale.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Download (the real path for users; tests point it at local archives)
# --------------------------------------------------------------------------------------------

def _download(entry: DatasetEntry, name: str, root: Path, folder: Path) -> None:
    """Download the entry's archive into `root` and extract it; the data set's folder appears
    only once extraction has finished (it is extracted into a staging folder, then renamed)."""
    import shutil
    import tempfile

    from torchvision.datasets.utils import download_and_extract_archive

    assert entry.download is not None
    spec = entry.download
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".extracting", dir=root))
    try:
        download_and_extract_archive(spec.url, download_root=str(root), extract_root=str(staging),
                                     filename=spec.filename, md5=spec.md5)
        extracted = staging / folder.name
        if not extracted.exists():
            raise DatasetError(f"{name}: the archive from {spec.url} has no top folder "
                               f"{folder.name}: check the download URL")
        os.replace(extracted, folder)
    except DatasetError:
        raise
    except Exception as exc:  # no network, HTTP error, checksum mismatch, bad archive
        (root / spec.filename).unlink(missing_ok=True)  # never trust a partial archive later
        reason = first_line(exc)
        raise DatasetError(f"{_missing_message(entry, name, folder)} (download from {spec.url} "
                           f"failed: {reason})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _missing_message(entry: DatasetEntry, name: str, folder: Path) -> str:
    if entry.download is not None:
        return (f"{name}: no data at {folder}: download {entry.download.url} and extract it into "
                f"{folder.parent}, or set --data-root to the folder that holds {folder.name}")
    return f"{name}: no data at {folder}: {entry.layout or 'check the path'}"


# --------------------------------------------------------------------------------------------
# Decoding images in parallel (PIL releases the GIL while it decodes)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

def _read_cifar(folder: Path, *, train_files: Sequence[str], test_files: Sequence[str],
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


def _read_parquet(folder: Path, progress: ProgressFn | None) -> ImageDataset:
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
        _check_label_range(name, split, labels, len(classes))
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


def _read_imagefolder(folder: Path, progress: ProgressFn | None) -> ImageDataset:
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


def _read_cub200(folder: Path, progress: ProgressFn | None, size: int = 32) -> ImageDataset:
    """CUB-200-2011 with its official train/test split, every image resized to size x size."""
    name = "cub200"

    def table(file: str) -> list[list[str]]:
        path = folder / file
        if not path.exists():
            raise DatasetError(f"{name}: {path} is missing: {_CUB_LAYOUT}")
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


def _read_tiny_imagenet(folder: Path, progress: ProgressFn | None) -> ImageDataset:
    """tiny-imagenet-200: train/WNID/images/*.JPEG; val either as shipped (val/images/ plus
    val_annotations.txt) or already reformatted into val/WNID/[images/]*.JPEG."""
    name = "tiny-imagenet"
    wnids_file = folder / "wnids.txt"
    if not wnids_file.exists():
        raise DatasetError(f"{name}: {wnids_file} is missing: {_TINY_LAYOUT}")
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


def _read_digits(folder: Path, progress: ProgressFn | None) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (0..16 -> 0..255); every 5th image is a test image."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    test = np.arange(len(images)) % 5 == 4
    x, y = torch.from_numpy(images), _labels(bunch.target)
    t = torch.from_numpy(test)
    return ImageDataset("digits", x[~t].contiguous(), y[~t], x[t].contiguous(), y[t],
                        tuple(str(d) for d in range(10)))


def _sklearn_digits_file(root: Path, arg: str | None) -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"


_CUB_LAYOUT = ("expected CUB_200_2011/ with images/, images.txt, image_class_labels.txt, "
               "train_test_split.txt and classes.txt (the official CUB_200_2011.tgz)")
_TINY_LAYOUT = ("expected tiny-imagenet-200/ with wnids.txt, words.txt, train/WNID/images/ and "
                "val/ (as in the official tiny-imagenet-200.zip)")


def _torchvision_cifar_download(cls_name: str) -> Download:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    return Download(url=cls.url, filename=cls.filename, md5=cls.tgz_md5)


register_dataset(DatasetEntry(
    name="cifar10",
    description="CIFAR-10 (torchvision): 10 classes, 32x32 RGB, 50k/10k",
    folder=lambda root, _: root / "cifar-10-batches-py",
    read=lambda folder, progress: _read_cifar(
        folder, train_files=[f"data_batch_{i}" for i in range(1, 6)], test_files=["test_batch"],
        meta_file="batches.meta", label_key="labels", names_key="label_names", name="cifar10"),
    layout="the python pickle batches of cifar-10-python.tar.gz",
    download=_torchvision_cifar_download("CIFAR10"),
    family="cifar10",
))
register_dataset(DatasetEntry(
    name="cifar100",
    description="CIFAR-100 (torchvision): 100 classes, 32x32 RGB, 50k/10k",
    folder=lambda root, _: root / "cifar-100-python",
    read=lambda folder, progress: _read_cifar(
        folder, train_files=["train"], test_files=["test"], meta_file="meta",
        label_key="fine_labels", names_key="fine_label_names", name="cifar100"),
    layout="the python pickle files of cifar-100-python.tar.gz",
    download=_torchvision_cifar_download("CIFAR100"),
    family="cifar100",
))
register_dataset(DatasetEntry(
    name="cub200",
    description="CUB-200-2011 birds: 200 classes, resized to 32x32 RGB, official split",
    folder=lambda root, _: root / "CUB_200_2011",
    read=_read_cub200,
    layout=_CUB_LAYOUT,
    download=Download(url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                      filename="CUB_200_2011.tgz"),
    family="cub200",
))
register_dataset(DatasetEntry(
    name="tiny-imagenet",
    description="Tiny-ImageNet-200: 200 classes, 64x64 RGB, 100k train / 10k val",
    folder=lambda root, _: root / "tiny-imagenet-200",
    read=_read_tiny_imagenet,
    layout=_TINY_LAYOUT,
    download=Download(url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                      filename="tiny-imagenet-200.zip"),
    family="tiny-imagenet",
))
register_dataset(DatasetEntry(
    name="parquet",
    description="a folder with train.parquet/test.parquet (image bytes + label) and class names",
    folder=lambda root, arg: Path(arg or "."),
    read=_read_parquet,
    layout=("expected train.parquet and test.parquet with columns 'image' (encoded bytes) and "
            "'label' (int), plus classes.json or a 'classes' schema metadata entry"),
    takes_path=True,
))
register_dataset(DatasetEntry(
    name="imagefolder",
    description="a folder with train/ and test/, one sub-folder of images per class",
    folder=lambda root, arg: Path(arg or "."),
    read=_read_imagefolder,
    layout="expected train/CLASS/*.png and test/CLASS/*.png (jpg, png, bmp, webp, ...)",
    takes_path=True,
))
register_dataset(DatasetEntry(
    name="digits",
    description="scikit-learn's bundled 8x8 digits: 10 classes, 1 channel, 1437/360 (offline)",
    folder=_sklearn_digits_file,
    read=_read_digits,
    layout="ships inside scikit-learn: reinstall scikit-learn",
    family="digits",  # no benchmark of the paper, and nothing else either
))
