"""A sweep spec: the YAML a user writes, as a validated model (`SweepSpec`).

    name: cifar10-ipc
    dataset: cifar10              # or a list
    preset: paper                 # engine settings; `settings:` overrides any of them
    ipc: [0.3, 0.5, 1.0]          # the grid axes: each a value or a list
    patch_grid: ["16x6"]
    class_order: poco
    labels: fixed
    method: podd
    seeds: [0, 1]
    include:                      # extra trials; axes they leave out take the values above
      - {method: rat-bptt, ipc: 1}
    resources: {cpu: 1, gpu: 0.5}

Every problem is found before anything starts and reported as one line naming the field path
(`ipc[2]`, `include[0].method`, `resources.gpu`) and the fix. The trials it expands into:
orchestrator/sweep.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from orchestrator.overrides import Override, describe
from orchestrator.search import SEARCHES
from orchestrator.spec_file import SpecError, read_spec_mapping
from orchestrator.store import DEFAULT_EXPERIMENT
from orchestrator.verdict import CRITERIA, MIN_RUNS
from podd_engine.config import LABEL_MODES, ORDERINGS, TrialConfig, parse_grid
from podd_engine.methods import method_names

# The grid axes, in the order trials are listed; each maps to one TrialConfig field.
AXES = {"dataset": "dataset", "method": "method", "ipc": "ipc", "patch_grid": "patch_grid",
        "class_order": "order", "labels": "labels", "seeds": "seed"}
DEFAULT_STORAGE = "runs/ray"


def _check_setting_names(settings: dict[str, Any]) -> None:
    """Every name is an engine setting that is not a grid axis or a top-level key."""
    known = {f.name for f in dataclasses.fields(TrialConfig)}
    owned = set(AXES.values()) | {"class_grid", "order_grid", "data_root", "cache_dir", "family"}
    for name in settings:
        if name in owned:
            axis = next((a for a, f in AXES.items() if f == name), name)
            raise ValueError(f"{name!r} is set at the top level of the spec ({axis}:), "
                             f"not under settings")
        if name not in known:
            raise ValueError(f"unknown engine setting {name!r}; valid settings: "
                             f"{', '.join(sorted(known - owned))}")


def _listify(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _grid_text(value: Any) -> str:
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                      for v in value):
            raise ValueError(f"a grid is [COLS, ROWS] or 'COLSxROWS', got {value!r}")
        value = f"{value[0]}x{value[1]}"
    cols, rows = parse_grid(str(value), "grid")
    return f"{cols}x{rows}"


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpu: float = Field(1.0, gt=0, description="CPU cores per trial (also its torch threads)")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; fractions share a GPU")


def _not_a_bool(value):
    # YAML's true/false would pass as 1/0: a number must be written as one
    if isinstance(value, bool):
        raise ValueError(f"Input should be a number, not the boolean {value!r}")
    return value


Positive = Annotated[float, BeforeValidator(_not_a_bool), Field(gt=0, allow_inf_nan=False)]
Seed = Annotated[int, BeforeValidator(_not_a_bool)]
GridText = Annotated[str, BeforeValidator(_grid_text)]
def _known_method(value: str) -> str:
    """A registered method (checked when the spec is read, so a method registered at run time
    by a plug-in or a test is accepted too)."""
    names = [repr(m) for m in method_names()]
    if value not in method_names():
        raise ValueError(f"Input should be {', '.join(names[:-1])} or {names[-1]} "
                         f"(got {value!r})")
    return value


Method = Annotated[str, AfterValidator(_known_method)]
Order = Literal[ORDERINGS]
Labels = Literal[LABEL_MODES]


def _one_or_more(kind, optional: bool = True):
    if not optional:
        return Union[kind, Annotated[list[kind], Field(min_length=1)]]
    return Union[kind, Annotated[list[kind], Field(min_length=1)], None]


class AxisValues(BaseModel):
    """Grid axes: each a single value or a list. Used at the top level and in `include`."""

    model_config = ConfigDict(extra="forbid")
    dataset: _one_or_more(str) = None
    method: _one_or_more(Method) = None
    ipc: _one_or_more(Positive) = None
    patch_grid: _one_or_more(GridText) = None
    class_order: _one_or_more(Order) = None
    labels: _one_or_more(Labels) = None
    seeds: _one_or_more(Seed) = None

    @field_validator("patch_grid", mode="before")
    @classmethod
    def _one_grid_as_pair(cls, value):
        # [16, 6] is one grid; [[16, 6], "8x3"] or ["16x6"] are lists of grids
        if isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return _grid_text(value)
        return value

    @field_validator("dataset", "method", "ipc", "patch_grid", "class_order", "labels", "seeds")
    @classmethod
    def _each_value_once(cls, value):
        # a value listed twice would run the same trials twice (folded into one, silently)
        if isinstance(value, list):
            for i, v in enumerate(value):
                if v in value[:i]:
                    raise ValueError(f"[{i}]: {v!r} is given twice (also at "
                                     f"[{value.index(v)}]): keep one")
        return value

    def given(self) -> dict[str, list]:
        return {name: _listify(getattr(self, name)) for name in AXES
                if getattr(self, name) is not None}


class EarlyStop(BaseModel):
    """Stop a poster trial that is this many accuracy points below the baseline's own curve
    at the same outer step (a search's evaluations during distillation, `eval_every`)."""

    model_config = ConfigDict(extra="forbid")
    margin_points: Annotated[float, BeforeValidator(_not_a_bool),
                             Field(ge=0, le=100, allow_inf_nan=False)]


SEARCH_AXES = ("ipc", "patch_grid", "class_order", "labels")


class SweepSpec(AxisValues):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="letters, digits, '.', '_' and '-'")
    dataset: _one_or_more(str, optional=False)  # `dataset: null` is no data set
    ipc: _one_or_more(Positive, optional=False)
    include: list[AxisValues] = []
    preset: Union[str, None] = None
    settings: dict[str, Any] = {}
    # each entry overrides engine settings for a copy of the whole grid (a list of schedules)
    schedules: list[dict[str, Any]] = []
    class_grid: Union[GridText, None] = None
    order_grid: Union[list[list[int]], None] = None
    resources: Resources = Resources()
    max_concurrent: Union[int, None] = Field(None, ge=1)
    max_failures: int = Field(1, ge=0)
    checkpoint_every: int = Field(50, ge=1, description="outer steps between checkpoints")
    log_every: int = Field(10, ge=1, description="outer steps between reported losses")
    storage: str = DEFAULT_STORAGE
    tracking_uri: Union[str, None] = None
    experiment: str = DEFAULT_EXPERIMENT
    data_root: Union[str, None] = None
    cache_dir: Union[str, None] = None
    # which of the paper's benchmarks the spec's parquet:/imagefolder: data sets are copies of
    family: Union[str, None] = None
    # grid: every trial; lowest-passing: bisection over IPC against the baseline
    # (orchestrator/search.py)
    search: Literal[SEARCHES] = "grid"
    search_axes: Union[Annotated[list[Literal[SEARCH_AXES]], Field(min_length=1)], None] = None
    criterion: Literal[CRITERIA] = "beats"
    parallel_probes: int = Field(1, ge=1, le=64)
    early_stop: Union[EarlyStop, None] = None

    @field_validator("preset")
    @classmethod
    def _preset(cls, value):
        if value not in (None, "paper", "cpu-small"):
            raise ValueError(f"must be paper or cpu-small, got {value!r}")
        return value

    @field_validator("storage")
    @classmethod
    def _storage(cls, value):
        # checkpoints are found and verified by reading the folder (tune.newest_checkpoint)
        if "://" in value:
            raise ValueError(f"must be a folder, got the URI {value!r}: on a cluster use a "
                             f"folder every node mounts (e.g. NFS)")
        return value

    @field_validator("settings")
    @classmethod
    def _settings(cls, value):
        _check_setting_names(value)
        return value

    @field_validator("schedules")
    @classmethod
    def _schedules(cls, value):
        for i, schedule in enumerate(value):
            if not schedule:
                raise ValueError(f"[{i}]: an empty schedule: give the settings it changes, "
                                 f"e.g. {{window: 10, total_inner_steps: 40}}")
            try:
                _check_setting_names(schedule)
            except ValueError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
        return value

    @model_validator(mode="after")
    def _search_settings(self):
        if self.search == "grid":
            for name, default in (("search_axes", None), ("early_stop", None),
                                  ("parallel_probes", 1)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} is a setting of a search: add `search: "
                                     f"lowest-passing`, or remove {name}")
            return self
        if len(set(_listify(self.seeds if self.seeds is not None else [0]))) < MIN_RUNS:
            raise ValueError(f"search: lowest-passing judges each IPC over at least {MIN_RUNS} "
                             f"seeds: give seeds: [0, 1, 2] (more seeds are added only where a "
                             f"decision is uncertain)")
        if self.search_axes is not None and "ipc" not in self.search_axes:
            raise ValueError(f"search_axes must include ipc (the axis searched), e.g. [ipc] or "
                             f"{list(SEARCH_AXES)}")
        return self

    def held_axes(self) -> dict[str, Any]:
        """The poster axes a search holds at their first value ({TrialConfig field: value}):
        those `search_axes` leaves out."""
        if self.search_axes is None:
            return {}
        held = {}
        for axis in SEARCH_AXES:
            values = getattr(self, axis)
            if axis not in self.search_axes and values is not None:
                held[AXES[axis]] = _listify(values)[0]
        return held

    @model_validator(mode="after")
    def _given_needs_grid(self):
        orders = set(_listify(self.class_order or []))
        for entry in self.include:
            orders |= set(_listify(entry.class_order or []))
        if "given" in orders and self.order_grid is None:
            raise ValueError("class_order 'given' needs order_grid: rows of class indices")
        return self


