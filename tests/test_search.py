"""`search: lowest-passing`'s planner (orchestrator/search.py) on accuracy curves, against the
grid's answer over the same draws; its Tune searcher and early-stopping scheduler on Tune's
own calls; the spec's checks. The real sweeps are in tests/test_search_sweep.py."""

import random
import statistics

import pytest

from orchestrator.search import (ANSWER_NONE, ANSWER_PASS, OPEN, Candidate, SearchProblem,
                                 make_plan, search_cost)
from orchestrator.search_record import compact, describe
from orchestrator.trial_outcome import FAILED, FINISHED, STOPPED_EARLY, Outcome
from orchestrator.verdict import Baseline, row_passes

IPCS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
SEEDS = (0, 1, 2)


def problem(ipcs=IPCS, seeds=SEEDS, configurations=("16x6",)) -> SearchProblem:
    baseline = tuple(Candidate(f"b{s}", "baseline", 1.0, "", s) for s in seeds)
    posters = tuple(Candidate(f"p{ipc}-{c}-{s}", "poster", ipc, c, s)
                    for ipc in ipcs for c in configurations for s in seeds)
    return SearchProblem(baseline, posters, seeds, "test")


def draws(prob: SearchProblem, curve, baseline=0.532, spread=0.007, seed=0):
    """Every trial's accuracy, drawn once: the grid and the search see the same numbers."""
    rng = random.Random(seed)
    out = {}
    for c in prob.baseline + prob.posters:
        mean = baseline if c.role == "baseline" else curve(c.ipc, c.configuration)
        out[c.key] = Outcome(FINISHED, mean + rng.gauss(0, spread))
    return out


def run_search(prob, truth, parallel_probes=1, criterion="beats", rounds=50):
    """Run the planner to the end, all trials of a round finishing together."""
    outcomes = {}
    for _ in range(rounds):
        plan = make_plan(prob, outcomes, (), criterion, parallel_probes)
        if not plan.to_run:
            return plan, outcomes
        for key in plan.to_run:
            assert key not in outcomes, f"{key} run twice"
            outcomes[key] = truth[key]
    raise AssertionError("the search did not end")


def grid_answer(prob, truth, criterion="beats"):
    """What `report` says of the full grid: the lowest IPC whose best configuration passes."""
    base = [truth[c.key].accuracy for c in prob.baseline]
    baseline = Baseline(statistics.fmean(base), statistics.stdev(base), "grid", len(base))
    passing = []
    for ipc in prob.ipcs:
        rows = []
        for configuration in prob.configurations(ipc):
            values = [truth[c.key].accuracy for c in prob.posters
                      if c.ipc == ipc and c.configuration == configuration]
            rows.append({"accuracy": statistics.fmean(values),
                         "accuracy_std": statistics.stdev(values), "runs": len(values)})
        best = max(rows, key=lambda r: r["accuracy"])
        if row_passes(best, baseline, criterion):
            passing.append(ipc)
    return min(passing, default=None)


def table1(ipc, _configuration):  # CIFAR-10's Table 1 row (PoDD), as fractions
    return {1.0: .591, 0.9: .584, 0.8: .567, 0.7: .546, 0.6: .506, 0.5: .495, 0.4: .471,
            0.3: .423}[ipc]


def test_bisection_finds_the_grids_answer_with_fewer_trials():
    prob = problem()
    agree, counts = 0, []
    for seed in range(20):
        truth = draws(prob, table1, seed=seed)
        plan, outcomes = run_search(prob, truth)
        assert plan.done and plan.state in (ANSWER_PASS, ANSWER_NONE)
        agree += plan.answer == grid_answer(prob, truth)
        counts.append(len(outcomes))
    assert agree == 20  # a monotone curve: the search and the grid always agree
    assert max(counts) < len(prob.keys) and statistics.fmean(counts) <= 0.5 * len(prob.keys)


