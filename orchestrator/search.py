"""`search: lowest-passing`: find the lowest IPC whose poster beats the baseline with a
fraction of the grid's trials. This module is the planner, pure logic (no Ray, no MLflow, no
torch): given every trial the grid would run and what has come back so far, it says which
trials to run next, what is decided, and the answer.

    problems = sweep.search_problems()   # one per data set, schedule and poster method
    plan = make_plan(problems[0], outcomes, running, "beats")
    plan.to_run        # trial keys to start now
    plan.done, plan.answer, plan.bracket, plan.notes

How it searches, assuming accuracy rises with IPC (and checking it where the probes can):
  1. The baseline's seeds (all of them: every decision compares with their mean) run first,
     alongside the first probe.
  2. IPCs are probed by bisection over the spec's sorted IPC list: each probe runs every
     configuration (patch grid, order, labels) at that IPC with the first two seeds.
     `parallel_probes: k` splits the open bracket into k + 1 parts per round instead.
  3. A configuration whose 95 % interval of the difference to the baseline straddles the
     criterion's threshold gets its next seed, up to the spec's seed list; when they run out,
     the criterion decides on the means, as `report` does (orchestrator/verdict.py).
  4. A probed IPC above the lowest passing one that fails contradicts the assumption: the
     plan says so and probes every IPC between them, so the answer and its caveat are the
     grid's (`report`'s "but X fails above it").
The plan is a function of the outcomes alone: a resumed search continues where it stopped,
and no trial is run twice. A sweep's searches: orchestrator/search_problems.py; how a search
is recorded and said: orchestrator/search_record.py; on Ray Tune: orchestrator/search_tune.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from orchestrator.trial_outcome import FAILED, FINISHED, STOPPED_EARLY, Outcome
from orchestrator.verdict import MIN_RUNS, Baseline, interval_to, row_passes

SEARCHES = ("grid", "lowest-passing")

# What is known of a configuration, or of an IPC.
PASS, FAIL, UNJUDGEABLE = "pass", "fail", "unjudgeable"
NEEDS_SEED, RUNNING, UNPROBED = "needs-seed", "running", "unprobed"


@dataclass(frozen=True)
class Candidate:
    """A trial the search may run."""

    key: str
    role: str  # "baseline" or "poster" (podd_engine.methods roles)
    ipc: float
    configuration: str  # what sets a poster apart at its IPC (patch grid, order, labels...)
    seed: int


@dataclass(frozen=True)
class SearchProblem:
    """One search: the baseline's trials and the posters' candidate trials of one data set
    and schedule, with the seeds in the spec's order."""

    baseline: tuple[Candidate, ...]
    posters: tuple[Candidate, ...]
    seeds: tuple[int, ...]
    label: str = ""  # which data set and schedule, for messages
    dataset: str = ""  # the data set as the sweep names it

    @property
    def ipcs(self) -> list[float]:
        return sorted({c.ipc for c in self.posters})

    def configurations(self, ipc: float) -> list[str]:
        return sorted({c.configuration for c in self.posters if c.ipc == ipc})

    def candidate(self, ipc: float, configuration: str, seed: int) -> Candidate | None:
        return next((c for c in self.posters if c.ipc == ipc and c.configuration == configuration
                     and c.seed == seed), None)

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.baseline + self.posters]


@dataclass
class ConfigurationStatus:
    configuration: str
    state: str  # PASS | FAIL | UNJUDGEABLE | NEEDS_SEED | RUNNING
    runs: int  # finished runs
    accuracy: float | None = None
    accuracy_std: float | None = None
    difference: float | None = None
    difference_low: float | None = None
    difference_high: float | None = None
    seeds: list[int] = field(default_factory=list)  # seeds tried (finished or not)
    stopped_early: int = 0
    failed: int = 0


@dataclass
class Probe:
    """What is known at one probed IPC: its decision and its best configuration."""

    ipc: float
    state: str  # PASS | FAIL | UNJUDGEABLE | RUNNING (undecided)
    configurations: list[ConfigurationStatus]

    @property
    def best(self) -> ConfigurationStatus | None:
        judged = [c for c in self.configurations if c.accuracy is not None]
        passing = [c for c in judged if c.state == PASS]
        return max(passing or judged, key=lambda c: c.accuracy, default=None)

    def to_dict(self) -> dict:
        best = self.best
        return {"ipc": self.ipc, "state": self.state,
                "accuracy": best.accuracy if best else None,
                "runs": best.runs if best else 0,
                "configuration": best.configuration if best else None,
                "difference": best.difference if best else None,
                "difference_low": best.difference_low if best else None,
                "difference_high": best.difference_high if best else None,
                "stopped_early": sum(c.stopped_early for c in self.configurations),
                "failed": sum(c.failed for c in self.configurations),
                "seeds": max((len(c.seeds) for c in self.configurations), default=0)}


