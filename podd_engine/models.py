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

NORMS = ("instancenorm", "batchnorm", "none")


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


class ConvNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int],
                 width: int = 128, depth: int | None = None, norm: str = "instancenorm") -> None:
        super().__init__()
        depth = depth or default_depth(image_size)
        h, w = image_size
        if h >> depth < 1 or w >> depth < 1:
            raise ValueError(f"depth {depth} pools a {h}x{w} image below 1 pixel: use depth "
                             f"<= {min(h, w).bit_length() - 1}")
        layers: list[nn.Module] = []
        in_channels = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), _norm(norm, width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
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
