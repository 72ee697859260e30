"""A stand-in for the official PoDD outer step, for same-machine comparisons.

Built the way the official implementation works (docs/reference-implementation.md, section 6),
written here from that description: warm-up steps with torch.optim.Adam on a module, then the
unrolled window with `higher.innerloop_ctx(copy_initial_weights=True)` (the warm-up optimiser
state carries in), patches cut with a Python loop of slices, the whole real batch in one
forward, one backward() through everything. Used only to compare speed and memory with our
engine on the same machine under the same allocator settings; it needs `pip install higher`.

    python benchmarks/official_style_step.py --window 10 --total-inner-steps 40 \
        --curriculum-start 27 --real-batch 500
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from common import (add_step_arguments, malloc_env, paper_trial, peak_gpu_gib, peak_rss_gib,
                    reset_peak_memory, synchronize)

from podd_engine.models import reinitialize
from podd_engine.preprocess import apply_augmentation, draw_augmentation


def main() -> None:
    import higher

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    trial = paper_trial(args, device=args.device)
    config = trial.config
    geometry, labels = trial.geometry, trial.labels.array
    h, w = geometry.image_size
    positions = geometry.patch_positions.tolist()
    poster = trial.poster.clone().requires_grad_(True)
    real_x = trial.train_images[: args.real_batch]
    real_y = trial.dataset.train_labels[: args.real_batch].to(trial.device)
    net = trial.make_model()
    generator = torch.Generator().manual_seed(0)

    def crops(source: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return torch.stack([source[:, positions[k][0]:positions[k][0] + h,
                                   positions[k][1]:positions[k][1] + w] for k in indices])

    def batch(source: torch.Tensor):
        idx = torch.randperm(geometry.num_patches, generator=generator)[:config.distill_batch]
        idx = idx.sort().values.tolist()
        draw = draw_augmentation(len(idx), "flip_rotate", generator)
        return apply_augmentation(crops(source, idx), draw), labels[idx]

    def soft_ce(logits, target):
        return -(target * F.log_softmax(logits, 1)).sum(1).mean()

    def one_step() -> float:
        start = time.perf_counter()
        reinitialize(net, generator)
        optimizer = torch.optim.Adam(net.parameters(), lr=config.inner_lr)
        for _ in range(args.curriculum_start):
            x, y = batch(poster.detach())
            optimizer.zero_grad()
            soft_ce(net(x), y).backward()
            optimizer.step()
        with higher.innerloop_ctx(net, optimizer, copy_initial_weights=True) as (fnet, diffopt):
            for _ in range(args.window):
                x, y = batch(poster)
                diffopt.step(soft_ce(fnet(x), y))
            draw = draw_augmentation(len(real_x), "flip_rotate", generator)
            loss = F.cross_entropy(fnet(apply_augmentation(real_x, draw)), real_y)
            poster.grad = None
            loss.backward()
        synchronize(trial.device)
        return time.perf_counter() - start

    baseline = peak_rss_gib()
    one_step()
    reset_peak_memory(trial.device)
    gpu_before = peak_gpu_gib(trial.device)
    times = [one_step() for _ in range(args.steps)]
    peak = peak_rss_gib()
    gpu_peak = peak_gpu_gib(trial.device)
    print(json.dumps({
        "engine": "official-style (higher)", "settings": vars(args),
        "seconds_per_outer_step": round(min(times), 3),
        "seconds_per_outer_step_all": [round(t, 3) for t in times],
        "peak_rss_gib": round(peak, 2), "rss_growth_during_steps_gib": round(peak - baseline, 2),
        "peak_gpu_gib": None if gpu_peak is None else round(gpu_peak, 3),
        "gpu_growth_during_steps_gib": None if gpu_peak is None else round(gpu_peak - gpu_before, 3),
        "gpu": torch.cuda.get_device_name(trial.device) if trial.device.type == "cuda" else None,
        "malloc_env": malloc_env(),
    }, indent=2))


if __name__ == "__main__":
    main()