def test_the_first_round_runs_the_baseline_and_the_middle_ipc_with_two_seeds():
    plan = make_plan(problem(), {})
    assert plan.to_run == ["b0", "b1", "b2", "p0.6-16x6-0", "p0.6-16x6-1"]
    assert plan.state == OPEN and not plan.done
    # nothing more until the baseline is known: every decision compares with it
    half = {k: Outcome(FINISHED, 0.6) for k in ("p0.6-16x6-0", "p0.6-16x6-1")}
    assert make_plan(problem(), half, running=["b0", "b1", "b2"]).to_run == []


def test_a_seed_is_added_only_where_the_interval_straddles_zero():
    prob = problem()
    baseline = {f"b{s}": Outcome(FINISHED, 0.50 + 0.001 * s) for s in SEEDS}
    clear = {**baseline, "p0.6-16x6-0": Outcome(FINISHED, 0.60),
             "p0.6-16x6-1": Outcome(FINISHED, 0.601)}
    assert "p0.6-16x6-2" not in make_plan(prob, clear).to_run  # surely above: decided
    unsure = {**baseline, "p0.6-16x6-0": Outcome(FINISHED, 0.45),
              "p0.6-16x6-1": Outcome(FINISHED, 0.57)}
    plan = make_plan(prob, unsure)
    assert plan.to_run == ["p0.6-16x6-2"]  # the next seed, and no new probe meanwhile
    # the seeds run out: the criterion decides on the mean (0.51 >= 0.501 beats)
    done = {**unsure, "p0.6-16x6-2": Outcome(FINISHED, 0.51)}
    plan = make_plan(prob, done)
    assert plan.probes[0].state == "pass" and plan.to_run[0].startswith("p0.4")
    # `significant` does not pass what it cannot tell apart
    assert make_plan(prob, done, criterion="significant").probes[0].state == "fail"


def test_each_configuration_at_a_probe_is_run_and_the_best_one_decides():
    prob = problem(configurations=("16x6", "8x3"))
    plan = make_plan(prob, {})
    assert {k for k in plan.to_run if k.startswith("p")} == {
        "p0.6-16x6-0", "p0.6-16x6-1", "p0.6-8x3-0", "p0.6-8x3-1"}
    curve = lambda ipc, c: table1(ipc, c) - (0.05 if c == "8x3" else 0.0)  # noqa: E731
    truth = draws(prob, curve, seed=3)
    plan, _ = run_search(prob, truth)
    assert plan.answer == grid_answer(prob, truth)


def test_a_curve_that_is_not_monotone_is_said_and_the_ipcs_between_are_probed():
    prob = problem()
    # passes at 0.5 and 0.6, fails at 0.7 and 0.8, passes again above
    shape = {0.3: .40, 0.4: .45, 0.5: .60, 0.6: .60, 0.7: .45, 0.8: .45, 0.9: .60, 1.0: .60}
    truth = draws(prob, lambda ipc, c: shape[ipc], baseline=0.5, spread=0.002)
    plan, outcomes = run_search(prob, truth, parallel_probes=2)
    assert any("not monotone" in note for note in plan.notes)
    probed = {p.ipc: p.state for p in plan.probes}
    assert probed[0.7] == "fail" and probed[0.6] == "pass"
    assert plan.answer == grid_answer(prob, truth) == 0.5
    assert plan.done


