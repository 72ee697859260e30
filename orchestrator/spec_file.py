"""A sweep spec file read into a mapping: UTF-8 text, YAML with no key given twice, and the
command line's overrides applied (orchestrator/overrides.py). Validation is spec.py's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.overrides import Override, PlainNumbersLoader, apply_overrides
from podd_engine.errors import UserError


class SpecError(UserError):
    """A sweep spec that cannot run; the message starts with the field path."""


class _UniqueKeyLoader(PlainNumbersLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently), and
    reads only decimal numbers as numbers."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"line {key_node.start_mark.line + 1}: key {key!r} is given "
                                f"twice (also on line {seen[key]}): keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_spec_text(path: Path) -> str:
    """A spec file's text (one line when it is not UTF-8)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                        f"{exc.start}): save it as UTF-8") from None


def read_spec_mapping(text: str, source: str = "<spec>",
                      overrides: Sequence[Override] = ()) -> dict[str, Any]:
    """The spec file's YAML mapping with the command line's overrides applied."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}:{where} is not valid YAML: "
                        f"{getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a sweep spec is a YAML mapping with at least name, dataset "
                        f"and ipc; got {type(raw).__name__}")
    try:
        return apply_overrides(raw, overrides)
    except UserError as exc:
        raise SpecError(f"{source}: {exc}") from None


def short_dataset_name(spec: str) -> str:
    """A data set as people say it: `parquet:../x/cifar10-jpeg` is cifar10-jpeg."""
    kind, _, path = spec.partition(":")
    return Path(path).name if path else kind
