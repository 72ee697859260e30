"""The data-set registry: every loader on small real files, the cache, and bad input."""

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from datafiles import (png_bytes, random_images, write_cifar_folder, write_cub_folder,
                       write_image_folder, write_parquet_dataset, write_tiny_imagenet_folder)

from podd_engine import data, fileio
from podd_engine.data import DatasetError, create_dataset


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_registry_lists_every_entry():
    names = {e.name for e in data.list_datasets()}
    assert names == {"cifar10", "cifar100", "cub200", "tiny-imagenet", "parquet", "imagefolder",
                     "digits"}


# ---- Parquet ------------------------------------------------------------------------------

def test_parquet_loads_exact_pixels_labels_and_class_names(tmp_path):
    written = write_parquet_dataset(tmp_path / "pq")
    ds = create_dataset(f"parquet:{tmp_path / 'pq'}")
    assert ds.class_names == ("cat", "dog", "frog")
    assert (ds.channels, ds.image_size, ds.num_classes) == (3, (8, 8), 3)
    for split in ("train", "test"):
        images, labels = written[split]
        assert torch.equal(getattr(ds, f"{split}_images"), nchw(images))
        assert getattr(ds, f"{split}_labels").tolist() == labels.tolist()
        assert getattr(ds, f"{split}_labels").dtype == torch.int64


def test_parquet_class_names_from_schema_metadata_and_hf_struct_column(tmp_path):
    written = write_parquet_dataset(tmp_path / "pq", classes_json=False, metadata_classes=True,
                                    hf_struct=True)
    ds = create_dataset(f"parquet:{tmp_path / 'pq'}")
    assert ds.class_names == ("cat", "dog", "frog")
    assert torch.equal(ds.train_images, nchw(written["train"][0]))


def test_parquet_missing_column_names_the_column(tmp_path):
    write_parquet_dataset(tmp_path / "pq", label_column="target")
    with pytest.raises(DatasetError, match=r"no column 'label'.*rename"):
        create_dataset(f"parquet:{tmp_path / 'pq'}")


def test_parquet_without_class_names_says_how_to_add_them(tmp_path):
    write_parquet_dataset(tmp_path / "pq", classes_json=False)
    with pytest.raises(DatasetError, match="classes.json"):
        create_dataset(f"parquet:{tmp_path / 'pq'}")


def test_parquet_labels_out_of_range(tmp_path):
    write_parquet_dataset(tmp_path / "pq", classes=("cat", "dog", "frog"))
    (tmp_path / "pq" / "classes.json").write_text('{"classes": ["cat", "dog"]}')
    with pytest.raises(DatasetError, match=r"labels span 0\.\.2 but there are 2 class names"):
        create_dataset(f"parquet:{tmp_path / 'pq'}")


def test_images_of_mixed_sizes_are_rejected(tmp_path):
    write_image_folder(tmp_path / "f", size=(8, 8))
    from PIL import Image
    Image.fromarray(random_images(1, (9, 8))[0]).save(tmp_path / "f" / "train" / "b" / "odd.png")
    with pytest.raises(DatasetError, match=r"odd\.png is 8x9 but the first is 8x8: resize"):
        create_dataset(f"imagefolder:{tmp_path / 'f'}")


# ---- image folder -------------------------------------------------------------------------

def test_imagefolder_sorted_classes_and_exact_pixels(tmp_path):
    write_image_folder(tmp_path / "f", classes=("zebra", "ant"), per_class=3)
    ds = create_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert ds.class_names == ("ant", "zebra")
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(ds.train_images[:3], nchw(random_images(3, (8, 8), 3, seed=3 + 10)))


def test_imagefolder_grayscale_gives_one_channel(tmp_path):
    write_image_folder(tmp_path / "g", channels=1)
    ds = create_dataset(f"imagefolder:{tmp_path / 'g'}")
    assert ds.channels == 1
    assert torch.equal(ds.test_images[:3, 0], torch.from_numpy(random_images(3, (8, 8), 1, 4)))


