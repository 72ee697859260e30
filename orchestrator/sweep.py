"""A sweep: its spec (orchestrator/spec.py) expanded into trials, checked up front.

    sweep = load_sweep("sweeps/smoke.yaml", dataset_info=create_dataset)
    sweep.trials        # PlannedTrial each: a canonical TrialConfig, its key and name
    sweep.fingerprint() # what a resumed sweep must still be

Two combinations that run the same computation (a rat-bptt baseline crossed with patch grids
it ignores) collapse into one trial. Every problem is one line naming the spec's field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.overrides import Override, parse_override, parse_overrides
from orchestrator.search_problems import SearchSpecError, search_problems
from orchestrator.spec import AXES, SweepSpec, _listify, _with_overrides, parse_spec
from orchestrator.spec_file import SpecError, read_spec_mapping, read_spec_text, short_dataset_name
from orchestrator.store import DEFAULT_TRACKING_URI, absolute_tracking_uri
from podd_engine.config import TrialConfig, make_config
from podd_engine.errors import UserError
from podd_engine.methods import get_method

if TYPE_CHECKING:
    from podd_engine.data import ImageDataset


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of a sweep: its engine config and where its axis values came from."""

    config: TrialConfig
    origin: dict[str, str]  # axis -> field path in the spec (for error messages)
    achieved_ipc: float = 0.0
    poster_size: tuple[int, int] = (0, 0)
    images: int = 0  # training images (patches) the poster yields; 0: not checked on data
    image_pixels: int = 0  # height x width of one image; 0: not checked on data

    @property
    def key(self) -> str:
        return self.config.key()

    @property
    def name(self) -> str:
        """A short readable trial name: method, data set, IPC, the podd axes, seed, key."""
        c, method = self.config, get_method(self.config.method)
        parts = [c.method, short_dataset_name(c.dataset), f"ipc{c.ipc:g}"]
        parts += [c.patch_grid] if method.uses_patch_grid else []
        parts += [c.order] if method.uses_order else []
        return "-".join(parts + [c.labels_name, f"s{c.seed}", c.key()[:6]])


@dataclass
class Sweep:
    spec: SweepSpec
    source: str  # the file it came from
    trials: list[PlannedTrial]
    overrides: tuple[str, ...] = ()  # the command line's key=value, as given
    resolved: dict[str, Any] | None = None  # the file's mapping with the overrides applied

    def resolved_text(self) -> str:
        """The spec that runs, as YAML (the file's own text when nothing was overridden)."""
        if not self.overrides or self.resolved is None:
            return Path(self.source).read_text()
        return (f"# {self.source} with {' '.join(self.overrides)}\n"
                + yaml.safe_dump(self.resolved, sort_keys=False))

    @property
    def name(self) -> str:
        return self.spec.name

    def fingerprint(self) -> str:
        """Identifies the set of trials (and, for a search, how it chooses among them): a
        resumed sweep must have the same one."""
        keys: list = sorted(t.key for t in self.trials)
        if self.spec.search != "grid":
            keys.append(self.search_settings())
        return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:12]

    def search_settings(self) -> dict[str, Any]:
        s = self.spec
        return {"search": s.search, "held": s.held_axes(), "criterion": s.criterion,
                "parallel_probes": s.parallel_probes, "seeds": self.seeds(),
                "early_stop": s.early_stop.margin_points if s.early_stop else None}

    def seeds(self) -> list[int]:
        return list(dict.fromkeys(_listify(self.spec.seeds if self.spec.seeds is not None
                                           else [0])))

    def search_problems(self) -> list:
        """The searches of a `search: lowest-passing` sweep (orchestrator/search.py)."""
        return search_problems(self.trials, self.seeds(), self.spec.held_axes())

    def storage_path(self) -> Path:
        return Path(self.spec.storage).expanduser().resolve()

    def tracking_uri(self, override: str | None = None) -> str:
        return absolute_tracking_uri(override or os.environ.get("MLFLOW_TRACKING_URI")
                                     or self.spec.tracking_uri or DEFAULT_TRACKING_URI)