# The answer's states (the search's own; `report` says the same in its words).
OPEN, ANSWER_PASS, ANSWER_NONE, NO_BASELINE = "open", "pass", "none-passes", "no-baseline"


@dataclass
class Plan:
    to_run: list[str]  # keys to start now
    done: bool  # nothing to run and nothing running: the answer is final
    state: str  # OPEN | ANSWER_PASS | ANSWER_NONE | NO_BASELINE
    answer: float | None  # the lowest passing IPC (when state is ANSWER_PASS)
    bracket: tuple[float | None, float | None]  # (highest failing, lowest passing) IPC so far
    probes: list[Probe]
    notes: list[str]
    baseline: Baseline | None
    trials_run: int  # trials started so far (finished, stopped, failed or running)
    trials_in_grid: int

    def summary(self) -> dict:
        """What the driver records on the sweep's parent run and `status` shows."""
        return {"state": self.state, "done": self.done, "answer": self.answer,
                "bracket": list(self.bracket), "probes": [p.to_dict() for p in self.probes],
                "notes": self.notes, "trials_run": self.trials_run,
                "trials_in_grid": self.trials_in_grid,
                "baseline": (None if self.baseline is None else
                             {"accuracy": self.baseline.accuracy, "std": self.baseline.std,
                              "runs": self.baseline.runs})}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def measured_baseline(problem: SearchProblem, outcomes: Mapping[str, Outcome]
                      ) -> Baseline | None:
    accuracies = [outcomes[c.key].accuracy for c in problem.baseline
                  if c.key in outcomes and outcomes[c.key].state == FINISHED]
    if not accuracies:
        return None
    mean, std = _mean_std(accuracies)
    return Baseline(mean, std, f"measured: {len(accuracies)} baseline runs", len(accuracies))


def _threshold(baseline: Baseline, criterion: str) -> float:
    """The difference to the baseline at which the criterion's decision flips."""
    return -(baseline.std or 0.0) if criterion == "comparable" else 0.0


def judge_configuration(problem: SearchProblem, ipc: float, configuration: str,
                        outcomes: Mapping[str, Outcome], running: set[str],
                        baseline: Baseline | None, criterion: str) -> ConfigurationStatus:
    tried = [c for c in problem.posters if c.ipc == ipc and c.configuration == configuration
             and (c.key in outcomes or c.key in running)]
    status = ConfigurationStatus(configuration, RUNNING, 0, seeds=sorted(c.seed for c in tried))
    done = [outcomes[c.key] for c in tried if c.key in outcomes]
    status.stopped_early = sum(o.state == STOPPED_EARLY for o in done)
    status.failed = sum(o.state == FAILED for o in done)
    accuracies = [o.accuracy for o in done if o.state == FINISHED]
    status.runs = len(accuracies)
    if accuracies:
        status.accuracy, status.accuracy_std = _mean_std(accuracies)
    if any(c.key in running for c in tried) or baseline is None:
        return status  # RUNNING: wait for it (and for the baseline)
    seeds_left = len(tried) < len(problem.seeds)
    if any(o.fails_configuration for o in done):
        status.state = FAIL
        return status
    if status.runs < MIN_RUNS:
        status.state = NEEDS_SEED if seeds_left else UNJUDGEABLE
        return status
    row = {"accuracy": status.accuracy, "accuracy_std": status.accuracy_std,
           "runs": status.runs}
    status.difference = status.accuracy - baseline.accuracy
    interval = interval_to(row, baseline)
    if interval is not None:
        status.difference_low, status.difference_high = interval.low, interval.high
    threshold = _threshold(baseline, criterion)
    uncertain = interval is None or interval.low <= threshold <= interval.high
    if uncertain and seeds_left:
        status.state = NEEDS_SEED
    else:
        status.state = PASS if row_passes(row, baseline, criterion) else FAIL
    return status