def test_imagefolder_test_class_missing_from_train(tmp_path):
    write_image_folder(tmp_path / "f", classes=("a", "b"), test_classes=("a", "c"))
    with pytest.raises(DatasetError, match=r"test/c is not a class in train/"):
        create_dataset(f"imagefolder:{tmp_path / 'f'}")


# ---- CIFAR (torchvision layout) -----------------------------------------------------------

@pytest.mark.parametrize("variant,folder", [("cifar10", "cifar-10-batches-py"),
                                            ("cifar100", "cifar-100-python")])
def test_cifar_pickle_folders(tmp_path, variant, folder):
    written = write_cifar_folder(tmp_path / "root" / folder, variant)
    ds = create_dataset(variant, data_root=tmp_path / "root")
    assert ds.num_classes == (10 if variant == "cifar10" else 100)
    assert torch.equal(ds.train_images, torch.from_numpy(written["train"][0]))
    assert ds.test_labels.tolist() == written["test"][1].tolist()


@pytest.fixture
def cifar_archive(tmp_path):
    """A real tar.gz in the layout of cifar-10-python.tar.gz, served over HTTP on loopback."""
    write_cifar_folder(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=archive.parent)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
    yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()
    server.server_close()


def test_cifar_download_and_extract_from_a_local_archive(tmp_path, monkeypatch, cifar_archive):
    url, md5 = cifar_archive
    entry = data._REGISTRY["cifar10"]
    download = dataclasses.replace(entry.download, url=url, md5=md5)
    monkeypatch.setitem(data._REGISTRY, "cifar10", dataclasses.replace(entry, download=download))
    ds = create_dataset("cifar10", data_root=tmp_path / "root")
    assert len(ds.train_images) == 20 and len(ds.test_images) == 4
    assert not list((tmp_path / "root").glob(".*extracting"))  # staging folder cleaned up


def test_cifar_download_with_bad_checksum_leaves_nothing_behind(tmp_path, monkeypatch,
                                                                 cifar_archive):
    url, _ = cifar_archive
    entry = data._REGISTRY["cifar10"]
    download = dataclasses.replace(entry.download, url=url, md5="0" * 32)
    monkeypatch.setitem(data._REGISTRY, "cifar10", dataclasses.replace(entry, download=download))
    with pytest.raises(DatasetError, match="download from .* failed"):
        create_dataset("cifar10", data_root=tmp_path / "root")
    assert not (tmp_path / "root").exists()  # the data root it created is gone too
    (tmp_path / "mine").mkdir()  # a data root the user made stays, empty
    with pytest.raises(DatasetError, match="download from .* failed"):
        create_dataset("cifar10", data_root=tmp_path / "mine")
    assert list((tmp_path / "mine").iterdir()) == []


def test_missing_cifar_without_download_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"no data at .*cifar-10-batches-py: download"):
        create_dataset("cifar10", data_root=tmp_path / "empty", download=False)


# ---- CUB-200 and Tiny-ImageNet layouts ------------------------------------------------------

def test_cub200_official_split_resized_to_32(tmp_path):
    write_cub_folder(tmp_path / "root" / "CUB_200_2011", n_classes=3, per_class=4)
    ds = create_dataset("cub200", data_root=tmp_path / "root")
    assert ds.class_names == ("Bird number 0", "Bird number 1", "Bird number 2")
    assert ds.image_size == (32, 32) and ds.channels == 3
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 2, 2]  # images 0 and 2 of each class
    assert ds.test_labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_tiny_imagenet_shipped_and_reformatted_val_agree(tmp_path):
    write_tiny_imagenet_folder(tmp_path / "a" / "tiny-imagenet-200")
    write_tiny_imagenet_folder(tmp_path / "b" / "tiny-imagenet-200", reformatted_val=True)
    shipped = create_dataset("tiny-imagenet", data_root=tmp_path / "a")
    reformatted = create_dataset("tiny-imagenet", data_root=tmp_path / "b")
    assert shipped.class_names == ("thing n01", "thing n02", "thing n03")  # sorted wnids
    assert shipped.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(shipped.test_images, reformatted.test_images)
    assert torch.equal(shipped.train_images, reformatted.train_images)


