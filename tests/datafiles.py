"""Writers for tiny data sets in each on-disk layout the registry reads.

Images are random uint8 pixels stored losslessly (PNG, or raw CIFAR pickles), so loaders can
be checked pixel for pixel against what was written.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def random_images(n: int, size: tuple[int, int] = (8, 8), channels: int = 3,
                  seed: int = 0) -> np.ndarray:
    """[n, H, W, C] uint8 (C dropped for grayscale)."""
    rng = np.random.default_rng(seed)
    shape = (n, *size, channels) if channels > 1 else (n, *size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet_dataset(folder: Path, classes=("cat", "dog", "frog"), n_train=12, n_test=6,
                          size=(8, 8), *, classes_json=True, metadata_classes=False,
                          image_column="image", label_column="label",
                          hf_struct=False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images = random_images(n, size, seed=seed)
        labels = np.arange(n, dtype=np.int16) % len(classes)
        blobs = [png_bytes(im) for im in images]
        image_col = (pa.array([{"bytes": b, "path": None} for b in blobs]) if hf_struct
                     else pa.array(blobs, type=pa.binary()))
        table = pa.table({image_column: image_col, label_column: pa.array(labels)})
        if metadata_classes:
            table = table.replace_schema_metadata({"classes": json.dumps(list(classes))})
        pq.write_table(table, folder / f"{split}.parquet")
        written[split] = (images, labels)
    if classes_json:
        (folder / "classes.json").write_text(json.dumps({"name": "tiny", "classes": list(classes)}))
    return written


def write_image_folder(folder: Path, classes=("a", "b"), per_class=3, size=(8, 8), channels=3,
                       test_classes=None) -> None:
    for split, seed in (("train", 3), ("test", 4)):
        for c, name in enumerate(test_classes if split == "test" and test_classes else classes):
            class_dir = folder / split / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(random_images(per_class, size, channels, seed + 10 * c)):
                Image.fromarray(image).save(class_dir / f"{i}.png")


def write_cifar_folder(folder: Path, variant: str = "cifar10", per_batch: int = 4
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The python-pickle layout of cifar-10-batches-py / cifar-100-python."""
    folder.mkdir(parents=True, exist_ok=True)
    n_classes = 10 if variant == "cifar10" else 100
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    files = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
             if variant == "cifar10" else {"train": ["train"], "test": ["test"]})
    written = {}
    seed = 0
    for split, names in files.items():
        all_x, all_y = [], []
        for name in names:
            seed += 1
            x = random_images(per_batch, (32, 32), seed=seed).transpose(0, 3, 1, 2)  # NCHW
            y = (np.arange(per_batch) + seed) % n_classes
            with open(folder / name, "wb") as f:
                pickle.dump({"data": x.reshape(per_batch, -1), label_key: y.tolist()}, f)
            all_x.append(x)
            all_y.append(y)
        written[split] = (np.concatenate(all_x), np.concatenate(all_y))
    names = [f"class{i}" for i in range(n_classes)]
    meta = ({"label_names": names} if variant == "cifar10" else {"fine_label_names": names})
    with open(folder / ("batches.meta" if variant == "cifar10" else "meta"), "wb") as f:
        pickle.dump(meta, f)
    return written


def write_cub_folder(folder: Path, n_classes: int = 3, per_class: int = 4) -> None:
    """CUB_200_2011 layout; images have different sizes (as the real ones do)."""
    images_txt, labels_txt, split_txt = [], [], []
    classes = [f"{c + 1:03d}.Bird_number_{c}" for c in range(n_classes)]
    image_id = 0
    for c, class_name in enumerate(classes):
        (folder / "images" / class_name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image_id += 1
            size = (40 + 3 * i, 50 + 2 * c)
            rel = f"{class_name}/img_{i}.jpg"
            Image.fromarray(random_images(1, size, seed=image_id)[0]).save(folder / "images" / rel)
            images_txt.append(f"{image_id} {rel}")
            labels_txt.append(f"{image_id} {c + 1}")
            split_txt.append(f"{image_id} {1 if i % 2 == 0 else 0}")
    (folder / "images.txt").write_text("\n".join(images_txt) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels_txt) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split_txt) + "\n")
    (folder / "classes.txt").write_text(
        "\n".join(f"{c + 1} {name}" for c, name in enumerate(classes)) + "\n")


def write_tiny_imagenet_folder(folder: Path, wnids=("n02", "n01", "n03"), per_class: int = 2,
                               reformatted_val: bool = False) -> None:
    """tiny-imagenet-200 layout with 8x8 PNG images (the loader does not assume 64x64)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text(
        "\n".join(f"{w}\tthing {w}, other name" for w in wnids) + "\n")
    annotations = []
    for c, wnid in enumerate(sorted(wnids)):
        train_dir = folder / "train" / wnid / "images"
        train_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(random_images(per_class, seed=100 + c)):
            Image.fromarray(image).save(train_dir / f"{wnid}_{i}.png")
        for i, image in enumerate(random_images(per_class, seed=200 + c)):
            name = f"val_{c}_{i}.png"
            val_dir = (folder / "val" / wnid / "images") if reformatted_val else (
                folder / "val" / "images")
            val_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(val_dir / name)
            annotations.append(f"{name}\t{wnid}\t0\t0\t8\t8")
    if not reformatted_val:
        (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
