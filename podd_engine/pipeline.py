"""From a TrialConfig to a distilled, evaluated poster: the engine's one entry point.

    from podd_engine import TrialConfig, distill
    result = distill(TrialConfig(dataset="parquet:../shared/datasets/cifar10-jpeg", ipc=0.5,
                                 steps=50, width=32))
    result.evaluation.mean()

The three methods share one representation, a poster with patches and labels:
  podd         overlapping patches of a poster of about ipc x n images (PoCO layout, PoDDL);
  rat-bptt     the paper's baseline: ipc whole images per class, exactly tiled (no overlap);
  random-real  the undistilled control: PoDD's poster layout (class grid, pixel count, patches,
               PoDDL labels) filled with random real training images, not distilled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from podd_engine.config import TrialConfig, default_class_grid
from podd_engine.data import ImageDataset, create_dataset, with_declared_family
from podd_engine.errors import GeometryError, SettingError
from podd_engine.evaluate import EvalResult, evaluate_synthetic
from podd_engine.labels import PosterLabels, create_labels
from podd_engine.methods import get_method
from podd_engine.models import create_model
from podd_engine.ordering import (ClassOrdering, ClipTextEmbedder, MiniLMTextEmbedder,
                                  create_class_ordering)
from podd_engine.poster import (PosterGeometry, compose_poster, extract_patches, init_poster,
                                parse_grid)
from podd_engine.artifact import PosterArtifact, save_artifact
from podd_engine.preprocess import Preprocessing, fit_preprocessing, preprocessing_key
from podd_engine.provenance import provenance
from podd_engine.inner import InnerSchedule, SyntheticSet
from podd_engine.rat_bptt import Distiller, OuterSettings, StepMetrics


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("device cuda was asked for but no CUDA GPU is visible: use --device "
                           "cpu or auto", "device")
    return torch.device(device)


@dataclass
class Trial:
    """Everything a trial is built from, before any optimisation."""

    config: TrialConfig
    dataset: ImageDataset
    preprocessing: Preprocessing
    geometry: PosterGeometry
    ordering: ClassOrdering
    labels: PosterLabels
    poster: torch.Tensor
    device: torch.device
    train_images: torch.Tensor  # preprocessed, on the device
    test_images: torch.Tensor

    def summary(self) -> dict:
        """What the trial is, once built: geometry, labels, class order and its embedder."""
        return {"method": self.config.method, "dataset": self.dataset.name,
                "dataset_family": self.dataset.family,
                "dataset_family_source": self.dataset.family_source,
                "data_hash": self.dataset.content_hash,
                "num_classes": self.dataset.num_classes, "channels": self.dataset.channels,
                "image_size": "x".join(map(str, self.dataset.image_size)),
                "requested_ipc": self.config.ipc, **self.geometry.summary(),
                "label_mode": self.labels.mode, "label_parameters": self.labels.num_parameters,
                **self.ordering.summary(), "config_key": self.config.key(),
                **provenance(self.device)}

    def make_model(self) -> torch.nn.Module:
        c = self.config
        return create_model(c.model, channels=self.dataset.channels,
                            num_classes=self.dataset.num_classes,
                            image_size=self.dataset.image_size, width=c.width, depth=c.depth,
                            norm=c.norm).to(self.device)


@dataclass
class DistillResult:
    trial: Trial
    poster: torch.Tensor
    labels: PosterLabels
    history: list[StepMetrics] = field(default_factory=list)
    evaluation: EvalResult | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        out = {**self.trial.summary(), "steps": len(self.history),
               "seconds": round(self.seconds, 2)}
        out.pop("class_order", None)
        if self.history:
            out["final_loss"] = self.history[-1].loss
        if self.evaluation is not None:
            out.update({k: v for k, v in self.evaluation.summary().items() if k != "per_model"})
        return out


def build_geometry(config: TrialConfig, dataset: ImageDataset) -> PosterGeometry:
    class_grid = parse_grid(config.class_grid or default_class_grid(dataset.num_classes),
                            "class_grid")
    common = dict(channels=dataset.channels, image_size=dataset.image_size,
                  num_classes=dataset.num_classes)
    method = get_method(config.method)
    # a distilled set is smaller than the data: IPC (a pixel budget) is at most the data
    # set's images per class (on average, as an unbalanced set has classes of any size)
    per_class = len(dataset.train_labels) / dataset.num_classes
    if per_class and config.ipc > per_class:
        raise GeometryError(f"ipc {config.ipc:g} is more than the data set's {per_class:g} "
                            f"training images per class: choose ipc at most {per_class:g}",
                            "ipc")
    if method.geometry is not None:
        return method.geometry(config, dataset)
    if method.layout == "tiled":  # ipc images per class cell, no overlap
        h, w = dataset.image_size
        k = int(config.ipc)
        cols, rows = class_grid
        return PosterGeometry(**common, class_grid=class_grid, patch_grid=(cols * k, rows),
                              poster_size=(rows * h, cols * k * w), requested_ipc=config.ipc)
    return PosterGeometry.for_ipc(config.ipc, class_grid=class_grid,
                                  patch_grid=config.patch_grid, **common)


def real_image_poster(geometry: PosterGeometry, class_grid: torch.Tensor,
                      images: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """A poster laid out like PoDD's, each class cell holding one random training image of
    its class (resized to the cell where cells are larger than an image), cross-faded where
    cells overlap: the undistilled control at the same pixel count."""
    def real(row: int, col: int, size: tuple[int, int]) -> torch.Tensor:
        members = torch.nonzero(labels == int(class_grid[row, col])).flatten()
        pick = members[int(torch.randint(len(members), (1,), generator=generator))]
        image = images[pick.to(images.device)].float().cpu()
        if tuple(image.shape[1:]) != tuple(size):
            image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear",
                                                    align_corners=False)[0]
        return image

    return compose_poster(geometry, real)


def create_embedder(config: TrialConfig):
    if config.embedder == "minilm":
        return MiniLMTextEmbedder()
    return ClipTextEmbedder(config.clip_model, config.clip_pretrained, config.clip_weights,
                            config.clip_mode)


def build_trial(config: TrialConfig, dataset: ImageDataset | None = None,
                embedder=None) -> Trial:
    config.validate()
    if dataset is None:
        dataset = create_dataset(config.dataset, data_root=config.data_root,
                                 cache_dir=config.cache_dir, family_declared=config.family)
    elif config.family:
        dataset = with_declared_family(dataset, config.family)
    device = resolve_device(config.device)
    preprocessing = fit_preprocessing(dataset, config.preprocessing,  # the covariance on the GPU
                                      regularization=config.zca_regularization,
                                      cache_dir=config.cache_dir, device=device)
    train = preprocessing.transform(dataset.train_images).to(device)
    test = preprocessing.transform(dataset.test_images).to(device)
    geometry = build_geometry(config, dataset)
    generator = torch.Generator().manual_seed(config.seed)

    method = get_method(config.method)
    if method.uses_order:
        # PoCO needs the embedder; any other order is scored with it too when it costs no
        # download (MiniLM ships with its weights), so orders can be compared (claim C3)
        if embedder is None and (config.order == "poco" or config.embedder == "minilm"):
            embedder = create_embedder(config)
        ordering = create_class_ordering(config.order, dataset.class_names,
                                         geometry.class_grid, seed=config.seed,
                                         embedder=embedder, given=config.order_grid)
    else:  # the layout has no meaning for separate images: data-set order
        ordering = create_class_ordering("identity", dataset.class_names, geometry.class_grid)

    # tiled images get one label cell per image; a poster's learned labels, one per class cell
    label_grid = geometry.patch_grid if method.layout == "tiled" else None
    labels = create_labels(config.labels, geometry, ordering.grid, label_grid,
                           config.label_pooling).to(device)
    if method.distils:
        poster = init_poster(geometry, config.init, generator).to(device)
    else:
        poster = real_image_poster(geometry, ordering.grid, train, dataset.train_labels,
                                   generator).to(device)
    return Trial(config, dataset, preprocessing, geometry, ordering, labels, poster, device,
                 train, test)


def evaluate_poster(trial: Trial, poster: torch.Tensor, labels: PosterLabels,
                    on_model: Callable[[int, list[float]], None] | None = None) -> EvalResult:
    c = trial.config
    with torch.no_grad():
        images = extract_patches(poster.detach(), trial.geometry)
        targets = labels.patch_labels().detach()
    return evaluate_synthetic(trial.make_model, images, targets, trial.test_images,
                              trial.dataset.test_labels.to(trial.device), models=c.eval_models,
                              steps=c.eval_steps, batch_size=c.eval_batch or c.distill_batch,
                              lr=c.eval_lr or c.inner_lr, augmentation=c.augmentation,
                              seed=c.seed * 1000,
                              on_model=on_model)


def distill(
    config: TrialConfig,
    dataset: ImageDataset | None = None,
    *,
    embedder=None,
    on_start: Callable[[Trial], None] | None = None,
    on_step: Callable[[StepMetrics, Distiller], None] | None = None,
    on_eval: Callable[[int, EvalResult], None] | None = None,
    resume: dict | None = None,
    evaluate: bool = True,
) -> DistillResult:
    """Distil `config.dataset` (or `dataset`) into a poster and evaluate it.

    on_start(trial) is called once the trial is built (geometry, ordering, labels known);
    on_step(metrics, distiller) after every outer step (checkpoint with
    distiller.state_dict()); on_eval(step, result) after every evaluation; `resume` is a
    distiller state to continue from.
    """
    start = time.perf_counter()
    trial = build_trial(config, dataset, embedder)
    c = trial.config
    if on_start is not None:
        on_start(trial)
    result = DistillResult(trial, trial.poster, trial.labels)
    method = get_method(c.method)
    if method.distils:
        schedule = InnerSchedule(c.total_inner_steps, c.window, c.distill_batch, c.inner_lr,
                                 augmentation=c.augmentation)
        outer = OuterSettings(c.lr, c.label_lr_scale, c.clip_coef, real_batch=c.real_batch,
                              real_chunk=c.real_chunk, unroll=c.unroll, precision=c.precision,
                              cuda_graphs=c.cuda_graphs, curriculum=c.curriculum)
        distiller = Distiller(trial.make_model(), SyntheticSet(trial.geometry, trial.labels),
                              trial.poster, trial.train_images,
                              trial.dataset.train_labels.to(trial.device), schedule, outer,
                              torch.Generator().manual_seed(c.seed))

        def evaluate_during(step: int) -> None:
            if c.eval_every and step % c.eval_every == 0 and 0 < step < c.steps:
                interim = evaluate_poster(trial, distiller.poster, distiller.synthetic.labels)
                if on_eval is not None:
                    on_eval(step, interim)

        if resume is not None:
            distiller.load_state_dict(resume)
            # on_step (a checkpoint) comes before the evaluation of the same step, so a trial
            # stopped between the two never reported it (a search judges a trial by it): the
            # evaluation is redone, with the same seeds, so it gives the same figures
            evaluate_during(distiller.step_count)
        while distiller.step_count < c.steps:
            metrics = distiller.step()
            result.history.append(metrics)
            if on_step is not None:
                on_step(metrics, distiller)
            evaluate_during(metrics.step)
        result.poster = distiller.poster.detach()
        result.labels = distiller.synthetic.labels
    if evaluate:
        result.evaluation = evaluate_poster(trial, result.poster, result.labels)
        if on_eval is not None:
            on_eval(method.final_step(c.steps), result.evaluation)
    result.seconds = time.perf_counter() - start
    return result


def save_result(result: DistillResult, folder) -> None:
    """Write the poster artifact (tensors, metadata with metrics, PNG) of a finished trial."""
    trial = result.trial
    c = trial.config
    save_artifact(folder, config=c, geometry=trial.geometry, poster=result.poster,
                  labels=result.labels, class_order=trial.ordering.grid,
                  class_names=trial.dataset.class_names, preprocessing=trial.preprocessing,
                  preprocessing_key=preprocessing_key(trial.dataset, c.preprocessing,
                                                      c.zca_regularization),
                  metrics=result.summary(), embedder=trial.ordering.embedder)


def evaluate_artifact(artifact: PosterArtifact, *, models: int | None = None,
                      device: str = "auto", data_root: str | None = None,
                      cache_dir: str | None = None,
                      on_model: Callable[[int, list[float]], None] | None = None) -> EvalResult:
    """Re-run the evaluation protocol on a saved poster, with nothing but the artifact (and the
    data set it names, for the test split and the preprocessing)."""
    changes = {"device": device, "data_root": data_root or artifact.config.data_root,
               "cache_dir": cache_dir or artifact.config.cache_dir}
    if models is not None:
        changes["eval_models"] = models
    config = artifact.config.replace(**changes)
    device_ = resolve_device(config.device)  # a device that is not there: before any work
    dataset = create_dataset(config.dataset, data_root=config.data_root,
                             cache_dir=config.cache_dir)
    recorded = artifact.metadata["preprocessing"]["training_set_key"]
    if preprocessing_key(dataset, config.preprocessing, config.zca_regularization) != recorded:
        raise SettingError(f"data set {config.dataset!r} is not the one this poster was distilled "
                           f"on (its training set differs): point --data-root at the original "
                           f"data", "dataset")
    preprocessing = fit_preprocessing(dataset, config.preprocessing,
                                      regularization=config.zca_regularization,
                                      cache_dir=config.cache_dir)
    trial = Trial(config, dataset, preprocessing, artifact.geometry,
                  ClassOrdering(artifact.class_order, "saved", artifact.metadata.get("embedder"),
                                None),
                  artifact.labels.to(device_), artifact.poster.to(device_), device_,
                  torch.empty(0), preprocessing.transform(dataset.test_images).to(device_))
    return evaluate_poster(trial, trial.poster, trial.labels, on_model=on_model)
