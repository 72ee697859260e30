"""Families: which of the paper's benchmarks a data set is (cifar10, cifar100, cub200,
tiny-imagenet), found from the data, never from its shape.

A benchmark's own registry entry is its family. A `parquet:`/`imagefolder:` copy is one when
it declares it (a `family` key in its classes.json or in its Parquet schema metadata; or the
user's `family` setting) or when its class-name list equals the benchmark's exactly (up to
form: `benchmark_classes.json`). Anything else is its own family, named like the data set.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

from podd_engine.benchmarks import BENCHMARKS
from podd_engine.images import DatasetError, ImageDataset

def benchmark_class_names() -> dict[str, list[list[str]]]:
    """family -> the class-name lists a copy of that benchmark may carry (CIFAR's label
    names; CUB's classes.txt; Tiny-ImageNet's wnids or their first WordNet lemma)."""
    return {name: b.class_name_lists for name, b in BENCHMARKS.items()}


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


def family_of(entry_family: str | None, folder: Path, class_names: Sequence[str],
              name: str) -> tuple[str, str]:
    """(family, how it was found) of a data set just loaded; `entry_family` is its registry
    entry's (a benchmark's own entry, or None for a path-named one)."""
    if entry_family is not None:
        return entry_family, "registry"
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
