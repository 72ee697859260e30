"""What a sweep will cost, before it starts: per trial the outer steps, the inner and
evaluation work, and an estimated time on the device it would run on; the sweep's total.

The estimate is a work count turned into seconds by constants fitted to measured figures
(docs/benchmarks.md, "Cost estimate"; `python benchmarks/cost_model.py` refits them and prints
each figure's error). Work is counted in image passes through the ConvNet:

    per outer step   b * (2 * mean curriculum start + 6 * window) + 3 * real_batch
    evaluation       models * last eval step * 2 * eval batch + models * eval points * test set

(b: the inner batch, min(distill_batch, the poster's patches); an inner step is a forward and
a backward pass, an unrolled step with its meta-gradient about three times that, a real image
a forward pass and a backward pass to the poster.) Seconds = a fixed setup time + k *
(width / 32) ** a * (image pixels / 32 x 32) * passes, per CPU core or per GPU (the pixel
factor is an assumption: every fitted figure is of 32 x 32 images). The CPU constants fit 13 fidelity-study
trials and 3 step timings within 35 %; the GPU ones (an H100) fit two step timings within 5 %
but miss the one measured evaluation block by 27 %: with three figures behind them, read
them as +-50 %.
"""

from __future__ import annotations

from dataclasses import dataclass

# device -> (k seconds per image pass at width 32, width exponent, setup seconds, figures)
MODELS = {
    "cpu": (3.89e-4, 1.34, 40.0, "the dev VM's CPU figures (2-core x86, torch 2.14), "
                                 "per core, +-35 %"),
    "cuda": (6.66e-6, 0.5, 20.0, "three H100 figures (CUDA graphs on), +-50 %"),
}
TEST_IMAGES = 10_000  # a test set's size; each evaluation point classifies it once


@dataclass(frozen=True)
class TrialCost:
    outer_steps: int
    inner_steps: str  # "window/T", e.g. "60/200"
    eval_work: str  # "models x last step", e.g. "8 x 2000"
    passes: float  # image passes through the network, distillation + evaluation
    seconds: float
    device: str  # cpu | cuda


def _mean_start(config) -> float:
    # the curriculum start is drawn uniformly from 0 .. T - window (per step or per epoch)
    return max(0, config.total_inner_steps - config.window) / 2


def trial_cost(trial, *, gpus: float, cpus: float) -> TrialCost:
    """The work and estimated seconds of one planned trial on `gpus` GPUs or `cpus` cores."""
    c = trial.config
    images = trial.images or c.distill_batch
    batch = min(c.distill_batch, images)
    per_step = batch * (2 * _mean_start(c) + 6 * c.window) + 3 * c.real_batch
    eval_batch = min(c.eval_batch or c.distill_batch, images)
    last = max(c.eval_steps) if c.eval_steps else 0
    evaluations = 1 + (c.steps // c.eval_every if c.eval_every else 0)
    per_eval = c.eval_models * (last * 2 * eval_batch + len(c.eval_steps) * TEST_IMAGES)
    passes = c.steps * per_step + evaluations * per_eval
    device = "cuda" if gpus > 0 else "cpu"
    k, exponent, setup, _ = MODELS[device]
    # the trial's share of the device: a fraction of a GPU, or its cores (perfect scaling
    # assumed; the figures are per core and per whole GPU)
    share = max(gpus if device == "cuda" else cpus, 1e-6)
    # the constants were fitted on 32 x 32 images; a pass costs about its pixels
    pixels = (trial.image_pixels or 32 * 32) / (32 * 32)
    seconds = setup + k * (c.width / 32) ** exponent * passes * pixels / share
    return TrialCost(c.steps, f"{c.window}/{c.total_inner_steps}",
                     f"{c.eval_models} x {last}", passes, seconds, device)


@dataclass(frozen=True)
class SweepCost:
    trials: list[TrialCost]
    concurrent: int | None  # at most this many at once (None: as many as fit)

    @property
    def trial_hours(self) -> float:
        return sum(t.seconds for t in self.trials) / 3600

    def wall_hours(self, slots: int) -> float:
        """A lower bound on the wall time with `slots` trials at once (longest first)."""
        lanes = [0.0] * max(1, slots)
        for t in sorted(self.trials, key=lambda t: -t.seconds):
            lanes[lanes.index(min(lanes))] += t.seconds
        return max(lanes) / 3600

    def source(self) -> str:
        devices = sorted({t.device for t in self.trials})
        return "; ".join(MODELS[d][3] for d in devices)


def sweep_cost(sweep) -> SweepCost:
    resources = sweep.spec.resources
    return SweepCost([trial_cost(t, gpus=resources.gpu, cpus=resources.cpu)
                      for t in sweep.trials], sweep.spec.max_concurrent)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
