"""C1 (overlap helps) at the paper's network width, on one GPU, inside 12 minutes.

    python benchmarks/fidelity/gpu_c1.py --dataset parquet:.data/cifar10-jpeg --out $OUT
    python benchmarks/fidelity/gpu_c1.py --tiny --out /tmp/c1      # the same path on a CPU

At 1 IPC on CIFAR-10, PoDD's 96 overlapping patches (16x6) against the RaT-BPTT baseline's 10
non-overlapping images, both with the paper preset (ConvNet width 128, batch 96, real batch
5000, fixed labels) at two inner horizons, window 10 of 40 and the paper's 60 of 200, for a
few hundred outer steps, one seed, 2 evaluation networks. Cheapest cell first; each trial's
result is written as soon as it ends (`c1-gpu.jsonl` under --out), so a run cut short still
returns what it finished. The class order is the MiniLM PoCO order of the CPU study, given
explicitly (the GPU image has no MiniLM package and no CLIP weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from podd_engine.config import make_config
from podd_engine.data import create_dataset
from podd_engine.errors import UserError
from podd_engine.pipeline import distill, resolve_device
from run import OneLineParser  # benchmarks/fidelity/run.py: bad arguments are one line

# PoCO with MiniLM on CIFAR-10's names (what the CPU study's runs used), as rows of classes
MINILM_POCO_ORDER = [[0, 1, 7, 4, 6], [9, 5, 3, 2, 8]]
CELLS = [(40, 10), (200, 60)]  # (total inner steps T, window)
METHODS = [("rat-bptt", {}), ("podd", {"patch_grid": "16x6", "order": "given",
                                       "order_grid": MINILM_POCO_ORDER})]


def trial_settings(args: argparse.Namespace, total: int, window: int) -> dict:
    if args.tiny:  # seconds on a CPU: the same code path, not a measurement
        return dict(width=8, steps=2, total_inner_steps=4, window=2, real_batch=64,
                    real_chunk=64, eval_models=1, eval_steps=[10], device="cpu")
    return dict(steps=args.steps, total_inner_steps=total, window=window, eval_models=2,
                eval_steps=[300, 1000, 2000], device=args.device)


def main() -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="parquet:../shared/datasets/cifar10-jpeg")
    parser.add_argument("--steps", type=int, default=300, help="outer steps per trial")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a CPU check of the script itself")
    args = parser.parse_args()
    try:  # every trial's settings checked, and the data read, before a minute is spent
        dataset = create_dataset(args.dataset)
        trials = [(make_config("paper", data_family=dataset.family, dataset=args.dataset,
                               method=method, ipc=1, seed=0,
                               **trial_settings(args, total, window), **extra), method)
                  for total, window in CELLS for method, extra in METHODS]
        resolve_device(trials[0][0].device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "c1-gpu.jsonl"
    for config, method in trials:
        start = time.perf_counter()
        result = distill(config, dataset)
        summary = {k: v for k, v in result.summary().items() if k != "class_order"}
        row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.node(), "method": method, "total_inner_steps":
               config.total_inner_steps, "window": config.window, "width": config.width,
               "steps": config.steps, "real_batch": config.real_batch,
               "seconds": round(time.perf_counter() - start, 1), "config_key": config.key(),
               **{k: v for k, v in summary.items() if k.startswith(("test_accuracy",
                                                                    "eval_models"))},
               # which code, torch build, GPU (TF32 or not) and data gave the figure
               **{k: summary[k] for k in ("engine_revision", "engine_commit",
                                          "torch_version", "device_used", "data_hash")}}
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
