"""What the step benchmarks share: the settings of a measured outer step and the trial at the
CIFAR-10 paper geometry (5x2 classes, 16x6 patches, 96 patches per inner step)."""

from __future__ import annotations

import argparse
import os
import resource

import torch

from podd_engine import make_config
from podd_engine.pipeline import Trial, build_trial


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="parquet:../shared/datasets/cifar10-jpeg")
    parser.add_argument("--ipc", type=float, default=0.9)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--total-inner-steps", type=int, default=40)
    parser.add_argument("--curriculum-start", type=int, default=27,
                        help="fixed, so every measured step does the same work")
    parser.add_argument("--real-batch", type=int, default=500)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="measured outer steps (after 1 warm-up)")


def paper_trial(args: argparse.Namespace, **settings) -> Trial:
    config = make_config("paper", dataset=args.dataset, data_family="cifar10",
                         ipc=args.ipc, order="identity", width=args.width, window=args.window,
                         total_inner_steps=args.total_inner_steps, real_batch=args.real_batch,
                         **settings)
    return build_trial(config)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_gib(device: torch.device) -> float | None:
    """Peak memory PyTorch allocated on the GPU since the last reset (None on the CPU): the
    GPU counterpart of peak RSS, the same measure for every engine."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def malloc_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
