"""The answer sweeps are run for: per data set, the lowest IPC whose PoDD posters beat the
1-IPC RaT-BPTT baseline *run at the same schedule*, with how sure that is and the evidence
(every figure traceable to MLflow run ids or to the paper's table).

    gathered = gather_runs(tracking_uri, "podd-sweep")   # orchestrator.runs: one row per run
    for dataset in datasets_in(gathered.runs):
        report = build_report(gathered, dataset)          # one verdict per schedule
        for schedule in report.schedules:
            print(schedule.label, schedule.verdict.state, schedule.verdict.message)
    sys.exit(exit_code(report.states()))                  # 0 every verdict passes, else 1

Like with like: a *configuration* is the runs whose settings are all equal but the seed; a
*schedule* is the runs whose settings are equal apart from the configuration (method, IPC, patch
grid, class order, labels and their pooling, PoCO's encoder). A PoDD configuration is judged
only against baseline runs of its own schedule (or, when asked, the paper's figure), and runs of
different schedules are never averaged together.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.runs import (DIVERGED, FAILED_SEED_KEY, INCOMPLETE,  # noqa: F401
                               LEFT_OUT_REASONS, NAN_ACCURACY, PROVENANCE, RUNNING,
                               STOPPED_EARLY, UNRECORDED, Gathered, ReportError,
                               differing_settings, display_value, finite_or_none,
                               mixed_provenance, numbers_first, select_where)
from orchestrator.verdict import (CRITERIA, EXIT_CODES, MIN_RUNS, NO_BASELINE, NONE_PASSES,  # noqa: F401
                                  PASS, TIE, TOO_FEW_RUNS, Baseline, IpcResult, Verdict,
                                  best_row, decide, exit_code, interval_to,
                                  no_baseline_verdict, row_passes)
from podd_engine.benchmarks import BENCHMARKS
from podd_engine.methods import BASELINE, CONFIGURATION_AXES, CONTROL, POSTER, get_method

# RaT-BPTT at 1 IPC as reported in the PoDD paper (Table 2), test accuracy in %, mean +- std.
PAPER_BASELINES = {name: b.rat_bptt_1ipc for name, b in BENCHMARKS.items()}
PAPER_SOURCE = "the PoDD paper's Table 2 (RaT-BPTT, 1 IPC)"
BUDGETS = ("pixels", "bytes")
GROUP_BY = ["dataset", "method", "ipc", "patch_grid", "order", "labels", "settings", "schedule"]


def datasets_in(runs: pa.Table) -> list[str]:
    return sorted(set(runs.column("dataset").to_pylist()))


def select_dataset(runs: pa.Table, name: str) -> pa.Table:
    """Runs of data set `name`: of that family (a benchmark such as cifar10 covers every copy
    of it), or of the exact data set string a sweep used."""
    mask = pc.or_(pc.equal(runs.column("dataset"), name),
                  pc.equal(runs.column("dataset_source"), name))
    return runs.filter(mask)


def aggregate(runs: pa.Table) -> pa.Table:
    """One row per configuration (all settings but the seed), over its seeds. A seed run more
    than once (the same sweep launched under two names, say) counts once, its runs averaged:
    repeats of one seed are not independent draws, and counting each would narrow the interval
    and let two runs of one seed pass for two seeds. `runs` counts seeds; `run_ids` lists every
    run."""
    # one thread keeps each group's run ids and seeds in the table's (run id) order
    per_seed = runs.group_by(GROUP_BY + ["seed"], use_threads=False).aggregate([
        ("test_accuracy", "mean"), ("achieved_ipc", "mean"), ("ipc_by_bytes", "mean"),
        ("poster_pixels", "max"), ("label_parameters", "max"), ("storage_bytes", "max")])
    per_seed = per_seed.rename_columns([n.rsplit("_", 1)[0] if n.endswith(("_mean", "_max"))
                                        else n for n in per_seed.column_names])
    grouped = per_seed.group_by(GROUP_BY, use_threads=False).aggregate([
        ("test_accuracy", "mean"), ("test_accuracy", "stddev", pc.VarianceOptions(ddof=1)),
        ("test_accuracy", "count"), ("achieved_ipc", "mean"), ("ipc_by_bytes", "mean"),
        ("poster_pixels", "max"), ("label_parameters", "max"), ("storage_bytes", "max"),
        ("seed", "list")])
    names = {"test_accuracy_mean": "accuracy", "test_accuracy_stddev": "accuracy_std",
             "test_accuracy_count": "runs", "achieved_ipc_mean": "achieved_ipc",
             "ipc_by_bytes_mean": "ipc_by_bytes", "poster_pixels_max": "poster_pixels",
             "label_parameters_max": "label_parameters", "storage_bytes_max": "storage_bytes",
             "seed_list": "seeds"}
    grouped = grouped.rename_columns([names.get(n, n) for n in grouped.column_names])
    ids_of: dict[tuple, list[str]] = {}  # configuration -> its run ids, in the table's order
    for run_id, key in zip(runs.column("run_id").to_pylist(), _keys(runs, GROUP_BY)):
        ids_of.setdefault(key, []).append(run_id)
    grouped = grouped.add_column(grouped.column_names.index("seeds"), "run_ids", pa.array(
        [ids_of[key] for key in _keys(grouped, GROUP_BY)], pa.list_(pa.string())))
    # one run has no spread over seeds: std 0 would look like certainty, so it stays null
    return grouped.sort_by([("dataset", "ascending"), ("schedule", "ascending"),
                            ("method", "ascending"), ("ipc", "ascending"),
                            ("accuracy", "descending"), ("settings", "ascending")])


def with_failed_seeds(table: pa.Table, failed: dict[tuple, list[str]]) -> pa.Table:
    """`table` (aggregated) with each configuration's failed seeds (`failed_run_ids`: runs a
    search stopped early, that diverged or whose accuracy is NaN): such a configuration cannot
    pass on the seeds that survived."""
    keys = _keys(table, list(FAILED_SEED_KEY))
    return table.append_column("failed_run_ids", pa.array([failed.get(k, []) for k in keys],
                                                          pa.list_(pa.string())))


def _keys(table: pa.Table, columns: list[str]) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in columns)))


def repeated_seed_runs(runs: pa.Table) -> list[str]:
    """Run ids of runs that share their configuration and seed with another run."""
    keys = _keys(runs, GROUP_BY + ["seed"])
    counts = Counter(keys)
    return [run_id for run_id, key in zip(runs.column("run_id").to_pylist(), keys)
            if counts[key] > 1]


def role_of(method: str) -> str | None:
    try:
        return get_method(method).role
    except ValueError:
        return None  # a method this version does not know is shown, never judged


# --------------------------------------------------------------------------------------------
# Baselines and controls
# --------------------------------------------------------------------------------------------

def parse_baseline(how: str) -> str | float:
    """measured (the store's runs at each schedule; `auto` is the same), paper, or a number
    in % (returned as a fraction)."""
    if how in ("measured", "auto"):
        return "measured"
    if how == "paper":
        return how
    try:
        value = float(how)
    except ValueError:
        raise ReportError(f"--baseline must be measured, paper or a number (an accuracy in %), "
                          f"got {how!r}") from None
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise ReportError(f"--baseline must be an accuracy in % between 0 and 100, got {how!r}")
    return value / 100


def paper_baseline(family: str) -> Baseline:
    if family not in PAPER_BASELINES:
        raise ReportError(f"the paper has no RaT-BPTT baseline for {family!r} (only "
                          f"{', '.join(PAPER_BASELINES)}): it is not one of the paper's "
                          f"benchmarks, so judge it against a measured baseline or --baseline "
                          f"VALUE")
    mean, std = PAPER_BASELINES[family]
    return Baseline(mean / 100, std / 100, PAPER_SOURCE, exact=True)


def measured_baseline(rows: list[dict]) -> Baseline | None:
    """The best baseline 1-IPC configuration among `rows` (a schedule's), if any."""
    candidates = [r for r in rows if role_of(r["method"]) == BASELINE and r["ipc"] == 1.0]
    if not candidates:
        return None
    best = best_row(candidates)
    runs = best["runs"]
    what = (f"measured: {runs} {best['method']} 1-IPC run{'s' if runs > 1 else ''} at this "
            f"schedule ({best['labels']} labels)")
    if runs < MIN_RUNS:
        what += "; too few seeds to tell its std, so comparable = beats"
    return Baseline(best["accuracy"], best["accuracy_std"] if runs >= MIN_RUNS else None,
                    what, runs, list(best["run_ids"]))


def control_for(podd: dict, controls: list[dict]) -> dict | None:
    """The undistilled control with the same storage as a PoDD configuration: the same IPC
    and the same cut (every configuration setting the control does not ignore: patches, order
    and its encoder, labels, their pooling); the best one when several. None when no control
    was cut as this configuration was: one of another cut would fold the difference between
    the cuts into the gain that distillation is credited with."""
    mine = json.loads(podd["settings"])

    def same_cut(control: dict) -> bool:
        theirs = json.loads(control["settings"])
        ignored = set(get_method(control["method"]).ignores)
        return all(theirs.get(k) == mine.get(k) for k in CONFIGURATION_AXES if k not in ignored)

    chosen = [c for c in controls if c["ipc"] == podd["ipc"] and same_cut(c)]
    return best_row(chosen) if chosen else None


def _matches_schedule(control: dict, schedule: dict[str, str]) -> bool:
    """A control belongs to a schedule when every setting it does not ignore is the same."""
    ignored = set(get_method(control["method"]).ignores)
    mine = json.loads(control["schedule"])
    return mine == {k: v for k, v in schedule.items() if k not in ignored}


# --------------------------------------------------------------------------------------------
# The verdict of one schedule
# --------------------------------------------------------------------------------------------

def configuration_label(row: dict, extra_axes: tuple[str, ...] = ()) -> str:
    """'16x6 patches, poco order, fixed labels' (+ any other configuration setting that differs
    between the data set's configurations, e.g. 'embedder minilm')."""
    settings = json.loads(row["settings"])
    parts = []
    if row["patch_grid"]:
        parts.append(f"{row['patch_grid']} patches")
    if row["order"]:
        parts.append(f"{row['order']} order")
    parts.append(f"{row['labels']} labels")
    parts += [f"{k} {display_value(settings[k])}" for k in extra_axes if k in settings]
    if failed := row.get("failed_run_ids"):
        parts.append(f"{len(failed)} seed(s) failed: stopped early, diverged or NaN")
    return ", ".join(parts)


def judge(podd: list[dict], baseline: Baseline, criterion: str, budget: str,
          controls: list[dict], extra_axes: tuple[str, ...]) -> list[IpcResult]:
    """At each PoDD IPC (by pixels, or by bytes), the best configuration (with no failed seed
    and enough runs, if any has), its pass, its difference to the baseline and its gain over
    the control."""
    def judged_ipc(row: dict) -> float:
        if budget == "bytes" and row["ipc_by_bytes"] is not None:
            return round(row["ipc_by_bytes"], 3)
        return row["ipc"]

    results = []
    for ipc in sorted({judged_ipc(r) for r in podd}):
        at_ipc = [r for r in podd if judged_ipc(r) == ipc]
        best = best_row([r for r in at_ipc if not r["failed_run_ids"]] or at_ipc)
        interval = interval_to(best, baseline)
        control = control_for(best, controls)
        results.append(IpcResult(
            ipc, best["accuracy"], best["accuracy_std"], best["runs"],
            row_passes(best, baseline, criterion), configuration_label(best, extra_axes),
            list(best["run_ids"]), best["accuracy"] - baseline.accuracy,
            interval.low if interval else None, interval.high if interval else None,
            control["accuracy"] if control else None,
            best["accuracy"] - control["accuracy"] if control else None,
            list(control["run_ids"]) if control else []))
    return results


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity as None: JSON has no NaN (json.dumps would write a
    bare NaN that strict parsers reject)."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class ScheduleReport:
    label: str  # the settings that set it apart from the data set's other schedules ('' if one)
    schedule: dict[str, str]  # every schedule setting (display form)
    baseline: Baseline | None
    verdict: Verdict
    groups: pa.Table  # its PoDD configurations, its baselines and the controls that match it
    # where its runs differ in the code, torch build or device they ran on, or in the data
    # they read (runs.PROVENANCE)
    mixed_provenance: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class DatasetReport:
    dataset: str  # as asked for (a family name, or the data set string a sweep used)
    family: str  # the benchmark its runs are of (the paper baseline's key), or its own name
    criterion: str
    budget: str
    schedules: list[ScheduleReport]
    differing: dict[str, list[str]]  # schedule settings that differ, with their values
    runs: pa.Table
    left_out: dict[str, list[str]] = field(default_factory=dict)  # reason -> run ids
    # runs that repeat a seed of their configuration: in the table, each seed counted once
    repeated_seeds: list[str] = field(default_factory=list)
    # searches (`search: lowest-passing`) of its runs' sweeps: their answers and what they
    # ran (status.recorded_searches; attached by the caller, which reads the parent runs)
    searches: list[dict] = field(default_factory=list)

    def states(self) -> list[str]:
        return [s.verdict.state for s in self.schedules]

    def only(self) -> ScheduleReport:
        if len(self.schedules) != 1:
            raise ValueError(f"{self.dataset} has {len(self.schedules)} schedules: use "
                             f".schedules")
        return self.schedules[0]

    # a data set with one schedule reads as it always did
    @property
    def verdict(self) -> Verdict:
        return self.only().verdict

    @property
    def baseline(self) -> Baseline | None:
        return self.only().baseline

    @property
    def groups(self) -> pa.Table:
        return self.only().groups

    def to_dict(self) -> dict:
        return json_safe({
            "dataset": self.dataset, "family": self.family, "criterion": self.criterion,
            "budget": self.budget, "differing_settings": self.differing,
            "schedules": [{"label": s.label, "settings": s.schedule,
                           "baseline": asdict(s.baseline) if s.baseline else None,
                           "verdict": asdict(s.verdict), "groups": s.groups.to_pylist(),
                           "mixed_provenance": s.mixed_provenance}
                          for s in self.schedules],
            "runs": self.runs.to_pylist(), "left_out": self.left_out,
            "repeated_seeds": self.repeated_seeds, "searches": self.searches})


def dataset_family(runs: pa.Table, name: str) -> str:
    families = datasets_in(runs)
    if len(families) > 1:
        raise ReportError(f"{name!r} names runs of several data sets ({', '.join(families)}): "
                          f"report on one of them")
    return families[0]


def _no_runs_error(gathered: Gathered, dataset: str, where: dict[str, str]) -> ReportError:
    """Why `dataset` has no runs to report on: still running, all left out, filtered out,
    unknown, or none."""
    running = gathered.left_out_ids(RUNNING, dataset)
    if running:
        return ReportError(f"no finished runs for {dataset} yet: {len(running)} trial run(s) "
                           f"still RUNNING; report again when they finish")
    broken = [r for r in gathered.left_out if dataset in (r.dataset, r.dataset_source)]
    if broken:
        counts = Counter(r.reason for r in broken)
        return ReportError(f"no usable finished runs for {dataset}: "
                           + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
                           + " (left out)")
    if where and select_dataset(gathered.runs, dataset).num_rows:
        return ReportError(f"no runs of {dataset} match --where "
                           + " ".join(f"{k}={display_value(v)}" for k, v in where.items()))
    known = datasets_in(gathered.runs)
    from podd_engine.data import list_datasets  # torch: only on this error path

    registered = dataset in {e.name for e in list_datasets()} or ":" in dataset
    if not registered and dataset not in PAPER_BASELINES:
        return ReportError(f"unknown data set {dataset!r}: this store has runs for "
                           f"{', '.join(known) or 'no data set yet'}")
    return ReportError(f"no finished runs for {dataset} in this store"
                       + (f" (it has {', '.join(known)})" if known else "")
                       + ": launch a sweep for it first")


def _extra_configuration_axes(groups: list[dict]) -> tuple[str, ...]:
    """Configuration settings beyond patch grid, order and labels that differ between the
    PoDD configurations (they are named in each configuration's label)."""
    podd = [json.loads(g["settings"]) for g in groups if role_of(g["method"]) == POSTER]
    shown = ("patch_grid", "order", "labels")
    return tuple(k for k in differing_settings(podd) if k in CONFIGURATION_AXES
                 and k not in shown)


def build_report(gathered: Gathered, dataset: str, *, baseline: str = "measured",
                 criterion: str = "beats", budget: str = "pixels",
                 where: dict[str, str] | None = None) -> DatasetReport:
    if criterion not in CRITERIA:
        raise ReportError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if budget not in BUDGETS:
        raise ReportError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    how = parse_baseline(baseline)
    where = where or {}
    runs = select_where(select_dataset(gathered.runs, dataset), where)
    if runs.num_rows == 0:
        raise _no_runs_error(gathered, dataset, where)
    family = dataset_family(runs, dataset)
    fixed = paper_baseline(family) if how == "paper" else None
    if isinstance(how, float):
        fixed = Baseline(how, 0.0, f"given on the command line ({100 * how:g} %)", exact=True)
    table = with_failed_seeds(aggregate(runs), gathered.failed_seeds(dataset, where))
    groups = table.to_pylist()
    extra_axes = _extra_configuration_axes(groups)
    judged_roles = (POSTER, BASELINE)
    schedule_texts = sorted({g["schedule"] for g in groups if role_of(g["method"]) in judged_roles})
    differing = differing_settings([json.loads(t) for t in schedule_texts])

    def in_order(text: str) -> tuple:  # by the settings that differ, numbers by value
        schedule = json.loads(text)
        return tuple(numbers_first(display_value(schedule[k]) if k in schedule else UNRECORDED)
                     for k in differing)

    schedule_texts.sort(key=in_order)
    schedules = [json.loads(t) for t in schedule_texts]
    # each poster method is its own answer (never a "configuration" of another): when the
    # data set has several, each gets its verdict per schedule, against the same baselines
    poster_methods = sorted({g["method"] for g in groups if role_of(g["method"]) == POSTER},
                            key=lambda m: (m != "podd", m))
    reports = []
    origins = runs.select(["run_id", *PROVENANCE]).to_pylist()
    for text, schedule in zip(schedule_texts, schedules):
        label = ", ".join(f"{k}={display_value(schedule[k]) if k in schedule else UNRECORDED}"
                          for k in differing)
        shown = [i for i, g in enumerate(groups)
                 if (g["schedule"] == text and role_of(g["method"]) in judged_roles)
                 or (role_of(g["method"]) == CONTROL and _matches_schedule(g, schedule))]
        mine = [groups[i] for i in shown]
        controls = [g for g in mine if role_of(g["method"]) == CONTROL]
        chosen = fixed or measured_baseline(mine)
        present = [m for m in poster_methods if any(g["method"] == m for g in mine)] or [None]
        for method in present:
            tag = ", ".join(filter(None, [label, f"method={method}" if len(poster_methods) > 1
                                          and method else ""]))
            name = f"{dataset} [{tag}]" if tag else dataset
            podd = [g for g in mine if g["method"] == method]
            if not podd:
                verdict = decide([], chosen, criterion, name)
            elif chosen is None:
                verdict = no_baseline_verdict(name, tag)
            else:
                verdict = decide(judge(podd, chosen, criterion, budget, controls, extra_axes),
                                 chosen, criterion, name)
            rows = [i for i in shown if role_of(groups[i]["method"]) != POSTER
                    or groups[i]["method"] == method]
            compared = {i for g in rows for i in groups[g]["run_ids"]}
            reports.append(ScheduleReport(tag, {k: display_value(v) for k, v in schedule.items()},
                                          chosen, verdict,
                                          table.take(pa.array(rows, type=pa.int64())),
                                          mixed_provenance(origins, compared)))
    left_out = {reason: ids for reason in LEFT_OUT_REASONS
                if (ids := gathered.left_out_ids(reason, dataset))}
    return DatasetReport(dataset, family, criterion, budget, reports, differing, runs, left_out,
                         repeated_seed_runs(runs))




def searches_of(report: DatasetReport, searches: list[dict]) -> list[dict]:
    """The recorded searches over this report's data set (by the data set string its sweeps
    used, or its family)."""
    sources = set(report.runs.column("dataset_source").to_pylist()) | {report.dataset}
    return [s for s in searches if s.get("dataset") in sources]