def _probe(problem: SearchProblem, ipc: float, outcomes: Mapping[str, Outcome],
           running: set[str], baseline: Baseline | None, criterion: str) -> Probe | None:
    configurations = [judge_configuration(problem, ipc, name, outcomes, running, baseline,
                                          criterion)
                      for name in problem.configurations(ipc)]
    if not any(c.seeds for c in configurations):
        return None  # not probed
    states = {c.state for c in configurations}
    if PASS in states:
        state = PASS  # the best configuration at an IPC is what is judged
    elif states <= {FAIL, UNJUDGEABLE}:
        state = FAIL if FAIL in states else UNJUDGEABLE
    else:
        state = RUNNING
    return Probe(ipc, state, configurations)


def _first_seeds(problem: SearchProblem) -> list[int]:
    return list(problem.seeds[:MIN_RUNS])


def _probe_keys(problem: SearchProblem, ipc: float) -> list[str]:
    """The trials that probe an IPC: each configuration with the first seeds."""
    keys = []
    for configuration in problem.configurations(ipc):
        for seed in _first_seeds(problem):
            candidate = problem.candidate(ipc, configuration, seed)
            if candidate is not None:
                keys.append(candidate.key)
    return keys


def _next_seed_key(problem: SearchProblem, status: ConfigurationStatus, ipc: float
                   ) -> str | None:
    for seed in problem.seeds:
        if seed not in status.seeds:
            candidate = problem.candidate(ipc, status.configuration, seed)
            if candidate is not None:
                return candidate.key
    return None


