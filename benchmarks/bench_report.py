"""Time `podd-sweep report` over a large MLflow store.

    python benchmarks/bench_report.py --runs 10000 --store /tmp/report-bench.db \
        --json docs/results/report.jsonl

Fills a sqlite store (once; reused when it already holds the runs) with synthetic trial runs
shaped like the sweep recorder's (every engine setting as a param, about 55 params, the test
accuracy metrics and tags), through the MLflow client; then times the report in a fresh
process, the way a user runs it (`--format json`, then the default table), and the gathering
step alone in-process.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from podd_engine.config import TrialConfig


def fill(uri: str, runs: int) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from orchestrator.store import KEY_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("podd-sweep")
    experiment_id = (experiment.experiment_id if experiment else
                     client.create_experiment("podd-sweep"))
    have = len(client.search_runs([experiment_id], "tags.`podd.role` = 'trial'",
                                  max_results=runs))
    parent = client.create_run(experiment_id, run_name="bench",
                               tags={SWEEP_TAG: "bench", ROLE_TAG: "sweep"}).info.run_id
    ipcs = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    grids = ["8x3", "10x4", "12x5", "16x6", "18x7", "20x8"]
    start = time.perf_counter()
    for i in range(have, runs):
        method = "rat-bptt" if i % 50 == 0 else "podd"
        ipc = 1.0 if method == "rat-bptt" else ipcs[i % len(ipcs)]
        # two schedules, as a store that holds a long and a short sweep: each its own verdict
        config = TrialConfig(dataset="cifar10", method=method, ipc=ipc,
                             patch_grid=grids[(i // 8) % len(grids)], seed=i // 96,
                             steps=4000 if (i // 48) % 2 == 0 else 2000).canonical()
        params = {**{k: json.dumps(v) if not isinstance(v, str) else v
                     for k, v in config.to_dict().items() if v is not None},
                  "dataset_family": "cifar10", "achieved_ipc": ipc, "num_classes": 10,
                  "channels": 3, "image_size": "32x32", "poster_pixels": int(ipc * 10240),
                  "label_parameters": 0, "embedder_used": "clip", "trial_key": f"k{i}"}
        run = client.create_run(experiment_id, run_name=f"t{i}",
                                tags={SWEEP_TAG: "bench", ROLE_TAG: "trial", KEY_TAG: f"k{i}",
                                      PARENT_TAG: parent})
        accuracy = 0.3 + 0.25 * ipc + 0.01 * ((i * 7919) % 13 - 6) / 6
        client.log_batch(run.info.run_id,
                         params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric("test_accuracy", accuracy, 0, 40000),
                                  Metric("test_accuracy_std", 0.005, 0, 40000)])
        client.set_terminated(run.info.run_id, "FINISHED")
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} runs ({time.perf_counter() - start:.0f} s)", file=sys.stderr)


def time_report(uri: str, output_format: str) -> tuple[subprocess.CompletedProcess, float]:
    """`podd-sweep report --dataset cifar10` in a fresh process, as a user runs it, and its
    wall time from process start to exit."""
    cli = str(Path(sys.executable).with_name("podd-sweep"))
    start = time.perf_counter()
    done = subprocess.run([cli, "report", "--dataset", "cifar10", "--tracking-uri", uri,
                           "--format", output_format], capture_output=True, text=True)
    return done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--store", type=Path, default=Path("/tmp/podd-report-bench.db"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    uri = f"sqlite:///{args.store.resolve()}"
    fill(uri, args.runs)

    done, wall = time_report(uri, "json")
    schedules = json.loads(done.stdout)["datasets"][0]["schedules"] if done.stdout else []
    table, table_wall = time_report(uri, "table")  # the default: what a user sees

    from orchestrator.runs import gather_runs
    start = time.perf_counter()
    gathered = gather_runs(uri, "podd-sweep")
    gather = time.perf_counter() - start
    result = {
        "benchmark": "report", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()})",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "runs": gathered.runs.num_rows, "exit_code": done.returncode,
        "report_wall_s": round(wall, 2), "report_table_wall_s": round(table_wall, 2),
        "table_exit_code": table.returncode, "gather_in_process_s": round(gather, 2),
        "schedules": len(schedules),
        "verdict_states": [x["verdict"]["state"] for x in schedules],
        "verdicts": [x["verdict"]["message"] for x in schedules] or done.stderr[-300:],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
