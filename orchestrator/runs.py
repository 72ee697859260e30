"""The finished trial runs of an MLflow store as one table, with what each run computed.

    gathered = gather_runs(tracking_uri, "podd-sweep")   # .runs: pyarrow, one row per run
    gathered.left_out                                    # RUNNING, NaN or incomplete runs

Every row carries the run's *settings*: each engine setting that changes a result (a field of
`TrialConfig`, less where files live and the seed), as the run recorded it. Runs are compared
by them, so a setting added to the engine later is compared too, with no list to keep. The
settings split into the poster *configuration* (method, IPC, patch grid, class order, labels and
their pooling, PoCO's encoder: `podd_engine.methods.CONFIGURATION_AXES`) and the *schedule*
(everything else: steps, horizon, network, real batch, evaluation, data). Imports neither torch
nor Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from orchestrator.store import (DATASET_TAG, ERROR_TAG, KEY_TAG, PROVENANCE,  # noqa: F401
                                PROVENANCE_HISTORY_TAG, STOPPED_EARLY_TAG, SWEEP_TAG, RunRecord,
                                run_records)
from podd_engine.config import LATE_SETTINGS, PLACEMENT, TrialConfig
from podd_engine.errors import UserError
from podd_engine.methods import CONFIGURATION_AXES, get_method

BYTES_PER_VALUE = 4  # posters and learned labels are stored as float32
# Result-changing settings, from the engine's own config: the seed is what repeats a run.
SETTINGS = tuple(f.name for f in dataclasses.fields(TrialConfig)
                 if f.name not in PLACEMENT and f.name != "seed")
# Which method and how many pixels: a configuration's identity, not part of its schedule.
IDENTITY = ("method", "ipc")

# Why a trial run is not in the table.
RUNNING, NAN_ACCURACY, INCOMPLETE = "running", "nan-accuracy", "incomplete"
STOPPED_EARLY = "stopped-early"  # a search stopped it below the baseline's curve
# a seed that failed: its configuration cannot pass on the seeds that survived (the mean of the
# survivors would be the mean of the lucky ones), as a search counts it failing
DIVERGED = "diverged"  # FAILED: its loss or poster went NaN/inf (the method failed that seed)
FAILED_SEED_REASONS = (STOPPED_EARLY, NAN_ACCURACY, DIVERGED)
# the table columns that name the configuration a failed seed fails (the report keys its rows
# by the same columns, so a failed seed meets its configuration's row)
FAILED_SEED_KEY = ("dataset", "method", "ipc", "settings")
LEFT_OUT_REASONS = (RUNNING, NAN_ACCURACY, INCOMPLETE, STOPPED_EARLY, DIVERGED)  # notes' order
REQUIRED_PARAMS = {"method", "ipc", "poster_pixels"}  # logged once a trial has its poster


class ReportError(UserError):
    """Nothing to report on (no store, no runs, unknown data set): a message, exit code 2."""


RUN_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("sweep", pa.string()), ("dataset", pa.string()),
    ("dataset_source", pa.string()), ("method", pa.string()), ("ipc", pa.float64()),
    ("achieved_ipc", pa.float64()), ("patch_grid", pa.string()), ("order", pa.string()),
    ("labels", pa.string()), ("seed", pa.int64()), ("test_accuracy", pa.float64()),
    ("test_accuracy_std", pa.float64()), ("eval_models", pa.int64()),
    ("poster_pixels", pa.int64()), ("label_parameters", pa.int64()),
    ("storage_bytes", pa.int64()), ("ipc_by_bytes", pa.float64()), ("trial_key", pa.string()),
    ("settings", pa.string()),   # JSON: every result-changing setting but the seed
    ("schedule", pa.string()),   # JSON: the settings that are not the configuration
    # where it came from (podd_engine/provenance.py) and the data it read (its content hash):
    # not settings, never split a schedule
    ("engine_revision", pa.string()), ("torch_version", pa.string()),
    ("device_used", pa.string()), ("data_hash", pa.string()),
])


def finite_or_none(value: float | None) -> float | None:
    """NaN and infinities are "unknown": null in tables, never NaN in JSON."""
    return value if value is not None and math.isfinite(value) else None


def canonical_value(text: str) -> str:
    """A recorded setting in one spelling: numbers as floats (`1`, `1.0` and `1e0` are one
    IPC), lists element by element, anything else as written."""
    try:
        value = json.loads(text)
    except ValueError:
        return text

    def number(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return [number(x) for x in v] if isinstance(v, list) else v
        return float(v)

    if isinstance(value, (int, float, list)) and not isinstance(value, bool):
        return json.dumps(number(value))
    return text


def run_settings(params: dict[str, str]) -> dict[str, str]:
    """The run's result-changing settings, as recorded (a setting the run did not record is
    absent: compared as unknown, so it never matches a recorded value)."""
    method = params.get("method", "")
    try:
        ignored = set(get_method(method).ignores)
    except ValueError:  # a method this version does not know: compare everything it recorded
        ignored = set()
    recorded = {**{k: v if isinstance(v, str) else json.dumps(v)
                   for k, v in LATE_SETTINGS.items()}, **params}  # a run older than a setting
    return {name: canonical_value(recorded[name]) for name in SETTINGS
            if name in recorded and name not in ignored}


def schedule_of(settings: dict[str, str]) -> dict[str, str]:
    """The part of a run's settings that is not its poster configuration."""
    return {k: v for k, v in settings.items() if k not in CONFIGURATION_AXES and k not in IDENTITY}


