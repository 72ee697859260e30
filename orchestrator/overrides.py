"""Command-line overrides of a sweep spec, Hydra-style: `podd-sweep launch SPEC key=value ...`.

    dataset=parquet:../shared/datasets/cifar10-jpeg     a top-level key
    settings.steps=300  resources.cpu=2                 a dotted key reaches into a mapping
    seeds=[0]  ipc=[0.5,1]  method=podd                 the value is read as YAML
    max_concurrent=null                                 null removes the key (its default)

The overrides are applied to the file's mapping before it is validated, so an overridden
spec is checked exactly like a file (errors name the field, and the overrides they came
with), and the resolved spec is what runs and what MLflow records.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from podd_engine.errors import UserError

class PlainNumbersLoader(yaml.SafeLoader):
    """YAML as a spec is read: only decimal numbers are numbers. YAML 1.1 reads 0x10 as 16,
    017 as 15 and 1:20 as 80; in a spec those are a grid (`patch_grid: 0x10`), a typo or a
    ratio, and read as numbers they would be refused as something the user never wrote."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
PlainNumbersLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
PlainNumbersLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                         list("-+0123456789"))
PlainNumbersLoader.add_implicit_resolver(  # YAML 1.1's floats but the base-60 ones
    _FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=PlainNumbersLoader)


_KEY = r"[A-Za-z_][A-Za-z0-9_]*"
_OVERRIDE = re.compile(rf"^({_KEY}(?:\.{_KEY})*)=(.*)$", re.DOTALL)
EXAMPLE = "settings.steps=300"


@dataclass(frozen=True)
class Override:
    path: tuple[str, ...]
    value: Any
    text: str  # as given


def parse_override(text: str) -> Override:
    """`key.sub=value` -> Override (UserError naming the override and the fix)."""
    found = _OVERRIDE.match(text.strip())
    if found is None:
        hint = (f"'{text.split('=', 1)[0]}' is not a spec key" if "=" in text else
                "give KEY=VALUE")
        raise UserError(f"override {text!r}: {hint}, e.g. {EXAMPLE} or seeds=[0]",
                        field=text.split("=", 1)[0] or None)
    key, raw = found.group(1), found.group(2)
    if not raw.strip():
        raise UserError(f"override {text!r}: no value after '=': give one (e.g. {key}=...), or "
                        f"{key}=null to use the default", field=key)
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"override {text!r}: {raw!r} is not a YAML value "
                        f"({getattr(exc, 'problem', None) or exc}); quote it in the shell, "
                        f"e.g. '{key}=[0, 1]'", field=key) from None
    return Override(tuple(key.split(".")), value, text.strip())


def parse_overrides(texts: Sequence[str]) -> list[Override]:
    overrides = [parse_override(t) for t in texts]
    seen: dict[tuple[str, ...], str] = {}
    for o in overrides:
        if o.path in seen:
            raise UserError(f"override {o.text!r}: {'.'.join(o.path)} is set twice (also by "
                            f"{seen[o.path]!r}): give it once", field=".".join(o.path))
        seen[o.path] = o.text
    return overrides


def apply_overrides(mapping: dict[str, Any], overrides: Sequence[Override]) -> dict[str, Any]:
    """A copy of the spec's mapping with the overrides applied (the file's is left alone)."""
    resolved = copy.deepcopy(mapping)
    for o in overrides:
        node = resolved
        for depth, key in enumerate(o.path[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(o.path[:depth + 1])
                raise UserError(f"override {o.text!r}: {where} is {type(child).__name__} "
                                f"{child!r} in the spec, not a mapping: set {where}=... "
                                f"instead", field=where)
            node = child
        if o.value is None:
            node.pop(o.path[-1], None)
        else:
            node[o.path[-1]] = o.value
    return resolved


def describe(overrides: Sequence[Override]) -> str:
    return " ".join(o.text for o in overrides)