# ---- digits and the shared CIFAR-10 ---------------------------------------------------------

def test_digits_offline():
    ds = create_dataset("digits")
    assert (ds.channels, ds.image_size, ds.num_classes) == (1, (8, 8), 10)
    assert len(ds.train_images) + len(ds.test_images) == 1797
    assert int(ds.train_images.max()) == 255 and set(ds.test_labels.tolist()) == set(range(10))


def test_shared_cifar10_parquet(shared_cifar10):
    ds = create_dataset(f"parquet:{shared_cifar10}")
    assert ds.train_images.shape == (50000, 3, 32, 32)
    assert ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                              "horse", "ship", "truck")
    assert ds.train_labels.bincount().tolist() == [5000] * 10


# ---- families: which benchmark a data set is -------------------------------------------------

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


def test_registry_benchmarks_are_their_own_family_and_digits_is_none(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    assert create_dataset("cifar10", data_root=tmp_path, download=False).family == "cifar10"
    digits = create_dataset("digits")
    assert (digits.family, digits.family_source) == ("digits", "registry")


def test_a_copy_is_a_benchmark_by_its_class_names_not_its_shape(tmp_path):
    write_parquet_dataset(tmp_path / "c10", classes=CIFAR10_NAMES, size=(32, 32), n_train=20)
    copy = create_dataset(f"parquet:{tmp_path / 'c10'}", cache_dir=tmp_path / "cache")
    assert (copy.family, copy.family_source) == ("cifar10", "class names")
    # the same shape (10 classes, 32x32) with other names, e.g. SVHN's digits: its own family
    write_parquet_dataset(tmp_path / "svhn", classes=tuple(str(d) for d in range(10)),
                          size=(32, 32), n_train=20)
    other = create_dataset(f"parquet:{tmp_path / 'svhn'}", cache_dir=tmp_path / "cache")
    assert (other.family, other.family_source) == (f"parquet:{tmp_path / 'svhn'}", "none")
    # names compare loosely in form (case, '_' for ' '), exactly in content and order
    write_parquet_dataset(tmp_path / "upper", classes=tuple(n.upper() for n in CIFAR10_NAMES),
                          size=(32, 32), n_train=20)
    assert create_dataset(f"parquet:{tmp_path / 'upper'}", use_cache=False).family == "cifar10"
    write_parquet_dataset(tmp_path / "swapped", classes=CIFAR10_NAMES[::-1], size=(32, 32),
                          n_train=20)
    assert create_dataset(f"parquet:{tmp_path / 'swapped'}", use_cache=False).family != "cifar10"


def test_a_copy_can_declare_its_family(tmp_path):
    # CUB names need not be spelled as in classes.txt: a copy says which benchmark it is
    folder = tmp_path / "cub"
    names = tuple(f"bird {i}" for i in range(200))
    write_parquet_dataset(folder, classes=names, n_train=200, n_test=200)
    (folder / "classes.json").write_text(json.dumps({"classes": list(names),
                                                     "family": "cub200"}))
    ds = create_dataset(f"parquet:{folder}", use_cache=False)
    assert (ds.family, ds.family_source) == ("cub200", "declared")
    # in the Parquet schema metadata instead
    meta = tmp_path / "meta"
    write_parquet_dataset(meta, classes=names, n_train=200, n_test=200, classes_json=False,
                          metadata_classes=True)
    table = pq.read_table(meta / "train.parquet")
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                  b"family": b"cub200"}), meta / "train.parquet")
    assert create_dataset(f"parquet:{meta}", use_cache=False).family == "cub200"
    # or by the user (a sweep's `family:`, a config's family setting)
    plain = tmp_path / "plain"
    write_parquet_dataset(plain, classes=names, n_train=200, n_test=200)
    declared = create_dataset(f"parquet:{plain}", use_cache=False, family_declared="cub200")
    assert (declared.family, declared.family_source) == ("cub200", "declared")