def as_json(settings: dict[str, str]) -> str:
    return json.dumps(settings, sort_keys=True)


def _run_dataset(run: RunRecord) -> tuple[str, str]:
    """(family, data set string as the sweep named it) of a run. A RUNNING run may not have
    logged its family yet: its data set string (param, else tag) stands in."""
    source = run.params.get("dataset") or run.tags.get(DATASET_TAG, "")
    return run.params.get("dataset_family") or source, source


def _run_row(run: RunRecord) -> dict:
    """One finished trial run, with test accuracy and poster facts, as a table row."""
    params, metrics = run.params, run.metrics
    family, source = _run_dataset(run)
    method = params["method"]
    try:
        spec = get_method(method)
        uses_grid, uses_order = spec.uses_patch_grid, spec.uses_order
    except ValueError:
        uses_grid = uses_order = True
    channels = int(params.get("channels", 3))
    classes = int(params.get("num_classes", 0))
    height, width = (int(v) for v in params.get("image_size", "0x0").split("x"))
    labels = int(params.get("label_parameters", 0))
    pixels = int(params["poster_pixels"])
    storage = (channels * pixels + labels) * BYTES_PER_VALUE
    one_ipc = classes * channels * height * width * BYTES_PER_VALUE
    settings = run_settings(params)
    return {
        "run_id": run.run_id, "sweep": run.tags.get(SWEEP_TAG, ""),
        "dataset": family, "dataset_source": source, "method": method,
        "ipc": float(params["ipc"]),
        "achieved_ipc": float(params.get("achieved_ipc", params["ipc"])),
        "patch_grid": params.get("patch_grid", "") if uses_grid else "",
        "order": params.get("order", "") if uses_order else "",
        "labels": params.get("labels", ""),
        "seed": int(params.get("seed", 0)), "test_accuracy": metrics["test_accuracy"],
        "test_accuracy_std": finite_or_none(metrics.get("test_accuracy_std", 0.0)),
        "eval_models": int(params.get("eval_models", 0)), "poster_pixels": pixels,
        "label_parameters": labels, "storage_bytes": storage,
        "ipc_by_bytes": storage / one_ipc if one_ipc else None,
        "trial_key": run.tags.get(KEY_TAG, ""),
        "settings": as_json(settings), "schedule": as_json(schedule_of(settings)),
        **provenance_of(run),
    }


def provenance_of(run: RunRecord) -> dict[str, str | None]:
    """Where the run came from: its params, or, for a run whose resumed attempts ran other
    code, torch, device or data, every value in order ('A then B')."""
    try:
        history = json.loads(run.tags.get(PROVENANCE_HISTORY_TAG) or "{}")
    except ValueError:
        history = {}
    return {key: (" then ".join(v or UNRECORDED for v in history[key])
                  if isinstance(history.get(key), list) else run.params.get(key))
            for key in PROVENANCE}


def _failed_seed(run: RunRecord, reason: str) -> LeftOut:
    """A left-out run whose seed failed, with what the report groups seeds by (a table row's
    dataset, method, ipc and settings; None when its params do not say) and its sweep and
    seed."""
    try:
        row = {"dataset": _run_dataset(run)[0], "method": run.params["method"],
               "ipc": float(run.params["ipc"]), "settings": as_json(run_settings(run.params))}
        configuration = tuple(row[c] for c in FAILED_SEED_KEY)
        seed = int(run.params.get("seed", 0))
    except (KeyError, ValueError):
        configuration, seed = None, None
    return LeftOut(run.run_id, *_run_dataset(run), reason, configuration,
                   run.tags.get(SWEEP_TAG, ""), seed)


def _left_out_reason(run: RunRecord) -> str | None:
    """Why a trial run cannot be in the table, or None when it can."""
    if run.status == "RUNNING":
        return RUNNING
    if "test_accuracy" not in run.metrics or not REQUIRED_PARAMS <= run.params.keys():
        return INCOMPLETE
    if not math.isfinite(run.metrics["test_accuracy"]):
        return NAN_ACCURACY  # a mean over NaN would poison its whole configuration
    return None


