"""The built-in data set: procedurally drawn shapes and textures, generated in memory (no download).

Each class is a family of shapes or textures (disc, ring, square, frame, plus, triangle, stripes,
checkerboard, dots, concentric rings) drawn at a random position, scale and rotation, in random
foreground / background colours (a light shape on a darker background), with a smooth background
gradient and pixel noise. Colours are drawn independently of the class, so colour carries no class
information and the mean brightness only a weak one (the covered area): a network has to look at shape
and texture at several scales, which is what multi-scale convolutions are about. Every family is closed
under a horizontal flip, so the usual flip augmentation never changes a label.

The set is a pure function of (split, num_samples, image_size, num_classes, seed): generation uses its
own `torch.Generator` and never touches the global RNG.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from polyscale.errors import ConfigError

__all__ = ["BuiltinDataset", "FAMILIES"]

# A family maps local coordinates (u, v) in units of the shape's radius, each (n, H, W), and a per-sample
# random texture frequency k (n, 1, 1) to a soft coverage mask in [0, 1] (n, H, W). `e` is the edge width
# of the anti-aliasing ramp in the same units.
Family = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _inside(signed_dist: Tensor, e: Tensor) -> Tensor:
    """Soft indicator of `signed_dist < 0` (negative inside), anti-aliased over one pixel."""
    return (0.5 - signed_dist / e).clamp(0.0, 1.0)


def _disc(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    return _inside(torch.hypot(u, v) - 1.0, e)


def _ring(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    return _inside((torch.hypot(u, v) - 0.8).abs() - 0.2, e)


def _square(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    return _inside(torch.maximum(u.abs(), v.abs()) - 0.8, e)


def _frame(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    return _inside((torch.maximum(u.abs(), v.abs()) - 0.7).abs() - 0.18, e)


def _plus(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    bar_h = torch.maximum(u.abs() - 1.0, v.abs() - 0.25)
    bar_v = torch.maximum(v.abs() - 1.0, u.abs() - 0.25)
    return _inside(torch.minimum(bar_h, bar_v), e)


def _triangle(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    # Equilateral triangle: the largest distance to its three edge lines (normals 120 degrees apart).
    d = torch.stack(
        [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    )
    return _inside(d.amax(0) - 0.55, e)


def _patch(u: Tensor, v: Tensor, e: Tensor) -> Tensor:
    """Square patch that bounds the texture families, so that they also have a position and a scale."""
    return _inside(torch.maximum(u.abs(), v.abs()) - 1.0, e)


def _stripes(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    return _patch(u, v, e) * _inside(torch.sin(k * u) / k, e)


def _checker(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    return _patch(u, v, e) * _inside(torch.sin(k * u) * torch.sin(k * v) / k, e)


def _dots(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    # Distance to the nearest point of a square lattice with period 2*pi/k; dot radius a quarter period.
    period = 2 * math.pi / k
    du = torch.remainder(u, period) - period / 2
    dv = torch.remainder(v, period) - period / 2
    return _patch(u, v, e) * _inside(torch.hypot(du, dv) - period / 4, e)


def _target(u: Tensor, v: Tensor, k: Tensor, e: Tensor) -> Tensor:
    r = torch.hypot(u, v)
    return _inside(r - 1.0, e) * _inside(-torch.cos(k * r) / k, e)


FAMILIES: tuple[tuple[str, Family], ...] = (
    ("disc", _disc),
    ("ring", _ring),
    ("square", _square),
    ("frame", _frame),
    ("plus", _plus),
    ("triangle", _triangle),
    ("stripes", _stripes),
    ("checkerboard", _checker),
    ("dots", _dots),
    ("target", _target),
)


def _split_seed(seed: int, split: str) -> int:
    """A 63-bit seed per (seed, split), so that train and val never share samples."""
    digest = hashlib.sha256(f"polyscale-builtin:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return torch.rand(n, 1, 1, generator=g) * (high - low) + low  # (n, 1, 1)


def _draw(family: Family, n: int, size: int, g: torch.Generator) -> Tensor:
    """Draw `n` images of one family: float (n, 3, size, size) in [0, 1]."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # (H, W)
    radius = _uniform(g, n, 0.22, 0.42) * size  # pixels
    # Keep most of the shape inside the image: centre at least 0.7 radius from the border.
    cx = radius * 0.7 + torch.rand(n, 1, 1, generator=g) * (size - 1.4 * radius)
    cy = radius * 0.7 + torch.rand(n, 1, 1, generator=g) * (size - 1.4 * radius)
    angle = _uniform(g, n, 0.0, 2 * math.pi)
    dx, dy = (xs - cx) / radius, (ys - cy) / radius  # (n, H, W) in radius units
    u = dx * torch.cos(angle) + dy * torch.sin(angle)
    v = -dx * torch.sin(angle) + dy * torch.cos(angle)
    freq = _uniform(g, n, 4.0, 7.0) * math.pi / 2  # 4..7 half-periods per radius
    mask = family(u, v, freq, 1.0 / radius).unsqueeze(1)  # (n, 1, H, W)

    # Light shapes on a darker background, hues drawn per channel: contrast is guaranteed and its sign fixed
    # (random polarity makes the first epochs plateau at chance), while colours stay uninformative.
    background = torch.rand(n, 3, 1, 1, generator=g) * 0.45
    foreground = 0.55 + torch.rand(n, 3, 1, 1, generator=g) * 0.45
    tilt = torch.randn(n, 2, 1, 1, generator=g) * 0.15  # background gradient
    gradient = tilt[:, :1] * (xs / size - 0.5) + tilt[:, 1:] * (ys / size - 0.5)  # (n, 1, H, W)
    image = background + gradient + mask * (foreground - background)
    image = image + torch.randn(n, 3, size, size, generator=g) * _uniform(g, n, 0.02, 0.08).unsqueeze(1)
    return image.clamp(0.0, 1.0)


class BuiltinDataset(Dataset[tuple[Tensor, int]]):
    """In-memory shape/texture classification set; items are `(uint8 tensor (3, H, W), int label)`.

    Labels are balanced (sample i of the unshuffled set has class i mod num_classes) and shuffled.
    Generation costs about a second per 10,000 images of 32x32 on one CPU core.
    """

    def __init__(
        self, split: str, *, num_samples: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
    ) -> None:
        if not 2 <= num_classes <= len(FAMILIES):
            raise ConfigError(
                f"The built-in data set has {len(FAMILIES)} classes, but `num_classes`={num_classes} was "
                f"asked for. Set `num_classes` to a value between 2 and {len(FAMILIES)}."
            )
        if num_samples < 1:
            raise ConfigError(
                f"The built-in data set needs at least one sample (got num_samples={num_samples})."
            )
        if image_size < 8:
            raise ConfigError(
                f"The built-in data set draws images of at least 8x8 (got `image_size`={image_size})."
            )
        self.split = split
        self.num_classes = num_classes
        self.classes = [name for name, _ in FAMILIES[:num_classes]]
        g = torch.Generator().manual_seed(_split_seed(seed, split))
        targets = torch.arange(num_samples) % num_classes
        targets = targets[torch.randperm(num_samples, generator=g)]
        images = torch.empty(num_samples, 3, image_size, image_size, dtype=torch.uint8)  # (N, 3, H, W)
        for label, (_, family) in enumerate(FAMILIES[:num_classes]):
            index = (targets == label).nonzero().squeeze(1)
            for chunk in index.split(2048):  # bounded memory for large sets
                drawn = _draw(family, len(chunk), image_size, g)
                images[chunk] = (drawn * 255.0).round().to(torch.uint8)
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])
