"""How far `launch --dry-run`'s time estimate (orchestrator/cost.py) is from what was measured:
each figure of docs/results/cost-fit.json (whole fidelity-study trials on the dev VM, step
timings on the dev VM and an H100) against the estimate for the same settings.

    python benchmarks/cost_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.cost import MODELS, trial_cost
from orchestrator.sweep import PlannedTrial
from podd_engine.config import make_config

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "results" / "cost-fit.json"
CIFAR10 = "parquet:../shared/datasets/cifar10-jpeg"


def planned(images: int, **settings) -> PlannedTrial:
    return PlannedTrial(make_config("cpu-small", dataset=CIFAR10, **settings), {},
                        images=images)


def main() -> None:
    figures = json.loads(FIGURES.read_text())
    errors = {"cpu": [], "cuda": []}
    print("| figure | measured | estimated | error |\n|---|---|---|---|")
    for t in figures["trials"]:
        images = 96 if t["method"] == "podd" else 10
        trial = planned(images, method=t["method"], total_inner_steps=t["total_inner_steps"],
                        window=t["window"], width=t["width"])
        estimate = trial_cost(trial, gpus=0, cpus=1).seconds
        errors["cpu"].append(estimate / t["seconds"] - 1)
        print(f"| trial {t['method']} T{t['total_inner_steps']} w{t['window']} width "
              f"{t['width']} (1 core) | {t['seconds']:.0f} s | {estimate:.0f} s | "
              f"{estimate / t['seconds'] - 1:+.0%} |")
    for s in figures["steps"]:
        k, exponent, _, _ = MODELS[s["device"]]
        trial = planned(96, total_inner_steps=s["total_inner_steps"], window=s["window"],
                        width=s["width"], real_batch=s["real_batch"], steps=1, eval_models=1,
                        eval_steps=[1])
        c = trial.config
        passes = 96 * (c.total_inner_steps - c.window + 6 * c.window) + 3 * c.real_batch
        estimate = k * (c.width / 32) ** exponent * passes / s["cores"]
        errors[s["device"]].append(estimate / s["seconds_per_step"] - 1)
        print(f"| step {s['device']} T{c.total_inner_steps} w{c.window} width {c.width} "
              f"({s['cores']} {'cores' if s['device'] == 'cpu' else 'GPU'}) | "
              f"{s['seconds_per_step']:.3f} s | {estimate:.3f} s | "
              f"{estimate / s['seconds_per_step'] - 1:+.0%} |")
    for b in figures["blocks"]:
        trial = planned(96, total_inner_steps=b["total_inner_steps"], window=b["window"],
                        width=b["width"], real_batch=b["real_batch"], steps=b["steps"],
                        eval_models=b["eval_models"], eval_steps=b["eval_steps"])
        _, _, setup, _ = MODELS[b["device"]]
        estimate = trial_cost(trial, gpus=1, cpus=0).seconds - setup
        errors[b["device"]].append(estimate / b["seconds"] - 1)
        print(f"| block {b['device']}: {b['steps']} steps + 1 evaluation | {b['seconds']} s | "
              f"{estimate:.1f} s | {estimate / b['seconds'] - 1:+.0%} |")
    for device, values in errors.items():
        print(f"{device}: {len(values)} figures, largest error {max(map(abs, values)):.0%}")


if __name__ == "__main__":
    main()
