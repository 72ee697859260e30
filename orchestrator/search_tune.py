"""`search: lowest-passing` on Ray Tune: the planner (orchestrator/search.py) as a Tune
`Searcher`, and early stopping against the baseline as a Tune scheduler. Trials, resources,
retries, checkpoints, resume, Ctrl-C and the MLflow record are the grid's: only the choice of
which trial runs next (and whether a poster trial goes on) is the search's.

    searcher = LowestPassingSearcher(problems, criterion="beats", writer=writer)
    scheduler = EarlyStopAgainstBaseline(searcher, margin=0.03)   # when the spec asks for it
    tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=len(sweep.trials))

The searcher's state (what each trial it started became, the baseline's accuracy curves, the
early stops) is saved with Tune's experiment and restored with it, so a killed or Ctrl-C'd
search resumes where it was, and no trial key is handed to Tune twice.
"""

from __future__ import annotations

import json
import statistics

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.protocol import ERROR, EVAL, EVENT, METRICS, STEP
from orchestrator.search import Plan, SearchProblem, make_plan
from orchestrator.search_record import compact
from orchestrator.trial_outcome import Outcome, outcome_of
from orchestrator.verdict import MIN_RUNS

SEARCH_EVENT = "search_progress"  # the record writer's event: the plan, on the parent run


def _metric(result: dict, name: str) -> float | None:
    """A number a trial reported (Tune hands searchers and schedulers flattened results)."""
    value = result.get(f"{METRICS}/{name}", (result.get(METRICS) or {}).get(name))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


class LowestPassingSearcher(Searcher):
    """Hands Tune the trials the planner asks for, one key per Tune trial."""

    def __init__(self, problems: list[SearchProblem], *, criterion: str = "beats",
                 parallel_probes: int = 1, writer=None):
        super().__init__()
        self.problems = problems
        self.criterion = criterion
        self.parallel_probes = parallel_probes
        self.writer = writer  # the sweep's RecordWriter (pickles as the launch's own)
        self.outcomes: dict[str, Outcome] = {}
        self.handed: dict[str, str] = {}  # Tune trial id -> trial key
        self.curves: dict[str, dict[int, float]] = {}  # key -> {outer step: test accuracy}
        self.stop_reasons: dict[str, str] = {}  # key -> why it was stopped early
        self._plans: list[Plan] | None = None
        self._role = {c.key: (p, c) for p in problems for c in p.baseline + p.posters}

    # -- what to run
    def plans(self) -> list[Plan]:
        if self._plans is None:
            running = set(self.handed.values()) - set(self.outcomes)
            self._plans = [make_plan(p, self.outcomes, running & set(p.keys), self.criterion,
                                     self.parallel_probes) for p in self.problems]
        return self._plans

    def _changed(self) -> None:
        self._plans = None

    def suggest(self, trial_id: str):
        handed = set(self.handed.values())
        for plan in self.plans():
            for key in plan.to_run:
                if key not in handed:
                    self.handed[trial_id] = key
                    self._changed()
                    return {"trial": key}
        if all(plan.done for plan in self.plans()):
            return Searcher.FINISHED
        return None  # waiting for running trials

    # -- what comes back
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        key = self.handed.get(trial_id)
        accuracy = _metric(result, "test_accuracy")
        if key is not None and result.get(EVENT) == EVAL and accuracy is not None:
            self.curves.setdefault(key, {})[int(result.get(STEP, 0))] = accuracy

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        key = self.handed.get(trial_id)
        if key is None:
            return
        result = result or {}
        outcome = outcome_of(result.get(EVENT), _metric(result, "test_accuracy"), crashed=error,
                             error=str(result.get(ERROR, "")),
                             stopped_early=self.stop_reasons.get(key))
        if outcome is None:  # ended by a Ctrl-C or a stop: it resumes with the sweep
            return
        self.outcomes[key] = outcome
        self._changed()
        self.publish()

    def publish(self) -> None:
        """The search's progress, on the sweep's parent run (status and report read it)."""
        if self.writer is not None:
            self.writer.submit(SEARCH_EVENT, "", self.summary())

    def summary(self) -> dict:
        return {"criterion": self.criterion, "parallel_probes": self.parallel_probes,
                "searches": [{"label": problem.label, "dataset": problem.dataset,
                              **plan.summary()}
                             for problem, plan in zip(self.problems, self.plans())]}

    # -- early stopping against the baseline
    def baseline_at(self, key: str, step: int) -> float | None:
        """The mean test accuracy of the key's baseline runs at outer step `step` (None until
        enough of them have reported it)."""
        problem, _ = self._role[key]
        values = [self.curves[b.key][step] for b in problem.baseline
                  if step in self.curves.get(b.key, {})]
        if len(values) < min(MIN_RUNS, len(problem.baseline)):
            return None
        return statistics.fmean(values)

    def is_poster(self, key: str) -> bool:
        return key in self._role and self._role[key][1].role == "poster"

    # -- Tune saves and restores it with the experiment
    def get_state(self) -> dict:
        return {"outcomes": {k: o.to_dict() for k, o in self.outcomes.items()},
                "handed": self.handed, "stop_reasons": self.stop_reasons,
                "curves": {k: {str(s): a for s, a in c.items()} for k, c in self.curves.items()}}

    def set_state(self, state: dict) -> None:
        self.outcomes = {k: Outcome.from_dict(v) for k, v in state["outcomes"].items()}
        self.handed = dict(state["handed"])
        self.stop_reasons = dict(state["stop_reasons"])
        self.curves = {k: {int(s): a for s, a in c.items()} for k, c in state["curves"].items()}
        self._changed()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the trials come from the planner, not from a search space

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plans"] = None
        return state