def test_early_stopped_and_failed_trials():
    prob = problem()
    baseline = {f"b{s}": Outcome(FINISHED, 0.50 + 0.01 * s) for s in SEEDS}
    stopped = {**baseline, "p0.6-16x6-0": Outcome(STOPPED_EARLY, reason="below"),
               "p0.6-16x6-1": Outcome(FINISHED, 0.6)}
    plan = make_plan(prob, stopped)
    assert plan.probes[0].state == "fail"  # an early stop is a fail: no seed added for it
    assert not any(k.startswith("p0.6") for k in plan.to_run)
    diverged = {**baseline, "p0.6-16x6-0": Outcome(FAILED, reason="diverged, stopped: nan"),
                **{f"p0.6-16x6-{s}": Outcome(FINISHED, 0.6) for s in SEEDS[1:]}}
    assert make_plan(prob, diverged).probes[0].state == "fail"  # as the report judges it
    crashed = {**baseline, **{f"p0.6-16x6-{s}": Outcome(FAILED) for s in SEEDS}}
    plan = make_plan(prob, crashed)
    assert plan.probes[0].state == "unjudgeable" and "cannot be judged" in plan.notes[0]
    nothing = {f"b{s}": Outcome(FAILED) for s in SEEDS}
    assert make_plan(prob, nothing).state == "no-baseline"


def test_describe_says_the_answer_and_what_was_saved():
    prob = problem()
    plan, _ = run_search(prob, draws(prob, table1))
    lines = describe(compact({"label": "cifar10, podd", **plan.summary()}))
    assert lines[0] == (f"cifar10, podd: {plan.answer:g} IPC is the lowest at which the poster "
                        f"beats the baseline ({plan.bracket[0]:g} IPC fails below it)")
    assert lines[-1].endswith(f"of the grid's 27 trials run ({27 - plan.trials_run} not "
                              f"needed)")


def test_search_cost_is_the_planner_run_on_made_up_outcomes():
    cost = search_cost(problem())
    assert cost.grid == 27
    assert 3 + 2 * 3 <= cost.expected < 27 / 2  # the baseline and about log2(9) probes
    assert cost.worst_monotone == 3 + 3 * 4  # 4 probes, every seed each
    assert search_cost(problem(), parallel_probes=2).expected > cost.expected


def test_the_sweeps_searches_and_the_axes_a_search_holds():
    """One search per data set, schedule and poster method, each with its schedule's
    baseline; `search_axes: [ipc]` holds the other poster axes at their first value."""
    from orchestrator.search_problems import SearchSpecError, search_problems
    from orchestrator.sweep import PlannedTrial
    from podd_engine.config import make_config

    def trial(**settings):
        return PlannedTrial(make_config("cpu-small", dataset="digits", **settings).canonical(),
                            {})

    trials = [trial(method="rat-bptt", ipc=1.0, seed=s, steps=st) for s in (0, 1)
              for st in (100, 200)]
    trials += [trial(ipc=i, patch_grid=g, seed=s, steps=st) for i in (0.5, 1.0)
               for g in ("16x6", "8x3") for s in (0, 1) for st in (100, 200)]
    problems = search_problems(trials, [0, 1])
    assert sorted(p.label for p in problems) == ["digits, podd, steps 100",
                                                 "digits, podd, steps 200"]
    for p in problems:  # each with its own schedule's baseline, and both patch grids
        steps = {t.config.steps for t in trials if t.key in {c.key for c in p.baseline}}
        assert len(p.baseline) == 2 and len(steps) == 1
        assert p.configurations(0.5) == ["16x6 patches, poco order, fixed labels",
                                         "8x3 patches, poco order, fixed labels"]
    held = search_problems(trials, [0, 1], {"patch_grid": "16x6"})
    assert all(p.configurations(0.5) == ["16x6 patches, poco order, fixed labels"]
               for p in held)
    with pytest.raises(SearchSpecError, match="needs the baseline at every schedule"):
        search_problems([t for t in trials if t.config.steps == 200 or
                         t.config.method == "podd"], [0, 1])


