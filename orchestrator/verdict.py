"""Whether a poster configuration beats its baseline, and the verdict of one schedule: the
lowest IPC that passes, said so that it cannot be misread.

    per_ipc = [IpcResult(...), ...]        # the best configuration at each IPC (report.judge)
    verdict = decide(per_ipc, baseline, "beats", "cifar10")
    verdict.state                          # pass | none-passes | too-few-runs | no-baseline
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.stats import LEVEL, Interval, welch_interval

CRITERIA = ("beats", "comparable", "significant")
MIN_RUNS = 2  # fewer finished runs than this cannot tell a difference
TIE = 1e-9  # means computed in different orders may differ in the last bit: equal is a pass

# A schedule's verdict, and the exit code each gives (see `exit_code`).
PASS, NONE_PASSES, TOO_FEW_RUNS, NO_BASELINE = "pass", "none-passes", "too-few-runs", "no-baseline"
# 0: a verdict was found; 1: none was (the state says why); bad input is 2 (ReportError)
EXIT_CODES = {PASS: 0, NONE_PASSES: 1, TOO_FEW_RUNS: 1, NO_BASELINE: 1}


def best_row(rows: list[dict]) -> dict:
    """The best configuration among those with enough seeds to judge (else the best at all)."""
    return max(rows, key=lambda r: (r["runs"] >= MIN_RUNS, r["accuracy"]))


@dataclass
class Baseline:
    accuracy: float  # fraction
    std: float | None  # None: unknown (a single measured run), so comparable = beats
    source: str
    runs: int = 0
    run_ids: list[str] = field(default_factory=list)
    exact: bool = False  # the paper's figure or a given number: taken as having no spread


def interval_to(row: dict, baseline: Baseline) -> Interval | None:
    """The 95 % interval of a configuration's mean minus the baseline's, over seeds."""
    if baseline.exact:
        return welch_interval(row["accuracy"], row["accuracy_std"], row["runs"],
                              baseline.accuracy, None, None)
    return welch_interval(row["accuracy"], row["accuracy_std"], row["runs"], baseline.accuracy,
                          baseline.std, baseline.runs)


def row_passes(row: dict, baseline: Baseline, criterion: str) -> bool | None:
    """Pass/fail of one configuration; None with too few runs (or, for `significant`, an
    interval that cannot be told). A configuration with a failed seed (stopped early by a
    search, diverged, or NaN) fails, however its other seeds did."""
    if row.get("failed_run_ids"):
        return False
    if row["runs"] < MIN_RUNS:
        return None
    if criterion == "significant":
        interval = interval_to(row, baseline)
        return None if interval is None else interval.low > 0
    allowance = (baseline.std or 0.0) if criterion == "comparable" else 0.0
    return row["accuracy"] >= baseline.accuracy - allowance - TIE


@dataclass
class IpcResult:
    ipc: float  # by pixels (the requested IPC), or by bytes with --budget bytes
    accuracy: float
    accuracy_std: float | None
    runs: int
    passes: bool | None  # None: too few runs to tell
    configuration: str
    run_ids: list[str]
    difference: float | None = None  # accuracy - baseline accuracy
    difference_low: float | None = None  # its 95 % interval over seeds (None: unknown)
    difference_high: float | None = None
    control_accuracy: float | None = None  # random real images with the same storage
    gain_over_control: float | None = None
    control_run_ids: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    state: str  # PASS | NONE_PASSES | TOO_FEW_RUNS | NO_BASELINE
    lowest_ipc: float | None  # the lowest judged IPC that passes
    # True: every IPC above the lowest passes; False: one above fails; None: there is no IPC
    # above it, or those above that are not failing have too few runs to judge
    all_above_pass: bool | None
    message: str
    per_ipc: list[IpcResult]
    unjudged_ipcs: list[float] = field(default_factory=list)  # fewer than MIN_RUNS runs


def _ipcs(results: list[IpcResult]) -> str:
    return ", ".join(f"{r.ipc:g}" for r in results) + " IPC"


def _fails(results: list[IpcResult]) -> str:
    return f"{_ipcs(results)} {'fails' if len(results) == 1 else 'fail'}"


def _above_lowest(lowest: IpcResult, per_ipc: list[IpcResult]) -> tuple[bool | None, str]:
    """Whether every IPC above the lowest passing one passes too, and how to say it. An IPC
    above with too few runs cannot be claimed to pass; with no IPC above there is nothing to
    claim (all([]) would say True)."""
    above = [r for r in per_ipc if r.ipc > lowest.ipc]
    failing = [r for r in above if r.passes is False]
    unjudged = [r for r in above if r.passes is None]
    if not above:
        return None, "it is the highest IPC in the store"
    if failing:
        text = f"but {_fails(failing)} above it"
        if unjudged:
            text += f", and {_ipcs(unjudged)} above it cannot be judged (too few runs)"
        return False, text
    if unjudged:
        return None, (f"every judged IPC above it passes too, but {_ipcs(unjudged)} cannot be "
                      f"judged (too few runs)")
    return True, "every IPC above it passes too"


def _how_sure(result: IpcResult) -> str:
    if result.difference is None:
        return ""
    text = f"difference at {result.ipc:g} IPC {100 * result.difference:+.2f} points"
    if result.difference_low is None:
        return text + " (interval unknown: a side has one run)"
    return (text + f", {100 * LEVEL:.0f} % interval [{100 * result.difference_low:+.2f}, "
                   f"{100 * result.difference_high:+.2f}] over seeds")


def decide(per_ipc: list[IpcResult], baseline: Baseline | None, criterion: str, name: str
           ) -> Verdict:
    """The lowest IPC whose best PoDD configuration reaches the baseline (beats: mean >= the
    baseline's mean; comparable: within one baseline std below it; significant: the whole
    95 % interval of the difference above zero).

    pass: some judged IPC passes. none-passes: every IPC was judged (>= MIN_RUNS runs) and
    each fails. too-few-runs: none of the judged IPCs passes, but some IPC (or every one, or
    there are no PoDD runs at all) has too few runs to judge, so one could still pass."""
    judged = [r for r in per_ipc if r.passes is not None]
    unjudged = [r for r in per_ipc if r.passes is None]
    unjudged_ipcs = [r.ipc for r in unjudged]
    if not per_ipc or baseline is None:
        return Verdict(TOO_FEW_RUNS, None, None, f"{name}: too few runs to tell: no finished "
                                                 f"PoDD runs to judge", per_ipc)
    base = f"the baseline {100 * baseline.accuracy:.2f} % ({baseline.source})"
    passing = [r for r in judged if r.passes]
    if passing:
        lowest = min(passing, key=lambda r: r.ipc)
        all_above, above_text = _above_lowest(lowest, per_ipc)
        word = {"beats": "beats", "comparable": "is comparable to (within one std of)",
                "significant": "beats (the whole 95 % interval above zero)"}[criterion]
        message = (f"{name}: {lowest.ipc:g} IPC is the lowest at which PoDD "
                   f"({100 * lowest.accuracy:.2f} % over {lowest.runs} runs, "
                   f"{lowest.configuration}) {word} {base}; {above_text}")
        below = [r for r in unjudged if r.ipc < lowest.ipc]
        if below:
            message += (f"; {_ipcs(below)} below it cannot be judged (too few runs), so the "
                        f"lowest may be lower")
        message += f"; {_how_sure(lowest)}"
        return Verdict(PASS, lowest.ipc, all_above, message, per_ipc, unjudged_ipcs)
    miss = {"beats": "is below", "comparable": "is more than one std below",
            "significant": "is not surely above"}[criterion]
    reason = ("fewer than 2 finished runs" if criterion != "significant" else
              "fewer than 2 finished runs, or an interval that cannot be told")
    too_few = (f"{_ipcs(unjudged)} cannot be judged: {reason} "
               f"({', '.join(str(r.runs) for r in unjudged)}); add seeds")
    if not judged:
        return Verdict(TOO_FEW_RUNS, None, None, f"{name}: too few runs to tell: {too_few}",
                       per_ipc, unjudged_ipcs)
    best = max(judged, key=lambda r: r.accuracy)
    failed = (f"the best judged PoDD poster ({best.ipc:g} IPC, {100 * best.accuracy:.2f} %) "
              f"{miss} {base}; {_how_sure(best)}")
    if unjudged:
        return Verdict(TOO_FEW_RUNS, None, None, f"{name}: too few runs to tell: no judged "
                                                 f"IPC passes ({failed}), but {too_few}",
                       per_ipc, unjudged_ipcs)
    return Verdict(NONE_PASSES, None, None, f"{name}: no IPC passes: {failed}", per_ipc)


def no_baseline_verdict(name: str, label: str) -> Verdict:
    where = f" ({label})" if label else ""
    return Verdict(NO_BASELINE, None, None,
                   f"{name}: no verdict: no finished RaT-BPTT 1-IPC runs at this "
                   f"schedule{where} to judge against: run the baseline with the same settings "
                   f"(add `include: [{{method: rat-bptt, ipc: 1}}]` to the sweep), or judge "
                   f"against the paper's figure with --baseline paper", [])


def exit_code(states: list[str]) -> int:
    """0 when every verdict has a passing IPC; else 1 (none passes, too few runs to tell, or
    no baseline to judge against: the verdict's state and message say which)."""
    return max((EXIT_CODES[s] for s in states), default=EXIT_CODES[PASS])


# --------------------------------------------------------------------------------------------
# A data set's report: its schedules, each with its own verdict
# --------------------------------------------------------------------------------------------
