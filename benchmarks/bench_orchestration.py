"""Orchestration overhead of `launch`: Ray start, scheduling, checkpoints and MLflow logging per
trial, with a trivially short engine config (digits, 2 outer steps, 1 evaluation network).

    python benchmarks/bench_orchestration.py --trials 20 --concurrent 2 \
        --json docs/results/orchestration.json

overhead per trial = (launch wall time - sum of the trials' own engine time / concurrency)
                     / trials
The engine time is what each trial's `podd_engine.distill` measured itself (recorded in MLflow
as `trial_seconds`), so everything else (Ray, Tune, checkpoints, MLflow) counts as overhead,
including the fixed start-up costs, which are also reported on their own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SPEC = """name: overhead
dataset: digits
method: podd
ipc: 1.0
patch_grid: 4x2
class_order: identity
seeds: {seeds}
settings: {{width: 8, steps: 2, total_inner_steps: 4, window: 2, distill_batch: 16,
           real_batch: 64, real_chunk: 64, eval_models: 1, eval_steps: [10]}}
resources: {{cpu: 1}}
max_concurrent: {concurrent}
checkpoint_every: 1
log_every: 1
storage: {folder}/ray
tracking_uri: sqlite:///{folder}/mlflow.db
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = parser.parse_args()

    import ray
    from mlflow import MlflowClient

    from orchestrator.sweep import load_sweep
    from orchestrator.tune import launch
    from podd_engine.data import create_dataset

    with tempfile.TemporaryDirectory(prefix="podd-overhead-") as folder:
        spec = Path(folder) / "overhead.yaml"
        spec.write_text(SPEC.format(seeds=list(range(args.trials)),
                                    concurrent=args.concurrent, folder=folder))
        create_dataset("digits")  # cached, as after `podd-sweep datasets prepare`
        sweep = load_sweep(spec, dataset_info=create_dataset)

        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.concurrent, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        outcome = launch(sweep, verbose=0)
        wall = time.perf_counter() - start
        ray.shutdown()

        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        experiment = client.get_experiment_by_name("podd-sweep")
        runs = client.search_runs([experiment.experiment_id], "tags.`podd.role` = 'trial'")
        engine = sum(r.data.metrics["trial_seconds"] for r in runs)
        finished = sum(r.info.status == "FINISHED" for r in runs)

    ideal = engine / args.concurrent
    result = {
        "benchmark": "orchestration", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "trials": args.trials, "concurrent": args.concurrent, "finished": finished,
        "mlflow_runs": len(runs), "states": outcome.counts(),
        "wall_s": round(wall, 2), "ray_start_s": round(ray_start, 2),
        "engine_s_total": round(engine, 2), "engine_s_per_trial": round(engine / args.trials, 2),
        "ideal_wall_s": round(ideal, 2),
        "overhead_s_per_trial": round((wall - ideal) / args.trials, 2),
        "overhead_s_per_trial_after_start": round((wall - ray_start - ideal) / args.trials, 2),
        "driver_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
