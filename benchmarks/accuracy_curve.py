"""Test accuracy as distillation goes on: one poster distilled for --steps outer steps and
evaluated every --every steps (the engine's `eval_every`), one JSON line per evaluation.

    python benchmarks/accuracy_curve.py --out docs/results/curves.jsonl --method podd --ipc 1 \
        --steps 2000 --every 250 --preset cpu-small --set eval_models=2 --set "eval_steps=[300]"

Answers "is the schedule long enough?": where a curve still rises at its last point, more outer
steps would pay; where it has flattened, they would not.
"""

from __future__ import annotations

import argparse
import json
import time

import yaml

from podd_engine import distill, make_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines file to append to")
    p.add_argument("--dataset", default="parquet:../shared/datasets/cifar10-jpeg")
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--method", default="podd")
    p.add_argument("--ipc", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrialConfig setting (values read as YAML)")
    args = p.parse_args()
    settings = {}
    for pair in args.settings:
        key, _, value = pair.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    config = make_config(args.preset, dataset=args.dataset, method=args.method, ipc=args.ipc,
                         steps=args.steps, eval_every=args.every, seed=args.seed,
                         device=args.device, **settings)
    start = time.perf_counter()
    losses: list[float] = []

    def on_eval(step, result) -> None:
        line = {"method": config.method, "ipc": config.ipc, "labels": config.labels,
                "seed": config.seed, "step": step, "test_accuracy": result.mean(),
                "test_accuracy_std": result.std(), "eval_models": len(result.accuracies),
                "recent_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                "seconds": round(time.perf_counter() - start, 1), "config": config.to_dict()}
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{config.method} ipc {config.ipc} step {step}: {100 * result.mean():.2f} % "
              f"(+- {100 * result.std():.2f}), {line['seconds']} s", flush=True)

    distill(config, on_step=lambda metrics, _: losses.append(metrics.loss), on_eval=on_eval)


if __name__ == "__main__":
    main()
