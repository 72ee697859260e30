"""The ConvNet used throughout dataset distillation (and by RaT-BPTT and PoDD):
`depth` x [3x3 conv (width channels) -> norm -> ReLU -> 2x2 average pool] -> linear classifier.
Default: width 128, instance norm (GroupNorm with one group per channel, affine), depth 3 for
32 px images and 4 for 64 px.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from podd_engine.config import NORMS
from podd_engine.errors import SettingError



def default_depth(image_size: tuple[int, int]) -> int:
    """Pool down to about 4x4: 3 conv blocks for 32 px, 4 for 64 px (the paper's choice), 1 for
    8 px. Deeper nets on small images would instance-normalise 2x2 or 1x1 maps, which carry
    (almost) no information."""
    return max(1, int(math.log2(min(image_size) / 4)))


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(width, width, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(width)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class AvgPool2x2(nn.Module):
    """2x2 average pooling, stride 2 (floor mode: a trailing odd row or column is dropped), as
    nn.AvgPool2d(2, 2). On CUDA it is computed as a mean over a reshaped view: PyTorch's
    avg_pool2d backward kernel is about 5x slower than its forward and was the most expensive
    GPU kernel of a RaT-BPTT step (14 % at the CIFAR-10 paper geometry), while the mean's
    backward (and double backward) are plain elementwise and reduction kernels. Same values
    up to float rounding (tests/test_cuda.py); CPUs keep avg_pool2d, which is faster there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return nn.functional.avg_pool2d(x, 2, 2)
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        x = x[..., :2 * h, :2 * w]
        return x.reshape(*x.shape[:-2], h, 2, w, 2).mean(dim=(-3, -1))


class ConvNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int],
                 width: int = 128, depth: int | None = None, norm: str = "instancenorm") -> None:
        super().__init__()
        depth = depth or default_depth(image_size)
        h, w = image_size
        if h >> depth < 1 or w >> depth < 1:
            raise SettingError(f"depth {depth} pools a {h}x{w} image below 1 pixel: use depth "
                               f"<= {min(h, w).bit_length() - 1}", "depth")
        layers: list[nn.Module] = []
        in_channels = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), _norm(norm, width),
                       nn.ReLU(inplace=True), AvgPool2x2()]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * (h >> depth) * (w >> depth), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {"convnet": ConvNet}


def create_model(name: str, *, channels: int, num_classes: int, image_size: tuple[int, int],
                 **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(_MODELS)}")
    return _MODELS[name](channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)


@torch.no_grad()
def reinitialize(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Fresh default PyTorch initialisation, drawn from `generator` when given (seeded runs)."""
    if generator is None:
        for module in model.modules():
            if hasattr(module, "reset_parameters") and module is not model:
                module.reset_parameters()
        return
    # nn.init has no generator argument for every layer type; draw under a forked RNG state.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reinitialize(model)
