"""One ResNet family (ResNet, ResNeXt, SE-ResNet, PyConvResNet, CIFAR ResNets), injectable spatial conv.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016); Xie et al., "Aggregated Residual
Transformations" (ResNeXt, CVPR 2017); Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018).

The blocks take `conv_layer` for their spatial (3x3) convolutions, with `nn.Conv2d`'s calling convention
`conv_layer(in_channels, out_channels, kernel_size=3, stride=1, groups=1, bias=False)`, so PSConv and
PyConv networks are the same classes as the standard ones with another `conv_layer` (PSConv paper, sec.
4.1: "we replace all the 3x3 standard convolutional layers in the middle of bottleneck blocks"). The
stride sits on the 3x3 conv. Attribute names follow torchvision (conv1/bn1/layer1..4/fc; blocks
conv1/bn1/conv2/bn2/conv3/bn3/downsample), so published state dicts load by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from timm.layers import SEModule
from torch import nn

from polyscale.ops.factory import standard_conv

__all__ = [
    "BOTTLENECK_DEPTHS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "imagenet_resnet",
    "init_weights",
]

# blocks per stage of the ImageNet bottleneck ResNets (He et al., Table 1)
BOTTLENECK_DEPTHS: dict[int, tuple[int, ...]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

ConvLayer = Callable[..., nn.Module]
NormLayer = Callable[[int], nn.Module]
AttnLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convs (both from `conv_layer`) plus identity or projection shortcut; expansion 1."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        cardinality: int = 1,
        base_width: int = 64,
        conv_layer: ConvLayer = standard_conv,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only cardinality=1 and base_width=64; use Bottleneck")
        self.conv1 = conv_layer(in_channels, planes, kernel_size=3, stride=stride, groups=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(planes, planes, kernel_size=3, stride=1, groups=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.se = attn_layer(planes) if attn_layer is not None else nn.Identity()
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Zero the last BN so the residual branch starts as zero (Goyal et al., 2017)."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> spatial `conv_layer` (stride here) -> 1x1 expand, SE after the last BN.

    Inner width is `int(planes * base_width / 64) * cardinality` (torchvision's ResNeXt rule), output
    `planes * 4`; e.g. ResNeXt-50 32x4d has inner width 128 in stage 1.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        cardinality: int = 1,
        base_width: int = 64,
        conv_layer: ConvLayer = standard_conv,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * cardinality
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv_layer(width, width, kernel_size=3, stride=stride, groups=cardinality, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.se = attn_layer(out_channels) if attn_layer is not None else nn.Identity()
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Zero the last BN so the residual branch starts as zero (Goyal et al., 2017)."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + shortcut)


def _shortcut(
    in_channels: int, out_channels: int, stride: int, kind: str, norm_layer: NormLayer
) -> nn.Sequential:
    """Projection shortcut: `conv` = strided 1x1 conv + BN (torchvision keys downsample.0/1);
    `pool_conv` = MaxPool(3, stride, 1) + 1x1 conv + BN (PyConv, keys downsample.1/2)."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size=1, stride=1 if kind == "pool_conv" else stride, bias=False
    )
    if kind == "conv":
        return nn.Sequential(conv, norm_layer(out_channels))
    pool = nn.MaxPool2d(kernel_size=3, stride=stride, padding=1) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, conv, norm_layer(out_channels))