def _combinations(spec: SweepSpec) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Every grid point of the top level and of each `include` entry, with field paths."""
    top = spec.given()
    out = []
    blocks = [(top, {axis: axis for axis in top})]
    for i, entry in enumerate(spec.include):
        given = entry.given()
        blocks.append(({**top, **given},
                       {axis: (f"include[{i}].{axis}" if axis in given else axis)
                        for axis in {**top, **given}}))
    for axes, paths in blocks:
        names = list(axes)
        for values in itertools.product(*(axes[n] for n in names)):
            chosen = dict(zip(names, values))
            origin = {}
            for n, v in chosen.items():
                index = axes[n].index(v)
                origin[n] = f"{paths[n]}[{index}]" if len(axes[n]) > 1 else paths[n]
            out.append((chosen, origin))
    return out


def _spec_path(error: Exception, origin: dict[str, str], chosen: dict[str, Any],
               schedule: dict[str, Any], index: int | None, settings: dict[str, Any]) -> str:
    """The spec path of the field an engine error names (`error.field`): a schedule's or the
    settings' entry, the grid axis it came from, or a top-level key."""
    name = getattr(error, "field", None)
    if name in schedule:
        return f"schedules[{index}].{name}"
    if name in settings:
        return f"settings.{name}"
    axis = next((a for a, f in AXES.items() if f == name), None)
    if axis in origin:
        return origin[axis]
    if name in ("class_grid", "order_grid", "preset", "family", "data_root", "cache_dir"):
        return name
    return "trial " + ", ".join(f"{k}={v}" for k, v in chosen.items())


def expand(spec: SweepSpec, *, source: str = "<spec>",
           dataset_info: Callable[[str], "ImageDataset"] | None = None) -> list[PlannedTrial]:
    """The spec's trials, deduplicated, each validated (and, with `dataset_info`, checked
    against its data set's classes and image size: IPC too small, class grid mismatch)."""
    from podd_engine.pipeline import build_geometry

    trials: dict[str, PlannedTrial] = {}
    schedules = list(enumerate(spec.schedules)) or [(None, {})]
    for (index, schedule), (chosen, origin) in itertools.product(schedules,
                                                                _combinations(spec)):
        settings = {AXES[axis]: value for axis, value in chosen.items()}
        settings.setdefault("method", "podd")
        settings.setdefault("seed", 0)
        settings.update(spec.settings)
        settings.update(schedule)
        settings.update(class_grid=spec.class_grid, order_grid=spec.order_grid,
                        data_root=spec.data_root, cache_dir=spec.cache_dir, family=spec.family)
        if spec.resources.gpu == 0 and "device" not in spec.settings:
            settings["device"] = "cpu"
        info = dataset_info(settings["dataset"]) if dataset_info else None
        if info is not None and spec.family:
            from podd_engine.data import DatasetError, with_declared_family

            try:
                info = with_declared_family(info, spec.family)
            except DatasetError as exc:
                raise SpecError(f"{source}: family: {exc}") from None
        try:
            config = make_config(spec.preset, data_family=info.family if info else None, **settings)
            config = config.canonical()
            geometry = build_geometry(config, info) if info is not None else None
        except ValueError as exc:
            where = _spec_path(exc, origin, chosen, schedule, index, spec.settings)
            raise SpecError(f"{source}: {where}: {exc}") from None
        trial = PlannedTrial(config, origin,
                             round(geometry.achieved_ipc, 4) if geometry else 0.0,
                             tuple(geometry.poster_size) if geometry else (0, 0),
                             geometry.patch_grid[0] * geometry.patch_grid[1] if geometry else 0,
                             geometry.image_size[0] * geometry.image_size[1] if geometry else 0)
        trials.setdefault(trial.key, trial)
    return list(trials.values())


def load_sweep(path: str | os.PathLike, *,
               dataset_info: Callable[[str], "ImageDataset"] | None = None,
               overrides: Sequence[str | Override] = ()) -> Sweep:
    """Read, validate and expand a sweep file, with command-line `overrides` (`key=value`;
    orchestrator/overrides.py) applied first (SpecError on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no sweep spec at {path}: give the path of a YAML file such as "
                        f"sweeps/smoke.yaml")
    try:
        parsed = [o if isinstance(o, Override) else parse_override(o) for o in overrides]
        parsed = parse_overrides([o.text for o in parsed]) if parsed else []
    except UserError as exc:
        raise SpecError(str(exc), field=exc.field) from None
    text = read_spec_text(path)
    resolved = read_spec_mapping(text, str(path), parsed)
    spec = parse_spec(text, str(path), parsed)
    source = _with_overrides(str(path), parsed)
    sweep = Sweep(spec, str(path), expand(spec, source=source, dataset_info=dataset_info),
                  overrides=tuple(o.text for o in parsed), resolved=resolved)
    if spec.search != "grid":
        check_search(sweep, source)
    return sweep


def check_search(sweep: Sweep, source: str) -> None:
    """A search needs a baseline at every schedule it searches, posters and no controls; early
    stopping needs evaluations during distillation."""
    try:
        sweep.search_problems()
    except SearchSpecError as exc:
        raise SpecError(f"{source}: {exc.field}: {exc}") from None
    if sweep.spec.early_stop is not None:
        for trial in sweep.trials:
            c = trial.config
            if not 0 < c.eval_every < c.steps:
                raise SpecError(f"{source}: early_stop: stopping early needs test accuracy "
                                f"during distillation: set settings.eval_every to a number of "
                                f"outer steps below steps ({c.steps}), e.g. "
                                f"{max(1, c.steps // 4)}")
