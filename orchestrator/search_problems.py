"""The searches of a `search: lowest-passing` sweep: its trials grouped into one search per
data set, schedule and poster method, each with the baseline trials of its schedule
(orchestrator/search.py plans each). Torch-free and Ray-free.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from orchestrator.search import Candidate, SearchProblem
from orchestrator.spec_file import short_dataset_name
from podd_engine.methods import BASELINE, CONFIGURATION_AXES, POSTER, get_method


class SearchSpecError(ValueError):
    """A sweep that cannot be searched; `field` names the spec field at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _schedule(config) -> dict[str, Any]:
    """What a trial shares with the trials it is compared with: every result-changing setting
    but the poster configuration, the method, the IPC and the seed (as `report` groups)."""
    return {k: v for k, v in config.science().items()
            if k not in CONFIGURATION_AXES and k not in ("method", "ipc", "seed")}


def _key(schedule: dict[str, Any]) -> str:
    return json.dumps(schedule, sort_keys=True, default=str)


def search_problems(trials: Iterable, seeds: Iterable[int],
                    held: Mapping[str, Any] | None = None) -> list[SearchProblem]:
    """One search per data set, schedule and poster method of a sweep's trials (each with the
    baseline trials of its schedule); `held`: configuration settings held at one value
    (`search_axes` without them), {setting: value}. SearchSpecError when the trials cannot be
    searched (no baseline at a schedule, a control among them)."""
    held = dict(held or {})
    seeds = tuple(dict.fromkeys(seeds))
    groups: dict[str, dict[str, list]] = {}
    for trial in trials:
        c = trial.config
        method = get_method(c.method)
        group = groups.setdefault(_key(_schedule(c)), {"baseline": [], "posters": []})
        if method.role == BASELINE:
            if c.ipc == 1.0:
                group["baseline"].append(trial)
        elif method.role == POSTER:
            if all(getattr(c, name) == value for name, value in held.items()):
                group["posters"].append(trial)
        else:
            raise SearchSpecError(
                f"search: lowest-passing searches posters against the baseline; "
                f"{c.method} is a {method.role}: run it in a grid sweep (search: grid)",
                "method")
    varying = _varying_configuration_axes(t.config for g in groups.values()
                                          for t in g["posters"])
    schedules = [json.loads(key) for key in groups]
    differing = sorted(k for k in set().union(*schedules)
                       if len({json.dumps(s.get(k), default=str) for s in schedules}) > 1
                       and k != "dataset")
    problems = []
    for schedule, group in groups.items():
        if not group["posters"]:
            continue
        if not group["baseline"]:
            raise SearchSpecError(
                "search: lowest-passing needs the baseline at every schedule it searches: add "
                "`include: [{method: rat-bptt, ipc: 1}]`", "include")
        baseline = tuple(Candidate(t.key, BASELINE, 1.0, "", t.config.seed)
                         for t in group["baseline"])
        for method in sorted({t.config.method for t in group["posters"]}):
            posters = tuple(Candidate(t.key, POSTER, t.config.ipc,
                                      _configuration_label(t.config, varying), t.config.seed)
                            for t in group["posters"] if t.config.method == method)
            label = ", ".join([short_dataset_name(group["posters"][0].config.dataset), method]
                              + [f"{k} {json.loads(schedule).get(k)}" for k in differing])
            problems.append(SearchProblem(baseline, posters, seeds, label,
                                          group["posters"][0].config.dataset))
    if not problems:
        raise SearchSpecError("search: lowest-passing needs poster trials (method: podd) to "
                              "search", "method")
    return problems


def _varying_configuration_axes(configs: Iterable) -> list[str]:
    values: dict[str, set] = {}
    for c in configs:
        for name in CONFIGURATION_AXES:
            values.setdefault(name, set()).add(json.dumps(getattr(c, name), default=str))
    return [name for name in CONFIGURATION_AXES if len(values.get(name, ())) > 1]


def _configuration_label(config, varying: list[str]) -> str:
    parts = [f"{config.patch_grid} patches", f"{config.order} order", f"{config.labels} labels"]
    shown = ("patch_grid", "order", "labels")
    return ", ".join(parts + [f"{k} {getattr(config, k)}" for k in varying if k not in shown])