@pytest.mark.parametrize("family, message", [
    ("cifar100", "says it is cifar100, which has 100 classes, but it has 10"),
    ("svhn", "names family 'svhn', which is not one of the paper's benchmarks"),
])
def test_an_impossible_family_declaration_is_refused(tmp_path, family, message):
    folder = tmp_path / "d"
    write_parquet_dataset(folder, classes=tuple(str(d) for d in range(10)), n_train=20)
    (folder / "classes.json").write_text(json.dumps({"classes": [str(d) for d in range(10)],
                                                     "family": family}))
    with pytest.raises(DatasetError, match=message):
        create_dataset(f"parquet:{folder}", use_cache=False)


def test_a_declaration_cannot_contradict_what_the_data_is(tmp_path):
    write_parquet_dataset(tmp_path / "c10", classes=CIFAR10_NAMES, n_train=20)
    with pytest.raises(DatasetError, match=r"is cifar10 \(by its class names\), not cub200"):
        create_dataset(f"parquet:{tmp_path / 'c10'}", use_cache=False, family_declared="cub200")
    with pytest.raises(DatasetError, match=r"digits is digits \(by its registry\), not cifar10"):
        create_dataset("digits", family_declared="cifar10")


def test_the_shipped_cifar10_copy_is_cifar10(shared_cifar10):
    ds = create_dataset(f"parquet:{shared_cifar10}")
    assert (ds.family, ds.family_source) == ("cifar10", "class names")


def test_benchmark_class_lists_are_complete():
    lists = data.benchmark_class_names()
    assert {f: [len(names) for names in known] for f, known in lists.items()} == {
        "cifar10": [10], "cifar100": [100], "cub200": [200], "tiny-imagenet": [200, 200]}
    assert lists["cifar10"][0] == list(CIFAR10_NAMES)
    assert all(len(set(names)) == len(names) for known in lists.values() for names in known)


# ---- the cache ----------------------------------------------------------------------------

def _replace_reader(monkeypatch, name, read):
    entry = data._REGISTRY[name]
    monkeypatch.setitem(data._REGISTRY, name, dataclasses.replace(entry, read=read))


def _refuse(folder, progress):
    raise AssertionError("the reader ran: the cache was not used")


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    write_parquet_dataset(tmp_path / "pq")
    first = create_dataset(f"parquet:{tmp_path / 'pq'}")
    _replace_reader(monkeypatch, "parquet", _refuse)
    second = create_dataset(f"parquet:{tmp_path / 'pq'}")
    assert torch.equal(first.train_images, second.train_images)
    assert first.class_names == second.class_names


def test_cache_is_invalidated_when_a_source_file_changes(tmp_path, monkeypatch):
    write_parquet_dataset(tmp_path / "pq")
    spec = f"parquet:{tmp_path / 'pq'}"
    old_cache = data.dataset_cache_path(spec)
    create_dataset(spec)
    source = tmp_path / "pq" / "train.parquet"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with monkeypatch.context() as patch:
        _replace_reader(patch, "parquet", _refuse)
        with pytest.raises(AssertionError, match="the reader ran"):
            create_dataset(spec)
    create_dataset(spec)
    assert data.dataset_cache_path(spec) != old_cache
    assert not old_cache.exists()  # the stale entry was replaced, not kept beside the new one


