"""What `search: lowest-passing` saves against the grid, and whether it finds the same answer.

    python benchmarks/bench_search.py cpu        # real sweeps: the grid and the search, same seeds
    python benchmarks/bench_search.py simulate   # the paper's four data sets, trials simulated

`cpu` runs a CPU-sized search spec (sweeps/ipc_search_digits.yaml) twice into one fresh store:
as a grid (`search=grid`, every trial) and as the search, with the same trials and seeds. A
trial is seeded and deterministic on the CPU, so the two runs of a trial agree to the last
digit; the answers are read back through `podd-sweep report --sweep`. Trial-steps are the
outer steps the trials ran, summed (a trial stopped early counts the steps it reached).

`simulate` replaces trials by draws: each PoDD trial's accuracy ~ N(mean, std) of the paper's
Table 1 at its IPC, the baseline's ~ N of Table 2 (the paper's spreads are over evaluation
networks, not seeds: a stand-in, said so in the output), for sweeps/ipc_grid.yaml's
candidates (IPC 0.3 .. 1.0, 3 seeds). On the same draws it runs the grid (every trial, judged
as `report` judges) and the planner, and counts trials and GPU-hours (the cost model's H100
estimate of each trial at the paper's settings; early stopping is not simulated: Table 1 has
no accuracy curves).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.search import Candidate, SearchProblem, make_plan  # noqa: E402
from orchestrator.trial_outcome import FINISHED, Outcome  # noqa: E402
from orchestrator.verdict import Baseline, row_passes  # noqa: E402


def stamp(command: str) -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} ({platform.machine()})", "command": command}


# --------------------------------------------------------------------------------------------
# Real sweeps on the CPU
# --------------------------------------------------------------------------------------------

def launch(spec: Path, folder: Path, name: str, *overrides: str) -> float:
    cli = str(Path(sys.executable).with_name("podd-sweep"))
    started = time.time()
    done = subprocess.run([cli, "launch", str(spec), "--quiet", f"name={name}",
                           f"storage={folder / 'ray'}",
                           f"tracking_uri=sqlite:///{folder / 'bench.db'}", *overrides],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"launch {name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.time() - started


def sweep_facts(folder: Path, name: str) -> dict:
    from orchestrator.store import run_records

    uri = f"sqlite:///{folder / 'bench.db'}"
    runs = run_records(uri, "podd-sweep", sweep=name, peaks=("loss",))
    cli = str(Path(sys.executable).with_name("podd-sweep"))
    report = subprocess.run([cli, "report", "--tracking-uri", uri, "--sweep", name, "--format",
                             "json"], capture_output=True, text=True, cwd=ROOT)
    (dataset,) = json.loads(report.stdout)["datasets"]
    (schedule,) = dataset["schedules"]
    return {"lowest_ipc": schedule["verdict"]["lowest_ipc"],
            "verdict": schedule["verdict"]["message"],
            "trials": len(runs),
            "stopped_early": sum("podd.stopped_early" in r.tags for r in runs),
            "trial_steps": sum(r.steps.get("loss", 0) for r in runs),
            "searches": dataset["searches"]}


def run_cpu(spec: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="podd-bench-search-"))
    grid_s = launch(spec, folder, "bench-grid", "search=grid", "early_stop=null")
    search_s = launch(spec, folder, "bench-search")
    grid, search = sweep_facts(folder, "bench-grid"), sweep_facts(folder, "bench-search")
    return {"benchmark": "search-cpu", "spec": str(spec.relative_to(ROOT)),
            "grid": {**grid, "wall_s": round(grid_s)},
            "search": {**search, "wall_s": round(search_s)},
            "same_answer": grid["lowest_ipc"] == search["lowest_ipc"],
            "trial_steps_ratio": round(search["trial_steps"] / grid["trial_steps"], 3),
            "trials_ratio": round(search["trials"] / grid["trials"], 3)}


# --------------------------------------------------------------------------------------------
# The paper's four data sets, simulated
# --------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)


def paper_problem(name: str) -> tuple[SearchProblem, dict[str, tuple[float, float]]]:
    """The candidates of sweeps/ipc_grid.yaml for a benchmark, with each key's (mean, std)."""
    from podd_engine.benchmarks import BENCHMARKS

    bench = BENCHMARKS[name]
    baseline = tuple(Candidate(f"b{s}", "baseline", 1.0, "", s) for s in SEEDS)
    posters = tuple(Candidate(f"p{ipc}-{s}", "poster", ipc, "paper", s)
                    for ipc in sorted(bench.podd) for s in SEEDS)
    truth = {c.key: bench.rat_bptt_1ipc for c in baseline}
    truth |= {c.key: bench.podd[c.ipc] for c in posters}
    return SearchProblem(baseline, posters, SEEDS, name), truth


