"""Seconds per RaT-BPTT outer step and peak memory at the CIFAR-10 paper geometry.

    python benchmarks/bench_distill_step.py --window 10 --total-inner-steps 40 \
        --curriculum-start 27 --real-batch 500 --unroll recompute

The poster geometry is the official CIFAR-10 one (5x2 classes, 16x6 patches, 96 patches per
inner step, ConvNet width 128, 0.9 IPC by default). The curriculum start is fixed so that every
measured step does the same work (c plain steps + window unrolled steps). Peak memory is the
process's maximum RSS (ru_maxrss) and its growth during the measured steps; the glibc allocator
settings in the environment (MALLOC_*) are recorded with the result. Also reported: the share of
a step spent cutting patches and computing their labels (forward and backward), alone and
together with the flip/rotate augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from common import add_step_arguments, malloc_env, paper_trial, peak_rss_gib

from podd_engine.models import reinitialize
from podd_engine.rat_bptt import (AdamState, InnerBatch, InnerSchedule, SyntheticSet, draw_plan,
                                  meta_gradient)
from podd_engine.preprocess import draw_augmentation


def extraction_seconds(synthetic: SyntheticSet, poster: torch.Tensor, labels: torch.Tensor,
                       batch: int, augment: bool, repeats: int = 50) -> float:
    """Forward + backward of cutting one batch of patches and computing their labels (and,
    with `augment`, the flip/rotate augmentation too)."""
    generator = torch.Generator().manual_seed(0)
    poster = poster.detach().requires_grad_(True)
    labels = labels.detach().requires_grad_(synthetic.labels.mode == "learned")
    strategy = "flip_rotate" if augment else "none"
    start = time.perf_counter()
    for _ in range(repeats):
        idx = torch.randperm(synthetic.geometry.num_patches, generator=generator)[:batch]
        inner = InnerBatch(idx.sort().values, draw_augmentation(batch, strategy, generator))
        images, targets = synthetic.batch(poster, labels, inner)
        (images.sum() + targets.sum()).backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--real-chunk", type=int, default=500)
    p.add_argument("--labels", default="fixed")
    p.add_argument("--unroll", default="recompute", choices=["recompute", "store"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="apply podd_engine.allocator.tune_glibc_malloc() in-process (what the "
                        "CLI and sweep trials do) instead of relying on MALLOC_* variables")
    args = p.parse_args()
    if args.malloc_tuning:
        from podd_engine.allocator import tune_glibc_malloc
        assert tune_glibc_malloc(), "glibc malloc tuning could not be applied"

    trial = paper_trial(args, labels=args.labels, real_chunk=args.real_chunk, unroll=args.unroll,
                        precision=args.precision, device=args.device)
    config = trial.config
    model = trial.make_model()
    synthetic = SyntheticSet(trial.geometry, trial.labels)
    schedule = InnerSchedule(config.total_inner_steps, config.window, config.distill_batch,
                             config.inner_lr)
    generator = torch.Generator().manual_seed(0)
    real_x = trial.train_images[: args.real_batch]
    real_y = trial.dataset.train_labels[: args.real_batch].to(trial.device)
    labels_learned = trial.labels.mode == "learned"

    def one_step() -> float:
        reinitialize(model, generator)
        plan = draw_plan(trial.geometry.num_patches, len(real_x), schedule, generator,
                         trial.device, curriculum_start=args.curriculum_start)
        start = time.perf_counter()
        meta_gradient(model, AdamState.fresh(model), synthetic, trial.poster, trial.labels.array,
                      real_x, real_y, schedule, plan, unroll=args.unroll,
                      real_chunk=args.real_chunk, precision=args.precision,
                      learn_labels=labels_learned)
        if trial.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    baseline = peak_rss_gib()
    one_step()  # warm-up
    times = [one_step() for _ in range(args.steps)]
    peak = peak_rss_gib()
    per_batch = extraction_seconds(synthetic, trial.poster, trial.labels.array,
                                   config.distill_batch, augment=False)
    per_batch_augmented = extraction_seconds(synthetic, trial.poster, trial.labels.array,
                                             config.distill_batch, augment=True)
    inner_batches = args.curriculum_start + 2 * args.window  # recompute replays the window
    if args.unroll == "store":
        inner_batches = args.curriculum_start + args.window
    step = min(times)
    print(json.dumps({
        "settings": {k: v for k, v in vars(args).items()},
        "seconds_per_outer_step": round(step, 3),
        "seconds_per_outer_step_all": [round(t, 3) for t in times],
        "peak_rss_gib": round(peak, 2),
        "rss_growth_during_steps_gib": round(peak - baseline, 2),
        "extraction_share": round(per_batch * inner_batches / step, 4),
        "extraction_and_augmentation_share": round(per_batch_augmented * inner_batches / step, 4),
        "poster_size": list(trial.geometry.poster_size),
        "malloc_env": malloc_env(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