@dataclass(frozen=True)
class LeftOut:
    """A trial run that is not in the table, and why (RUNNING, NAN_ACCURACY, INCOMPLETE)."""

    run_id: str
    dataset: str
    dataset_source: str
    reason: str
    configuration: tuple | None = None  # a failed seed's FAILED_SEED_KEY values
    sweep: str = ""  # what --where can select a failed seed by, as a table row's
    seed: int | None = None


@dataclass
class Gathered:
    """The store's usable finished trial runs (RUN_SCHEMA) and the trial runs left out."""

    runs: pa.Table
    left_out: list[LeftOut] = field(default_factory=list)

    def left_out_ids(self, reason: str, dataset: str | None = None) -> list[str]:
        """Run ids left out for `reason`, of data set `dataset` (as `select_dataset` matches
        it) or of all."""
        return [r.run_id for r in self.left_out if r.reason == reason
                and (dataset is None or dataset in (r.dataset, r.dataset_source))]

    def failed_seeds(self, dataset: str,
                     where: dict[str, str] | None = None) -> dict[tuple, list[str]]:
        """{FAILED_SEED_KEY values: run ids} of the seeds of data set `dataset` that failed
        (FAILED_SEED_REASONS) and that `where` selects, by their configuration."""
        out: dict[tuple, list[str]] = {}
        settings = FAILED_SEED_KEY.index("settings")
        for r in self.left_out:
            if (r.reason in FAILED_SEED_REASONS and r.configuration is not None
                    and dataset in (r.dataset, r.dataset_source)
                    and matches_where(json.loads(r.configuration[settings]),
                                      {"sweep": r.sweep, "seed": r.seed}, where or {})):
                out.setdefault(r.configuration, []).append(r.run_id)
        return out

    @property
    def running(self) -> int:
        return len(self.left_out_ids(RUNNING))

    @property
    def unusable(self) -> int:
        """Finished runs without the facts a report needs (test accuracy, poster size)."""
        return len(self.left_out_ids(INCOMPLETE))

    @property
    def nan_accuracy(self) -> list[str]:
        return self.left_out_ids(NAN_ACCURACY)


def gather_runs(tracking_uri: str | None, experiment: str,
                sweeps: Sequence[str] = ()) -> Gathered:
    """The finished trial runs of the store (or of the named sweeps, together) as a table
    (RUN_SCHEMA); the others (RUNNING, NaN accuracy, missing facts) are listed in `left_out`.
    FAILED and KILLED runs are neither. A named sweep with no runs is an error: a misspelt
    name must not shrink the comparison silently."""
    if isinstance(sweeps, str):  # one name is not a sequence of one-letter names
        raise TypeError("sweeps is a sequence of sweep names")
    if not sweeps:
        return gathered_from(run_records(tracking_uri, experiment))
    runs = []
    for sweep in dict.fromkeys(sweeps):  # each once, in order
        mine = run_records(tracking_uri, experiment, sweep=sweep)
        if not mine:
            raise ReportError(f"no trial runs of sweep {sweep!r} in experiment {experiment!r}: "
                              f"check the name with `podd-sweep status`")
        runs += mine
    return gathered_from(runs)


def gathered_from(runs: list[RunRecord]) -> Gathered:
    """The table of `runs` (in any order: rows are sorted by run id)."""
    rows, left_out = [], []
    for run in runs:
        if STOPPED_EARLY_TAG in run.tags:  # not a finished run of its schedule
            left_out.append(_failed_seed(run, STOPPED_EARLY))
            continue
        if run.status == "FAILED" and run.tags.get(ERROR_TAG, "").startswith(DIVERGED):
            left_out.append(_failed_seed(run, DIVERGED))
            continue
        if run.status not in ("RUNNING", "FINISHED"):
            continue  # crashed or killed: the machinery failed it, not the method
        reason = _left_out_reason(run)
        if reason is None:
            rows.append(_run_row(run))
        else:
            left_out.append(_failed_seed(run, reason) if reason == NAN_ACCURACY else
                            LeftOut(run.run_id, *_run_dataset(run), reason))
    rows.sort(key=lambda r: r["run_id"])  # the same table whichever way the store was read
    left_out.sort(key=lambda r: r.run_id)
    return Gathered(pa.Table.from_pylist(rows, schema=RUN_SCHEMA), left_out)


# How settings are shown (the report's tables and headings)
UNRECORDED = "(unrecorded)"


