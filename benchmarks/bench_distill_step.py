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
from common import (add_step_arguments, malloc_env, paper_trial, peak_gpu_gib, peak_rss_gib,
                    reset_peak_memory, synchronize)

from podd_engine.cuda_graphs import StepGraphs, cuda_graphs_supported
from podd_engine.models import reinitialize
from podd_engine.inner import AdamState, InnerBatch, InnerSchedule, SyntheticSet
from podd_engine.rat_bptt import draw_plan, meta_gradient
from podd_engine.preprocess import AugmentationDraw, draw_augmentation


def extraction_seconds(synthetic: SyntheticSet, poster: torch.Tensor, labels: torch.Tensor,
                       batch: int, augment: bool, repeats: int = 50) -> float:
    """Forward + backward of cutting one batch of patches and computing their labels (and,
    with `augment`, the flip/rotate augmentation too). On CUDA the work is captured in a CUDA
    graph and replayed, as the engine's inner steps are, so launch overhead is not counted."""
    generator = torch.Generator().manual_seed(0)
    poster = poster.detach().requires_grad_(True)
    labels = labels.detach().requires_grad_(synthetic.labels.mode == "learned")
    wrt = [poster] + ([labels] if labels.requires_grad else [])
    strategy = "flip_rotate" if augment else "none"

    def draw() -> InnerBatch:
        idx = torch.randperm(synthetic.geometry.num_patches, generator=generator)[:batch]
        augmentation = draw_augmentation(batch, strategy, generator)
        return InnerBatch(idx.sort().values.to(poster.device),
                          AugmentationDraw(augmentation.op,
                                           augmentation.values.to(poster.device)))

    def forward_backward(inner: InnerBatch) -> None:
        images, targets = synthetic.batch(poster, labels, inner)
        torch.autograd.grad(images.sum() + targets.sum(), wrt)

    if poster.device.type == "cuda":
        inner = draw()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward_backward(inner)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward_backward(inner)
        run = graph.replay
    else:
        def run() -> None:
            forward_backward(draw())
    synchronize(poster.device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize(poster.device)
    return (time.perf_counter() - start) / repeats


def write_profile(one_step, device: torch.device, path: str) -> None:
    """One step under torch.profiler: the busiest ops, and on a GPU how much of the step's wall
    time the GPU was busy (a low share means the step is bound by kernel launches)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = one_step()
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        if device.type == "cuda":
            busy = sum(e.self_device_time_total for e in averages) / 1e6
            f.write(f"wall {wall:.3f} s, GPU busy {busy:.3f} s ({busy / wall:.0%})\n")
        f.write(averages.table(sort_by=sort, row_limit=30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--real-chunk", type=int, default=500)
    p.add_argument("--labels", default="fixed")
    p.add_argument("--unroll", default="recompute", choices=["recompute", "store"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run every inner step eagerly (default: replay CUDA graphs)")
    p.add_argument("--profile", metavar="FILE",
                   help="also profile one step (torch.profiler) and write its op table to FILE")
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
    graphs = None
    if args.cuda_graphs and cuda_graphs_supported(trial.device, args.precision):
        graphs = StepGraphs(model, synthetic, schedule, labels_learned, trial.poster,
                            trial.labels.array)

    def one_step() -> float:
        reinitialize(model, generator)
        plan = draw_plan(trial.geometry.num_patches, len(real_x), schedule, generator,
                         trial.device, curriculum_start=args.curriculum_start)
        start = time.perf_counter()
        meta_gradient(model, AdamState.fresh(model), synthetic, trial.poster, trial.labels.array,
                      real_x, real_y, schedule, plan, unroll=args.unroll,
                      real_chunk=args.real_chunk, precision=args.precision,
                      learn_labels=labels_learned, graphs=graphs)
        synchronize(trial.device)
        return time.perf_counter() - start

    baseline = peak_rss_gib()
    one_step()  # warm-up
    reset_peak_memory(trial.device)
    gpu_before = peak_gpu_gib(trial.device)
    times = [one_step() for _ in range(args.steps)]
    peak = peak_rss_gib()
    gpu_peak = peak_gpu_gib(trial.device)
    if args.profile:
        write_profile(one_step, trial.device, args.profile)
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
        "peak_gpu_gib": None if gpu_peak is None else round(gpu_peak, 3),
        "gpu_growth_during_steps_gib": None if gpu_peak is None else round(gpu_peak - gpu_before, 3),
        "gpu": torch.cuda.get_device_name(trial.device) if trial.device.type == "cuda" else None,
        "extraction_share": round(per_batch * inner_batches / step, 4),
        "extraction_and_augmentation_share": round(per_batch_augmented * inner_batches / step, 4),
        "poster_size": list(trial.geometry.poster_size),
        "cuda_graphs": graphs is not None,
        "malloc_env": malloc_env(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
