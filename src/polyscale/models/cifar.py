"""CIFAR networks on the shared `ResNet` trunk: ResNeXt-29 and the small ResNet-(6n+2).

- ResNeXt-29 (Xie et al., ResNeXt, sec. 5.3; the PSConv paper's CIFAR-100 model, sec. 4.2): 3x3 stem
  with 64 channels, three stages of three bottlenecks with outputs 256/512/1024 and inner width
  cardinality x 64 x (1, 2, 4), 1x1 projection shortcuts where the shape changes. 8x64d has 34,426,698
  parameters with 10 classes, 16x64d 68,155,210.
- ResNet-20/56 (He et al., sec. 4.2): 3x3 stem with 16 channels, three stages of n basic blocks with
  widths 16/32/64, depth 6n+2. Shortcuts where the shape changes are 1x1 conv + BN projections
  (option B) rather than the paper's zero-padding (option A), so that all trunks share one shortcut
  type: ResNet-20 has 272,474 parameters with 10 classes (option A: 269,722), ResNet-56 855,770.

PS versions put PSConv in every spatial conv of the residual branches (both 3x3 convs of a basic block,
the middle conv of a bottleneck), never in the stem.
"""

from __future__ import annotations

from collections.abc import Sequence

from polyscale.models.resnet import BasicBlock, Bottleneck, ConvLayer, ResNet
from polyscale.ops.factory import standard_conv

__all__ = ["cifar_resnet", "resnext29"]


def resnext29(
    cardinality: int,
    base_width: int = 64,
    *,
    conv_layers: ConvLayer | Sequence[ConvLayer] = standard_conv,
    **kwargs,
) -> ResNet:
    """CIFAR ResNeXt-29 `cardinality` x `base_width`d (8x64d, 16x64d in the papers)."""
    return ResNet(
        Bottleneck,
        (3, 3, 3),
        planes=(64, 128, 256),
        strides=(1, 2, 2),
        cardinality=cardinality,
        base_width=base_width,
        stem="cifar",
        stem_width=64,
        conv_layers=conv_layers,
        **kwargs,
    )


def cifar_resnet(
    depth: int, *, conv_layers: ConvLayer | Sequence[ConvLayer] = standard_conv, **kwargs
) -> ResNet:
    """CIFAR ResNet-`depth` with basic blocks, depth = 6n + 2 (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. 20, 56), got {depth}")
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock,
        (n, n, n),
        planes=(16, 32, 64),
        strides=(1, 2, 2),
        stem="cifar",
        stem_width=16,
        conv_layers=conv_layers,
        **kwargs,
    )