def test_the_searcher_and_the_launchs_summary_decide_alike():
    """What became of a trial is decided by one rule (`search.outcome_of`) as the search goes
    (the Tune searcher, on Tune's calls) and at its end (the launch's summary, from Tune's
    `Result`s): a NaN accuracy or a divergence fails the configuration, a crash fails nothing,
    an evaluation the scheduler stopped the trial at is an early stop, and a trial a stop or
    Ctrl-C ended is still running."""
    import math

    from ray.tune import Result

    from orchestrator.protocol import CHECKPOINT, DIVERGED, ERROR, EVAL, FINAL, STOPPED, report
    from orchestrator.trial_outcome import CRASHED, NAN_ACCURACY, NO_ACCURACY
    from orchestrator.search_tune import LowestPassingSearcher, search_summary
    from orchestrator.sweep import load_sweep

    sweep = load_sweep("sweeps/ipc_search_digits.yaml")
    (prob,) = sweep.search_problems()
    ipc, other = prob.ipcs[len(prob.ipcs) // 2], prob.ipcs[-1]
    posters = [c.key for c in prob.posters if c.ipc == ipc]  # seeds 0, 1, 2
    others = [c.key for c in prob.posters if c.ipc == other]
    last_words = {  # key -> (the trial's last report, Tune's error, what became of it)
        prob.baseline[0].key: (report(FINAL, 100, {"test_accuracy": 0.80}), None, FINISHED),
        prob.baseline[1].key: (report(FINAL, 100, {"test_accuracy": 0.81}), None, FINISHED),
        prob.baseline[2].key: (report(FINAL, 100, {}), None, NO_ACCURACY),
        # two seeds far above the baseline: the NaN one alone fails their configuration
        posters[0]: (report(FINAL, 100, {"test_accuracy": math.nan}), None, NAN_ACCURACY),
        posters[1]: (report(FINAL, 100, {"test_accuracy": 0.99}), None, FINISHED),
        posters[2]: (report(FINAL, 100, {"test_accuracy": 0.98}), None, FINISHED),
        others[0]: (report(DIVERGED, 40, **{ERROR: "diverged, stopped: nan loss"}),
                    RuntimeError("and then it crashed"), "diverged, stopped: nan loss"),
        others[1]: (report(CHECKPOINT, 25), RuntimeError("worker died"), CRASHED),
        others[2]: (report(FINAL, 100, {"test_accuracy": 0.99}), None, FINISHED),
    }
    stopped, interrupted = [c.key for c in prob.posters if c.ipc not in (ipc, other)][:2]
    last_words[stopped] = (report(EVAL, 50, {"test_accuracy": 0.1}), None, STOPPED_EARLY)
    last_words[interrupted] = (report(STOPPED, 60), None, None)

    searcher = LowestPassingSearcher([prob])
    for i, (key, (last, error, _)) in enumerate(last_words.items()):
        searcher.handed[str(i)] = key
        if key == stopped:
            searcher.stop_reasons[key] = "stopped early at outer step 50"
        searcher.on_trial_complete(str(i), last, error=error is not None)
    results = [(key, Result(metrics={**last, "config": {"trial": key}}, checkpoint=None,
                            error=error, path="")) for key, (last, error, _) in last_words.items()]
    (summary,) = search_summary(sweep, results)["searches"]
    (live,) = searcher.summary()["searches"]

    for key, (_, _, became) in last_words.items():
        outcome = searcher.outcomes.get(key)
        if became is None:
            assert outcome is None, key  # it resumes with the sweep
        elif became in (FINISHED, STOPPED_EARLY):
            assert outcome.state == became, key
        else:
            assert (outcome.state, outcome.reason) == (FAILED, became), key
    assert searcher.outcomes[prob.baseline[0].key].accuracy == 0.80
    probes = {p["ipc"]: p for p in live["probes"]}
    assert probes[ipc]["state"] == "fail" and probes[ipc]["failed"] == 1  # on its NaN seed
    assert probes[other]["state"] == "fail" and probes[other]["failed"] == 2  # on the diverged
    assert live["baseline"]["runs"] == 2  # the seed without an accuracy is not the baseline's
    assert summary == compact({"label": prob.label, "dataset": prob.dataset, **live})