def display_value(text: str) -> str:
    """A canonical setting value as people write it (300, not 300.0)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text

    def plain(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return [plain(x) for x in v] if isinstance(v, list) else v

    value = plain(value)
    return value if isinstance(value, str) else json.dumps(value)


def differing_settings(settings: list[dict[str, str]]) -> dict[str, list[str]]:
    """{setting: its distinct values} for the settings that are not the same in all of
    `settings` (a setting some did not record counts as UNRECORDED)."""
    keys = sorted(set().union(*settings)) if settings else []
    out = {}
    for key in keys:
        values = sorted({display_value(s[key]) if key in s else UNRECORDED for s in settings},
                        key=numbers_first)
        if len(values) > 1:
            out[key] = values
    return out


def mixed_provenance(runs: list[dict], run_ids: set[str]) -> dict[str, list[str]]:
    """{engine_revision | torch_version | device_used | data_hash: its values} where the runs
    `run_ids` (of `runs`: rows with run_id and PROVENANCE) did not all come from the same code,
    torch build or device, or read the same data (a run older than the record: UNRECORDED)."""
    return differing_settings([{k: r[k] for k in PROVENANCE if r[k]} for r in runs
                               if r["run_id"] in run_ids])


def numbers_first(value: str) -> tuple:
    """Sort key: numbers by value (5 before 10), then text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def describe_differences(differing: dict[str, list[str]]) -> str:
    """'steps: 120 | 300; width: 32 | 64'."""
    return "; ".join(f"{k}: {' | '.join(v)}" for k, v in differing.items())


def describe_left_out(ids: list[str], reason: str, shown: int = 5) -> str:
    """One note line for the runs left out for `reason` (their full ids, the first few)."""
    what = {RUNNING: "trial run(s) still RUNNING are left out; report again when they finish",
            NAN_ACCURACY: "finished run(s) with test accuracy NaN are left out (their "
                          "configuration counts as failing)",
            INCOMPLETE: "finished run(s) lack test accuracy or poster facts and are left out",
            STOPPED_EARLY: "run(s) a search stopped early, below the baseline's curve, are not "
                           "finished runs of their schedule and are left out (their "
                           "configuration counts as failing, as in the search)",
            DIVERGED: "run(s) diverged (NaN or infinite loss or poster) and are left out "
                      "(their configuration counts as failing)"}
    return f"{len(ids)} {what[reason]}: {_first_ids(ids, shown)}"


def describe_repeated_seeds(ids: list[str], shown: int = 5) -> str:
    """The note line for runs that repeat a seed of their configuration."""
    return (f"{len(ids)} run(s) repeat a seed of their configuration (same settings, same "
            f"seed): each seed counts once, its runs averaged: {_first_ids(ids, shown)}")


def _first_ids(ids: list[str], shown: int) -> str:
    """The first `shown` run ids in full, and how many more there are."""
    more = f" (+{len(ids) - shown} more)" if len(ids) > shown else ""
    return " ".join(ids[:shown]) + more


def nothing_to_report(gathered: Gathered, experiment: str) -> ReportError:
    """The error when the store has no usable finished runs at all: say what it has instead."""
    if gathered.running:
        return ReportError(f"no finished trial runs in experiment {experiment!r} yet: "
                           f"{gathered.running} still RUNNING; report again when they finish")
    if gathered.left_out:
        counts = Counter(r.reason for r in gathered.left_out)
        return ReportError(f"no usable trial runs in experiment {experiment!r}: "
                           + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
                           + " (left out)")
    return ReportError(f"no finished trial runs in experiment {experiment!r} yet: launch a "
                       f"sweep first")


def parse_where(conditions: list[str]) -> dict[str, str]:
    """`--where KEY=VALUE` (repeatable) as {KEY: canonical VALUE}; KEY is an engine setting
    (the data set string among them) or one of the run columns `sweep` and `seed`."""
    known = set(SETTINGS) | set(_RUN_COLUMNS)
    where: dict[str, str] = {}
    for condition in conditions:
        key, sep, value = condition.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ReportError(f"--where must be KEY=VALUE (e.g. --where steps=300), got "
                              f"{condition!r}")
        if key not in known:
            raise ReportError(f"--where: unknown setting {key!r}: use an engine setting (e.g. "
                              f"steps, width, window, dataset) or sweep or seed")
        where[key] = canonical_value(value.strip())
    return where


_RUN_COLUMNS = ("sweep", "seed")


def select_where(runs: pa.Table, where: dict[str, str]) -> pa.Table:
    """The runs whose recorded value of every KEY equals VALUE (`parse_where`)."""
    if not where:
        return runs
    keep = [i for i, row in enumerate(runs.select(["settings", *_RUN_COLUMNS]).to_pylist())
            if matches_where(json.loads(row["settings"]), row, where)]
    return runs.take(pa.array(keep, type=pa.int64()))


def matches_where(settings: dict[str, str], run: dict, where: dict[str, str]) -> bool:
    """Whether a run with `settings` and `run`'s sweep and seed has every KEY=VALUE."""
    return all((canonical_value(str(run[key])) if key in _RUN_COLUMNS else settings.get(key))
               == value for key, value in where.items())