def test_failed_cache_write_leaves_no_file(tmp_path, monkeypatch):
    write_parquet_dataset(tmp_path / "pq")

    def torn_save(obj, path):  # writes part of the file, then dies (a full disk, a kill)
        with open(path, "wb") as f:
            f.write(b"half a tensor")
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(fileio.torch, "save", torn_save)
        with pytest.raises(OSError, match="No space left"):
            create_dataset(f"parquet:{tmp_path / 'pq'}")
    cache_files = list((tmp_path / "cache").rglob("*"))
    assert [p for p in cache_files if p.is_file()] == []
    assert len(create_dataset(f"parquet:{tmp_path / 'pq'}").train_images) == 12


def test_unreadable_cache_file_is_rebuilt(tmp_path):
    write_parquet_dataset(tmp_path / "pq")
    spec = f"parquet:{tmp_path / 'pq'}"
    create_dataset(spec)
    data.dataset_cache_path(spec).write_bytes(b"garbage")
    assert len(create_dataset(spec).train_images) == 12


# ---- bad specs ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ("imagenet", r"unknown data set 'imagenet': choose one of cifar10"),
    ("parquet", r"needs a folder: write parquet:PATH"),
    ("cifar10:/somewhere", r"takes no path"),
])
def test_bad_dataset_specs(spec, message):
    with pytest.raises(DatasetError, match=message):
        create_dataset(spec)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"no data at .*nowhere: expected train.parquet"):
        create_dataset(f"parquet:{tmp_path / 'nowhere'}")


def test_every_path_to_the_same_data_finds_the_same_cache_entry(tmp_path, monkeypatch):
    """The cache is keyed by the source's resolved path: a relative path, an absolute one with
    `..`, and a symlink to the folder decode once and share one file."""
    from podd_engine.data import create_dataset, dataset_cache_path
    from podd_engine.dataset_cache import cache_contents, clear_cache

    source = tmp_path / "data" / "tiny"
    write_parquet_dataset(source)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(source)
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path / "elsewhere")
    specs = ["parquet:../data/tiny", f"parquet:{tmp_path}/elsewhere/../data/tiny",
             f"parquet:{tmp_path / 'link'}"]
    paths = {dataset_cache_path(s, cache_dir=cache) for s in specs}
    assert len(paths) == 1
    first = create_dataset(specs[0], cache_dir=cache)
    for spec in specs[1:]:
        again = create_dataset(spec, cache_dir=cache)
        assert torch.equal(again.train_images, first.train_images)
    assert cache_contents(cache)["datasets"][0] == 1
    assert clear_cache(cache)[0] == 1 and cache_contents(cache)["datasets"] == (0, 0)


def test_the_content_hash_names_the_data_not_where_it_was_read(tmp_path):
    """Two copies of a data set (other folders, decoded anew) hash alike; one changed pixel
    or one renamed class does not (what runs record as `data_hash`)."""
    import shutil

    write_parquet_dataset(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    first = create_dataset(f"parquet:{tmp_path / 'a'}").content_hash
    assert len(first) == 16 and int(first, 16) >= 0
    assert create_dataset(f"parquet:{tmp_path / 'copy'}", use_cache=False).content_hash == first

    shutil.copytree(tmp_path / "a", tmp_path / "pixel")
    table = pq.read_table(tmp_path / "pixel" / "test.parquet")
    image = np.array(Image.open(io.BytesIO(table.column("image")[0].as_py())))
    image[0, 0, 0] ^= 1
    images = [png_bytes(image)] + table.column("image").to_pylist()[1:]
    pq.write_table(table.set_column(0, "image", pa.array(images, pa.binary())),
                   tmp_path / "pixel" / "test.parquet")
    assert create_dataset(f"parquet:{tmp_path / 'pixel'}").content_hash != first

    shutil.copytree(tmp_path / "a", tmp_path / "renamed")
    (tmp_path / "renamed" / "classes.json").write_text(
        json.dumps({"name": "tiny", "classes": ["cat", "dog", "toad"]}))
    assert create_dataset(f"parquet:{tmp_path / 'renamed'}").content_hash != first