class ResNet(nn.Module):
    """ResNet trunk: stem, one stage per entry of `layers`, global pool, dropout, fc.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage, e.g. (3, 4, 6, 3) for the 50-layer nets.
        planes: per-stage `planes` (block output = planes * block.expansion).
        strides: per-stage stride of the first block (PyConvResNet: 2 in every stage).
        conv_layers: spatial conv per stage (one callable, or one per stage as from
            `polyscale.ops.stage_conv_layers`).
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "imagenet_nopool" (PyConv: no max-pool) or
            "cifar" (3x3/1 conv).
        shortcut: "conv" (torchvision) or "pool_conv" (PyConv's max-pool + 1x1 conv).
        attn_layer: channel attention after the last BN of each residual branch (e.g. timm's SE).
        drop_rate: dropout before the classifier.
        zero_init_last: zero-init the last BN of every residual branch.

    `feature_info` lists the feature maps a detection backbone can take (timm's convention, see
    `polyscale.models.features`). The children are registered in the order `forward` runs them and none
    is called twice (the stem's `relu` is its own), which timm's feature wrappers rely on when they
    rebuild the trunk from the children.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        planes: Sequence[int] = (64, 128, 256, 512),
        strides: Sequence[int] = (1, 2, 2, 2),
        cardinality: int = 1,
        base_width: int = 64,
        conv_layers: ConvLayer | Sequence[ConvLayer] = standard_conv,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
        stem: str = "imagenet",
        stem_width: int = 64,
        shortcut: str = "conv",
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        if not len(layers) == len(planes) == len(strides):
            raise ValueError(
                f"layers, planes, strides need one entry per stage, got {layers}, {planes}, {strides}"
            )
        if callable(conv_layers) and not isinstance(conv_layers, Sequence):
            conv_layers = [conv_layers] * len(layers)
        if len(conv_layers) != len(layers):
            raise ValueError(f"conv_layers has {len(conv_layers)} entries for {len(layers)} stages")
        if stem not in ("imagenet", "imagenet_nopool", "cifar"):
            raise ValueError(f"stem must be imagenet, imagenet_nopool or cifar, got {stem!r}")
        if shortcut not in ("conv", "pool_conv"):
            raise ValueError(f"shortcut must be conv or pool_conv, got {shortcut!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate

        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        # timm's feature_info: one entry per feature map (index 0 = stem after its ReLU, before the
        # max-pool, as in timm's ResNet; then one per stage), read by timm's FeatureListNet & co.
        # Reductions are products of the strides built here, so any stem / stride layout stays right.
        reduction = self.conv1.stride[0]
        self.feature_info = [dict(num_chs=stem_width, reduction=reduction, module="relu")]
        reduction *= self.maxpool.stride if isinstance(self.maxpool, nn.MaxPool2d) else 1

        in_channels = stem_width
        for i, (depth, plane, stride, conv) in enumerate(zip(layers, planes, strides, conv_layers)):
            out_channels = plane * block.expansion
            stage = []
            for j in range(depth):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or in_channels != out_channels:
                    down = _shortcut(in_channels, out_channels, s, shortcut, norm_layer)
                stage.append(
                    block(
                        in_channels,
                        plane,
                        s,
                        down,
                        cardinality=cardinality,
                        base_width=base_width,
                        conv_layer=conv,
                        norm_layer=norm_layer,
                        attn_layer=attn_layer,
                    )
                )
                in_channels = out_channels
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            reduction *= stride
            self.feature_info.append(dict(num_chs=out_channels, reduction=reduction, module=f"layer{i + 1}"))
        self.num_stages = len(layers)
        self.num_features = in_channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_channels, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, zero_init_last=zero_init_last)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (fine-tuning on another label set); 0 = features only."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, stem_width, H/4, W/4) on ImageNet
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x  # (N, num_features, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))  # (N, num_features)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # (N, num_classes)


def init_weights(model: nn.Module, zero_init_last: bool = False) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, optional zero last BN per branch.

    Operators that are not `nn.Conv2d` but expose `dense_weight()` / `load_dense_weight()` (PSConv) are
    initialised through their dense (C_out, C_in/groups, k, k) weight, so they get the same
    distribution as the standard conv they replace. They are handled after the plain convs in case
    they are built from `nn.Conv2d` submodules.
    """
    if any(p.is_meta for p in model.parameters()):
        return  # built on the meta device (shapes only, e.g. to count parameters or MACs): nothing to fill
    dense_ops = []
    for m in model.modules():
        if hasattr(m, "load_dense_weight") and hasattr(m, "dense_weight"):
            dense_ops.append(m)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for m in dense_ops:
            w = torch.empty_like(m.dense_weight())
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
            m.load_dense_weight(w)
    if zero_init_last:
        for m in model.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                m.zero_init_last()


def imagenet_resnet(
    depth: int,
    *,
    cardinality: int = 1,
    base_width: int = 64,
    se: bool = False,
    conv_layers: ConvLayer | Sequence[ConvLayer] = standard_conv,
    **kwargs,
) -> ResNet:
    """ImageNet ResNet-{50,101,152}, ResNeXt (`cardinality` x `base_width`d) and SE-ResNet.

    SE is timm's `SEModule` (reduction 16, FC layers with bias) after the last BN of each branch.
    """
    if depth not in BOTTLENECK_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(BOTTLENECK_DEPTHS)}, got {depth}")
    attn_layer = partial(SEModule, rd_ratio=1 / 16) if se else None
    return ResNet(
        Bottleneck,
        BOTTLENECK_DEPTHS[depth],
        cardinality=cardinality,
        base_width=base_width,
        attn_layer=attn_layer,
        conv_layers=conv_layers,
        **kwargs,
    )
