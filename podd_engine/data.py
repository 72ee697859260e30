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

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from podd_engine import readers
from podd_engine.errors import first_line
from podd_engine.dataset_cache import (CACHED_FIELDS, cache_file, default_cache_dir,  # noqa: F401
                                       read_cache, write_cache)
from podd_engine.families import (benchmark_class_names, family_by_class_names,  # noqa: F401
                                  family_of, with_declared_family)
from podd_engine.images import DatasetError, ImageDataset, ProgressFn  # noqa: F401 (the API)
from podd_engine.readers import decode_images  # noqa: F401


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
    fields = read_cache(cache) if use_cache and cache.exists() else None
    if fields is None:
        read = entry.read(folder, progress)
        fields = {k: getattr(read, k) for k in CACHED_FIELDS}
        if use_cache:
            write_cache(cache, ImageDataset(name=name, **fields))
    family, source = family_of(entry.family, folder, fields["class_names"], name)
    dataset = ImageDataset(name=name, **fields, family=family, family_source=source)
    return with_declared_family(dataset, family_declared) if family_declared else dataset


def dataset_cache_path(spec: str, *, data_root: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file this source would use now (it changes when any source file changes)."""
    entry, _ = parse_dataset_spec(spec)
    return cache_file(entry.name, dataset_folder(spec, data_root), cache_dir)


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
    created_root = not root.exists()  # removed again if the download fails (nothing left)
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
        if created_root and root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def _missing_message(entry: DatasetEntry, name: str, folder: Path) -> str:
    if entry.download is not None:
        return (f"{name}: no data at {folder}: download {entry.download.url} and extract it into "
                f"{folder.parent}, or set --data-root to the folder that holds {folder.name}")
    return f"{name}: no data at {folder}: {entry.layout or 'check the path'}"


def _torchvision_cifar_download(cls_name: str) -> Download:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    return Download(url=cls.url, filename=cls.filename, md5=cls.tgz_md5)


register_dataset(DatasetEntry(
    name="cifar10",
    description="CIFAR-10 (torchvision): 10 classes, 32x32 RGB, 50k/10k",
    folder=lambda root, _: root / "cifar-10-batches-py",
    read=lambda folder, progress: readers.read_cifar(
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
    read=lambda folder, progress: readers.read_cifar(
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
    read=readers.read_cub200,
    layout=readers.CUB_LAYOUT,
    download=Download(url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                      filename="CUB_200_2011.tgz"),
    family="cub200",
))
register_dataset(DatasetEntry(
    name="tiny-imagenet",
    description="Tiny-ImageNet-200: 200 classes, 64x64 RGB, 100k train / 10k val",
    folder=lambda root, _: root / "tiny-imagenet-200",
    read=readers.read_tiny_imagenet,
    layout=readers.TINY_LAYOUT,
    download=Download(url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                      filename="tiny-imagenet-200.zip"),
    family="tiny-imagenet",
))
register_dataset(DatasetEntry(
    name="parquet",
    description="a folder with train.parquet/test.parquet (image bytes + label) and class names",
    folder=lambda root, arg: Path(arg or "."),
    read=readers.read_parquet,
    layout=("expected train.parquet and test.parquet with columns 'image' (encoded bytes) and "
            "'label' (int), plus classes.json or a 'classes' schema metadata entry"),
    takes_path=True,
))
register_dataset(DatasetEntry(
    name="imagefolder",
    description="a folder with train/ and test/, one sub-folder of images per class",
    folder=lambda root, arg: Path(arg or "."),
    read=readers.read_imagefolder,
    layout="expected train/CLASS/*.png and test/CLASS/*.png (jpg, png, bmp, webp, ...)",
    takes_path=True,
))
register_dataset(DatasetEntry(
    name="digits",
    description="scikit-learn's bundled 8x8 digits: 10 classes, 1 channel, 1437/360 (offline)",
    folder=readers.sklearn_digits_file,
    read=readers.read_digits,
    layout="ships inside scikit-learn: reinstall scikit-learn",
    family="digits",  # no benchmark of the paper, and nothing else either
))