class EarlyStopAgainstBaseline(FIFOScheduler):
    """Stops a poster trial whose test accuracy during distillation (`eval_every`) is more
    than `margin` below the baseline's own accuracy at the same outer step: judged from the
    baseline's curve, it cannot plausibly reach the baseline's final accuracy. The run is
    recorded as stopped early, with the reason, and never counted as a finished run."""

    def __init__(self, searcher: LowestPassingSearcher, margin: float):
        super().__init__()
        self.searcher = searcher
        self.margin = margin

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        key = trial.config.get("trial")
        accuracy = _metric(result, "test_accuracy")
        if result.get(EVENT) != EVAL or accuracy is None or not self.searcher.is_poster(key):
            return TrialScheduler.CONTINUE
        step = int(result.get(STEP, 0))
        baseline = self.searcher.baseline_at(key, step)
        if baseline is None or accuracy + self.margin >= baseline:
            return TrialScheduler.CONTINUE
        reason = (f"stopped early at outer step {step}: test accuracy {100 * accuracy:.2f} % is "
                  f"more than {100 * self.margin:g} points below the baseline's "
                  f"{100 * baseline:.2f} % at the same step")
        self.searcher.stop_reasons[key] = reason
        if self.searcher.writer is not None:
            self.searcher.writer.submit("trial_stopped_early", key, reason)
        return TrialScheduler.STOP


def search_summary(sweep, keyed: list) -> dict:
    """The search's plans from what Tune's results (`tuner.fit()`'s, with their trial keys:
    `TrialNames.keyed`) say became of each trial it ran: what the launch prints at its end."""
    outcomes, running = {}, set()
    for key, result in keyed:
        metrics = result.metrics or {}
        event = metrics.get(EVENT)
        # fit() has returned: a trial whose last word was an evaluation was stopped there by
        # the search's scheduler (one ended by a stop or Ctrl-C said STOPPED)
        outcome = outcome_of(event, _metric(metrics, "test_accuracy"),
                             crashed=result.error is not None,
                             error=str(metrics.get(ERROR, "")),
                             stopped_early="" if event == EVAL else None)
        if outcome is None:
            running.add(key)
        else:
            outcomes[key] = outcome
    spec = sweep.spec
    return {"criterion": spec.criterion, "searches": [
        compact({"label": problem.label, "dataset": problem.dataset,
                 **make_plan(problem, outcomes, running & set(problem.keys), spec.criterion,
                             spec.parallel_probes).summary()})
        for problem in sweep.search_problems()]}
