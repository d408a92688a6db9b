"""PyConvResNet and PyConvHGResNet (Duta et al., "Pyramidal Convolution: Rethinking Convolutional Neural
Networks for Visual Recognition", arXiv:2006.11538).

Both are the `ResNet` trunk of `resnet.py` with three changes: the stem has no max-pool, every stage
(layer1 too) downsamples by 2 in its first block's spatial conv, and that block's shortcut is
MaxPool(3, 2, 1) -> 1x1 conv -> BN (state-dict keys `downsample.1` / `downsample.2`, as in the
authors' released files). The spatial conv is a pyramid per stage: kernels `PYCONV_KERNELS` with the
level groups below (all three per-stage tuples live in polyscale.ops.pyconv).

- PyConvResNet: inner widths 64/128/256/512 (expansion 4), level groups `PYCONV_GROUPS`.
- PyConvHGResNet ("high grouping"): inner widths 128/256/512/1024 and the same output widths as ResNet
  (expansion 2), level groups `PYCONV_HG_GROUPS`. In the shared Bottleneck this is
  `cardinality=32, base_width=4` (inner width int(64 * 4 / 64) * 32 = 128); the cardinality only matters
  when the spatial conv is swapped for a non-pyramid one (then a 32-group conv, as in the single-level
  last stage).
"""

from __future__ import annotations

from collections.abc import Sequence

from polyscale.models.resnet import BOTTLENECK_DEPTHS, Bottleneck, ConvLayer, ResNet
from polyscale.ops import stage_conv_layers
from polyscale.ops.pyconv import PYCONV_GROUPS, PYCONV_HG_GROUPS, PYCONV_KERNELS

__all__ = ["pyconv_resnet"]


def pyconv_resnet(
    depth: int,
    *,
    hg: bool = False,
    conv_layers: ConvLayer | Sequence[ConvLayer] | None = None,
    **kwargs,
) -> ResNet:
    """PyConvResNet-`depth` (`hg=False`) or PyConvHGResNet-`depth` (`hg=True`), depth in 50/101/152.

    `conv_layers=None` builds the paper's pyramid convs; pass another per-stage list (e.g. from
    `stage_conv_layers("psconv")`) to keep the PyConv trunk with a different spatial conv.
    """
    if depth not in BOTTLENECK_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(BOTTLENECK_DEPTHS)}, got {depth}")
    if conv_layers is None:
        groups = PYCONV_HG_GROUPS if hg else PYCONV_GROUPS
        conv_layers = stage_conv_layers("pyconv", 4, kernel_sizes=PYCONV_KERNELS, pyramid_groups=groups)
    return ResNet(
        Bottleneck,
        BOTTLENECK_DEPTHS[depth],
        strides=(2, 2, 2, 2),
        stem="imagenet_nopool",
        shortcut="pool_conv",
        cardinality=32 if hg else 1,
        base_width=4 if hg else 64,
        conv_layers=conv_layers,
        **kwargs,
    )
