"""TrialConfig: every setting of one distillation trial, as a plain dataclass, plus presets.

Presets:
  paper      the official per-data-set settings (CIFAR-10, CIFAR-100, CUB-200, Tiny-ImageNet;
             docs/reference-implementation.md, section 8). Meant for GPUs.
  cpu-small  a CPU-sized schedule at the same poster geometry: a CIFAR-10 1-IPC distillation
             plus evaluation in about 10 minutes on 2 cores that still learns something real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from podd_engine.benchmarks import BENCHMARKS as BENCHMARK_ENTRIES
from podd_engine.errors import GeometryError, SettingError
from podd_engine.methods import get_method, method_names

# The choices of every setting that takes one (the engine modules that implement them import
# these: this module is the ground floor and imports nothing of the engine, nor torch).
METHODS = method_names()
DEVICES = ("auto", "cpu", "cuda")
LABEL_MODES = ("fixed", "learned")
LABEL_POOLINGS = ("poster", "array")  # where a learned label's patch window is averaged
ORDERINGS = ("poco", "random", "identity", "given")
EMBEDDERS = ("clip", "minilm")
CLIP_MODES = ("tokens", "pooled")
POSTER_INITS = ("fade", "gaussian")
PREPROCESSING_KINDS = ("zca", "normalize")
AUGMENTATIONS = ("flip_rotate", "none")
NORMS = ("instancenorm", "batchnorm", "none")
UNROLL_MODES = ("recompute", "store")
PRECISIONS = ("fp32", "bf16")
CURRICULUM_DRAWS = ("step", "epoch")


def parse_grid(value: str | tuple[int, int] | list[int], what: str = "grid") -> tuple[int, int]:
    """'16x6' or (16, 6) -> (16, 6): columns x rows."""
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise GeometryError(f"{what} {value!r} is not COLSxROWS: write it like 16x6", what)
        value = (int(parts[0]), int(parts[1]))
    cols, rows = (int(v) for v in value)
    if cols < 1 or rows < 1:
        raise GeometryError(f"{what} {cols}x{rows} needs at least one column and one row", what)
    return cols, rows


@dataclass
class TrialConfig:
    # what to distil
    dataset: str = "cifar10"
    method: str = "podd"  # podd | rat-bptt (n separate images per IPC) | random-real
    ipc: float = 1.0
    class_grid: str | None = None  # "COLSxROWS"; default: the grid closest to 2:1
    patch_grid: str = "16x6"  # "COLSxROWS" of overlapping patches (podd only)
    labels: str = "fixed"  # fixed | learned
    # learned labels only: average each patch's window of the label array upsampled to the
    # poster (poster: the paper's text) or at the array's own resolution (array: the official
    # code, where a 32-pixel patch reads one label cell and so starts with its fixed label)
    label_pooling: str = "poster"
    order: str = "poco"  # poco | random | identity | given
    order_grid: list[list[int]] | None = None  # for order "given"
    embedder: str = "clip"  # text encoder of PoCO: clip (the paper's) | minilm (ships offline)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    clip_weights: str | None = None
    clip_mode: str = "tokens"  # tokens (official) | pooled
    init: str = "fade"  # fade (official) | gaussian (paper's Algorithm 1)
    # data and network
    preprocessing: str = "zca"  # zca | normalize
    zca_regularization: float = 0.1
    model: str = "convnet"
    width: int = 128
    depth: int | None = None  # None: 3 for 32 px, 4 for 64 px
    norm: str = "instancenorm"
    # RaT-BPTT
    steps: int = 4000  # outer steps
    total_inner_steps: int = 200  # T
    window: int = 60  # dT unrolled steps
    distill_batch: int = 96  # patches per inner step
    real_batch: int = 5000
    real_chunk: int = 1000  # real batch processed in chunks of this size (memory only)
    inner_lr: float = 1e-3
    lr: float = 1e-3
    label_lr_scale: float = 1.0
    clip_coef: float = 0.9
    augmentation: str = "flip_rotate"
    unroll: str = "recompute"  # recompute (memory independent of window) | store
    precision: str = "fp32"  # fp32 | bf16 (autocast; faster on AMX CPUs and tensor-core GPUs)
    cuda_graphs: bool = True  # on CUDA (fp32): replay inner steps from captured CUDA graphs
    # the curriculum start c is drawn every outer step | once per epoch over the real data (the
    # official code; with a small real batch an epoch is many outer steps)
    curriculum: str = "step"
    # evaluation protocol
    eval_models: int = 8
    eval_steps: list[int] = field(default_factory=lambda: [300, 600, 1000, 2000])
    eval_batch: int | None = None  # default: distill_batch
    eval_lr: float | None = None  # default: inner_lr (as the official evaluation)
    eval_every: int = 0  # evaluate every N outer steps as well (0: only at the end)
    # run
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    cache_dir: str | None = None
    # the benchmark a parquet:/imagefolder: copy is (cifar10, cifar100, cub200, tiny-imagenet);
    # a label for comparisons, not a setting of the computation
    family: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingError(f"unknown setting {unknown[0]!r}: valid settings are "
                               f"{', '.join(sorted(known))}", unknown[0])
        return cls(**values)

    def replace(self, **changes: Any) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def canonical(self) -> "TrialConfig":
        """The same trial with the settings its method ignores reset to their defaults, so two
        configs that run the same computation compare (and hash) equal: a rat-bptt baseline has
        no patch grid or class ordering, an undistilled random-real control no schedule."""
        ignored = get_method(self.method).ignores
        if not ignored:
            return self
        defaults = TrialConfig()
        return self.replace(**{name: getattr(defaults, name) for name in ignored})

    def science(self) -> dict[str, Any]:
        """The settings that change the result (canonical: not where files live, not settings
        the method ignores), by name; the trial key hashes them and the report compares runs
        by them."""
        return {k: v for k, v in self.canonical().to_dict().items() if k not in PLACEMENT}

    @property
    def labels_name(self) -> str:
        """'fixed', 'learned', or 'learned-array' where learned labels are pooled the official
        code's way (trial names and the dry-run table say so; the default stays unsaid)."""
        if self.labels == "learned" and self.label_pooling != LATE_SETTINGS["label_pooling"]:
            return f"{self.labels}-{self.label_pooling}"
        return self.labels

    def key(self) -> str:
        """A stable hash of the settings that change the result. A setting added after keys
        were first recorded (`LATE_SETTINGS`) is hashed only when it is not at its default, so
        every earlier trial keeps its key (and a recorded sweep can still resume)."""
        science = {k: v for k, v in self.science().items()
                   if not (k in LATE_SETTINGS and v == LATE_SETTINGS[k])}
        return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()[:12]

    def validate(self) -> None:
        """Errors that do not need the data set; each names the field and the fix."""
        self._check_types()
        choices = {"method": method_names(), "labels": LABEL_MODES,
                   "label_pooling": LABEL_POOLINGS, "device": DEVICES,
                   "order": ORDERINGS, "init": POSTER_INITS,
                   "preprocessing": PREPROCESSING_KINDS, "clip_mode": CLIP_MODES,
                   "embedder": EMBEDDERS, "unroll": UNROLL_MODES, "precision": PRECISIONS,
                   "augmentation": AUGMENTATIONS, "norm": NORMS,
                   "curriculum": CURRICULUM_DRAWS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingError(f"{name} must be one of {', '.join(allowed)}, got "
                                   f"{getattr(self, name)!r}", name)
        positive = ("ipc", "steps", "total_inner_steps", "window", "distill_batch", "real_batch",
                    "real_chunk", "inner_lr", "lr", "eval_models", "width", "label_lr_scale")
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise SettingError(f"{name} must be a positive finite number, got {value}", name)
        if self.window > self.total_inner_steps:
            raise SettingError(f"window ({self.window}) must not exceed total_inner_steps "
                               f"({self.total_inner_steps})", "window")
        if not 0 <= self.clip_coef < 1:
            raise SettingError(f"clip_coef must be in [0, 1), got {self.clip_coef}", "clip_coef")
        if not self.eval_steps or min(self.eval_steps) < 1:
            raise SettingError(f"eval_steps must be positive step counts, got {self.eval_steps}",
                               "eval_steps")
        if get_method(self.method).whole_ipc and float(self.ipc) != int(self.ipc):
            raise SettingError(f"ipc {self.ipc} is not a whole number: method {self.method} "
                               f"stores whole images per class (use method podd below 1 IPC)",
                               "ipc")
        if self.order == "given" and self.order_grid is None:
            raise SettingError("order 'given' needs order_grid: rows of class indices",
                               "order_grid")
        parse_grid(self.patch_grid, "patch_grid")  # the form; the sizes need the data set
        if self.class_grid is not None:
            parse_grid(self.class_grid, "class_grid")
        if self.family is not None and self.family not in BENCHMARKS:
            raise SettingError(f"family must be one of the paper's benchmarks "
                               f"({', '.join(BENCHMARKS)}), got {self.family!r}: leave it unset "
                               f"for a data set that is none of them", "family")


    def _check_types(self) -> None:
        """Every setting has its declared type (settings come from YAML and --set KEY=VALUE)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = [k.strip() for k in str(f.type).split("|")]
            if value is None and "None" in kinds:
                continue
            if _has_type(value, kinds[0]):
                continue
            wanted = " or ".join(_TYPE_WORDS.get(k, k) for k in kinds if k != "None")
            raise SettingError(f"{f.name} must be {wanted}"
                               + (" (or left unset)" if "None" in kinds else "")
                               + f", got {value!r}", f.name)


# Settings that say where or how fast a trial runs, or what its data set is called, but not
# what it computes: they are not part of the trial key, and runs that differ only in them
# are the same experiment.
PLACEMENT = ("device", "data_root", "cache_dir", "real_chunk", "cuda_graphs", "family")


# Settings added after trial keys were first recorded, with the default that reproduces what
# trials did before them: omitted from the key at that default, and taken as that default by
# the report for runs recorded before the setting existed.
LATE_SETTINGS = {"curriculum": "step", "label_pooling": "poster"}


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "str": "a string",
               "list[int]": "a list of whole numbers (e.g. [300, 2000])",
               "list[list[int]]": "rows (lists) of whole numbers"}


def _has_type(value: Any, kind: str) -> bool:
    """isinstance for the annotation spellings TrialConfig uses (int, float, str, list[int],
    list[list[int]]); a bool is not a number and an int is a fine float."""
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("list[") and isinstance(value, list):
        inner = kind[5:-1]
        return all(_has_type(v, inner) for v in value)
    return False


def default_class_grid(num_classes: int) -> str:
    """COLSxROWS with cols >= rows and the ratio closest to 2 (the official grids: 5x2 for 10
    classes, 10x10 for 100, 20x10 for 200)."""
    pairs = [(num_classes // r, r) for r in range(1, int(num_classes ** 0.5) + 1)
             if num_classes % r == 0]
    cols, rows = min(pairs, key=lambda p: abs(p[0] / p[1] - 2))
    return f"{cols}x{rows}"


# The official per-data-set settings live with each benchmark (podd_engine/benchmarks.py).
PAPER = {name: b.paper_settings for name, b in BENCHMARK_ENTRIES.items()}
BENCHMARKS = tuple(PAPER)  # the paper's four benchmarks: the families with a paper preset

# CPU-sized: the CIFAR-10 paper geometry (5x2 classes, 16x6 patches, 96 patches per step) and
# learning rates, with a narrower ConvNet, a short unroll (5 of 20 inner steps), a small real
# batch, 300 outer steps and 3 evaluation networks on the paper's evaluation schedule.
# PoCO uses the MiniLM text encoder here because it ships with its weights (CLIP weights need a
# download); results record the embedder, and `--embedder clip` restores the paper's.
CPU_SMALL = dict(embedder="minilm", width=32, steps=300, total_inner_steps=20, window=5,
                 real_batch=256, real_chunk=256, eval_models=3)


def paper_preset_name(family: str | None, dataset: str | None = None) -> str:
    """The paper preset of a data-set family (a benchmark name); a data set of no benchmark
    family has none."""
    if family in PAPER:
        return family
    raise SettingError(f"no paper preset for {dataset or family!r}: it is not one of the "
                       f"paper's benchmarks ({', '.join(BENCHMARKS)}); if it is a copy of one, "
                       f"declare its family (`family: cifar10` in the sweep, or a 'family' key in its "
                       f"classes.json), else use preset cpu-small or give the settings",
                       "preset")


def make_config(preset: str | None = None, *, data_family: str | None = None,
                **settings: Any) -> TrialConfig:
    """A TrialConfig from a preset plus explicit settings (explicit settings win). The paper
    preset is the one of the data set's family: a `family` setting, else `data_family` (what
    the loaded data set is), else the data set's registry name when it is a benchmark."""
    base: dict[str, Any] = {}
    if preset == "paper":
        dataset = settings.get("dataset", "cifar10")
        family = (settings.get("family") or data_family
                  or (dataset if dataset in PAPER else None))
        benchmark = BENCHMARK_ENTRIES[paper_preset_name(family, dataset)]
        base = dict(benchmark.paper_settings)
        try:  # the paper's label mode depends on the IPC (a bad IPC is validate's to report)
            base["labels"] = benchmark.paper_labels(float(settings.get("ipc", TrialConfig.ipc)))
        except (TypeError, ValueError):
            pass
    elif preset == "cpu-small":
        base = dict(CPU_SMALL)
    elif preset not in (None, "none"):
        raise SettingError(f"preset must be paper or cpu-small, got {preset!r}", "preset")
    config = TrialConfig.from_dict({**base, **{k: v for k, v in settings.items()
                                               if v is not None}})
    config.validate()
    return config