def _location(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in ("str", "float", "int", "bool"):
            continue  # pydantic names the union branch it tried; the user does not care
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _pydantic_message(error: ValidationError, source: str) -> str:
    # of the union branches pydantic tried (value or list), the one that got deepest says the
    # most; at equal depth, the branch of the input's own shape
    def relevance(e: dict) -> float:
        list_branch = any(isinstance(p, str) and p.startswith("list[") for p in e["loc"])
        return len(e["loc"]) + 0.5 * (list_branch == isinstance(e.get("input"), list))

    first = max(error.errors(), key=relevance)
    path = _location(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    entry = re.match(r"^(\[\d+\]): (.*)$", message, re.S)  # a validator naming a list entry
    if entry:
        path, message = path + entry.group(1), entry.group(2)
    if first["type"] == "extra_forbidden":
        allowed = sorted(SweepSpec.model_fields if len(first["loc"]) == 1 else
                         AxisValues.model_fields if first["loc"][0] == "include" else
                         Resources.model_fields)
        message = f"unknown key; valid keys here: {', '.join(allowed)}"
    elif first["type"] == "missing":
        message = "is required"
    elif "input" in first and first["type"] not in ("value_error",):
        message = f"{message} (got {first['input']!r})"
    return f"{source}: {path}: {message}"


def parse_spec(text: str, source: str = "<spec>",
               overrides: Sequence[Override] = ()) -> SweepSpec:
    """Validate a spec (with `overrides`, errors name the spec as given with them)."""
    raw = read_spec_mapping(text, source, overrides)
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_pydantic_message(exc, _with_overrides(source, overrides))) from None


def _with_overrides(source: str, overrides: Sequence[Override]) -> str:
    return f"{source} (with {describe(overrides)})" if overrides else source