def gpu_hours(name: str) -> dict[str, float]:
    """The cost model's H100 hours of one PoDD and one baseline trial at the paper's settings."""
    from orchestrator.cost import trial_cost
    from orchestrator.sweep import PlannedTrial
    from podd_engine.benchmarks import BENCHMARKS
    from podd_engine.config import make_config, parse_grid

    bench = BENCHMARKS[name]
    podd = make_config("paper", dataset=name, ipc=1.0, eval_every=0)
    cols, rows = parse_grid(podd.patch_grid)
    base = podd.replace(method="rat-bptt").canonical()
    return {"poster": trial_cost(PlannedTrial(podd, {}, images=cols * rows), gpus=1,
                                 cpus=4).seconds / 3600,
            "baseline": trial_cost(PlannedTrial(base, {}, images=bench.num_classes), gpus=1,
                                   cpus=4).seconds / 3600}


def grid_answer(problem: SearchProblem, draws: dict[str, Outcome]) -> float | None:
    accuracies = [draws[c.key].accuracy for c in problem.baseline]
    baseline = Baseline(statistics.fmean(accuracies), statistics.stdev(accuracies), "", 3)
    for ipc in problem.ipcs:
        values = [draws[c.key].accuracy for c in problem.posters if c.ipc == ipc]
        row = {"accuracy": statistics.fmean(values), "accuracy_std": statistics.stdev(values),
               "runs": len(values)}
        if row_passes(row, baseline, "beats"):
            return ipc
    return None


def search_run(problem: SearchProblem, draws: dict[str, Outcome]) -> tuple[float | None, set]:
    outcomes: dict[str, Outcome] = {}
    while (plan := make_plan(problem, outcomes)).to_run:
        outcomes |= {k: draws[k] for k in plan.to_run}
    return plan.answer, set(outcomes)


def simulate(draws_per_set: int, seed: int) -> dict:
    from podd_engine.benchmarks import BENCHMARKS

    rng = random.Random(seed)
    out = {}
    for name in BENCHMARKS:
        problem, truth = paper_problem(name)
        hours = gpu_hours(name)

        def trial_hours(keys) -> float:
            return sum(hours["baseline" if k.startswith("b") else "poster"] for k in keys)

        grid_hours = trial_hours(problem.keys)
        agree, trials, spent, answers = 0, [], [], []
        for _ in range(draws_per_set):
            draws = {k: Outcome(FINISHED, rng.gauss(*truth[k]) / 100) for k in problem.keys}
            answer, ran = search_run(problem, draws)
            grid = grid_answer(problem, draws)
            agree += answer == grid
            trials.append(len(ran))
            spent.append(trial_hours(ran))
            answers.append(grid)
        out[name] = {
            "grid_trials": len(problem.keys), "grid_gpu_hours": round(grid_hours, 1),
            "search_trials_mean": round(statistics.fmean(trials), 2),
            "search_trials_max": max(trials),
            "search_gpu_hours_mean": round(statistics.fmean(spent), 1),
            "gpu_hours_ratio": round(statistics.fmean(spent) / grid_hours, 3),
            "same_answer_as_grid": round(agree / draws_per_set, 3),
            "grid_answers": {str(a): answers.count(a) for a in sorted(
                set(answers), key=lambda a: -1 if a is None else a)},
            "gpu_hours_per_trial": {k: round(v, 2) for k, v in hours.items()}}
    return {"benchmark": "search-simulated", "draws_per_data_set": draws_per_set,
            "spreads": "Table 1 and 2's std (over evaluation networks) stand in for seed "
                       "spreads", "data_sets": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cpu = sub.add_parser("cpu", help="the grid and the search as real sweeps")
    cpu.add_argument("--spec", type=Path, default=ROOT / "sweeps" / "ipc_search_digits.yaml")
    cpu.add_argument("--json", type=Path, default=ROOT / "docs/results/search/cpu.jsonl")
    sim = sub.add_parser("simulate", help="the paper's four data sets, trials simulated")
    sim.add_argument("--draws", type=int, default=2000)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", type=Path, default=ROOT / "docs/results/search/simulated.json")
    args = parser.parse_args()
    command = "python benchmarks/bench_search.py " + " ".join(sys.argv[1:])
    if args.what == "cpu":
        result = {**stamp(command), **run_cpu(args.spec.resolve())}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    else:
        result = {**stamp(command), **simulate(args.draws, args.seed)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