def _split_points(low: int, high: int, parts: int) -> list[int]:
    """Indices strictly between `low` and `high` that cut the gap into parts + 1 pieces
    (parts = 1: the midpoint, which is bisection)."""
    points = []
    for j in range(1, parts + 1):
        index = low + math.floor((high - low) * j / (parts + 1))
        if low < index < high and index not in points:
            points.append(index)
    return points or ([(low + high) // 2] if high - low > 1 else [])


def make_plan(problem: SearchProblem, outcomes: Mapping[str, Outcome],
              running: Iterable[str] = (), criterion: str = "beats",
              parallel_probes: int = 1) -> Plan:
    """What to run next, what is decided and the answer so far (see the module's docstring).
    `outcomes`: trial key -> Outcome for every trial that ended; `running`: keys started and
    not ended."""
    running = set(running)
    ipcs = problem.ipcs
    n = len(ipcs)
    to_run: list[str] = []
    notes: list[str] = []
    started = {k for k in problem.keys if k in outcomes or k in running}

    # 1. the baseline: every seed, from the start
    baseline_keys = [c.key for c in problem.baseline]
    to_run += [k for k in baseline_keys if k not in started]
    baseline_done = all(k in outcomes for k in baseline_keys)
    baseline = measured_baseline(problem, outcomes) if baseline_done else None

    probes = {ipc: p for ipc in ipcs
              if (p := _probe(problem, ipc, outcomes, running, baseline, criterion))}
    # 2. seeds where a probed configuration is uncertain
    for ipc, probe in probes.items():
        if probe.state == PASS:
            continue  # decided: another configuration's seeds would not change it
        for status in probe.configurations:
            if status.state == NEEDS_SEED:
                key = _next_seed_key(problem, status, ipc)
                if key is not None and key not in started:
                    to_run.append(key)

    passing = [i for i, ipc in enumerate(ipcs) if ipc in probes and probes[ipc].state == PASS]
    lowest_pass = min(passing, default=n)
    settled_below = [i for i in range(lowest_pass) if ipcs[i] in probes
                     and probes[ipcs[i]].state in (FAIL, UNJUDGEABLE)]
    low = max(settled_below, default=-1)
    undecided = [i for i in range(low + 1, lowest_pass) if ipcs[i] in probes]

    if baseline_done and baseline is None:
        notes.append("every baseline trial failed: there is nothing to judge against")
        return Plan([], not running, NO_BASELINE, None, (None, None), list(probes.values()),
                    notes, None, len(started), len(problem.keys))

    # 3. bisection inside the open bracket (low, lowest_pass), once the last round is decided
    if not undecided:
        for index in _split_points(low, lowest_pass, max(1, parallel_probes)):
            to_run += [k for k in _probe_keys(problem, ipcs[index]) if k not in started]

    # 4. monotonicity: a failing IPC above the lowest passing one
    above = [i for i in range(lowest_pass + 1, n) if ipcs[i] in probes
             and probes[ipcs[i]].state == FAIL]
    if above:
        notes.append(f"accuracy is not monotone in IPC: {ipcs[lowest_pass]:g} passes but "
                     f"{', '.join(f'{ipcs[i]:g}' for i in above)} "
                     f"{'fails' if len(above) == 1 else 'fail'} above it; every IPC between "
                     f"them is probed")
        for i in range(lowest_pass + 1, max(above)):
            if ipcs[i] not in probes:
                to_run += [k for k in _probe_keys(problem, ipcs[i]) if k not in started]
    for ipc, probe in probes.items():
        if probe.state == UNJUDGEABLE:
            notes.append(f"{ipc:g} IPC cannot be judged: too few of its trials finished "
                         f"({', '.join(f'{c.failed} failed' for c in probe.configurations)}); "
                         f"taken as not passing")

    to_run = list(dict.fromkeys(to_run))  # once each, in order
    done = not to_run and not running
    bracket = (ipcs[low] if low >= 0 else None, ipcs[lowest_pass] if lowest_pass < n else None)
    closed = not undecided and lowest_pass - low <= 1
    if closed and baseline is not None:
        state = ANSWER_PASS if lowest_pass < n else ANSWER_NONE
    else:
        state = OPEN
    answer = ipcs[lowest_pass] if state == ANSWER_PASS else None
    ordered = [probes[ipc] for ipc in ipcs if ipc in probes]
    return Plan(to_run, done, state, answer, bracket, ordered, notes, baseline,
                len(started), len(problem.keys))


# --------------------------------------------------------------------------------------------
# What a search will cost, before it starts
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchCost:
    grid: int  # trials of the full grid
    expected: float  # with every decision made by the first seeds, the crossing anywhere
    worst_monotone: int  # every probe needing every seed, accuracy rising with IPC
    rounds: float = 0.0  # expected rounds: trials of a round run together, rounds one by one


def search_cost(problem: SearchProblem, criterion: str = "beats", parallel_probes: int = 1
                ) -> SearchCost:
    """Trial counts, by running the planner on made-up outcomes: for each place the crossing
    can be (below the lowest IPC, between two, above the highest), clear decisions (expected:
    the first seeds settle each probe) or coin-flip ones (worst: every seed at every probe)."""
    ipcs = problem.ipcs
    counts, rounds, worst = [], [], 0
    for crossing in range(len(ipcs) + 1):
        clear, steps = _simulate(problem, crossing, criterion, parallel_probes, spread=0.001)
        unclear, _ = _simulate(problem, crossing, criterion, parallel_probes, spread=None)
        counts.append(clear)
        rounds.append(steps)
        worst = max(worst, unclear)
    return SearchCost(len(problem.keys), statistics.fmean(counts), worst,
                      statistics.fmean(rounds))


def _simulate(problem: SearchProblem, crossing: int, criterion: str, parallel_probes: int,
              spread: float | None) -> tuple[int, int]:
    """(trials, rounds) to the answer when IPCs at index >= crossing pass. spread: the seeds'
    spread around a clear margin of 10 points; None: results straddle the baseline until the
    last seed (so every seed runs)."""
    ipcs = problem.ipcs
    outcomes: dict[str, Outcome] = {}
    for rounds in range(10 * (len(problem.keys) + 1)):
        plan = make_plan(problem, outcomes, (), criterion, parallel_probes)
        if not plan.to_run:
            return len(outcomes), rounds
        for key in plan.to_run:
            outcomes[key] = _made_up(problem, key, ipcs, crossing, spread, outcomes)
    raise RuntimeError("the search planner did not converge")  # a bug, not an input


def _made_up(problem: SearchProblem, key: str, ipcs: list[float], crossing: int,
             spread: float | None, outcomes: Mapping[str, Outcome]) -> Outcome:
    candidate = next(c for c in problem.baseline + problem.posters if c.key == key)
    if candidate.role != "poster":
        return Outcome(FINISHED, 0.5 + (0.001 if candidate.seed % 2 else -0.001))
    sign = 1.0 if ipcs.index(candidate.ipc) >= crossing else -1.0
    index = problem.seeds.index(candidate.seed)
    if spread is not None:
        return Outcome(FINISHED, 0.5 + sign * 0.1 + (spread if index % 2 else -spread))
    # straddling: -20, +20, -20, ... points around a one-point margin, the last seed making the
    # mean exactly that margin: the interval straddles zero until the seeds run out
    if index == len(problem.seeds) - 1:
        deviation = 0.2 if index % 2 else 0.0
    else:
        deviation = 0.2 if index % 2 else -0.2
    return Outcome(FINISHED, 0.5 + sign * 0.01 + deviation)
