"""SEPC heads for torchvision's RetinaNet and FCOS, and a PConv neck for Faster / Mask R-CNN.

Wang, Zhang, Yu, Feng, Zhang: "Scale-Equalizing Pyramid Convolution for Object Detection", CVPR 2020.
Section 3.1 / Fig. 5b: the head's two 4-conv towers are replaced by 4 stacked pyramid convolutions
(PConv, each followed by integrated BN and ReLU) shared by both branches, then one extra 3x3 conv per
branch shared across levels, then the detector's usual prediction convs. Section 4: SEPC makes the
PConv kernels and the extra convs deformable above the bottom level (SEPC-lite: the extra convs only).
Section 5.3 / Table 4: stacked PConvs after the FPN of two-stage detectors.

The heads subclass torchvision's RetinaNetHead / FCOSHead: their branch heads keep the prediction convs,
the reshaping of the outputs and `compute_loss`, and only lose their conv towers (`conv` becomes an
identity), so the detectors' matching, losses and post-processing stay torchvision's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead

from polyscale.detection.backbone import FeaturePyramidBackbone
from polyscale.errors import ConfigError
from polyscale.ops.pconv import DeformableConv2d, IntegratedBN, LevelConv, PConv

__all__ = [
    "HEADS",
    "TOWER_HEADS",
    "PConvBlock",
    "PConvNeck",
    "PyramidTower",
    "SEPCFCOSHead",
    "SEPCRetinaNetHead",
    "create_head",
    "make_towers_deformable",
]

# SEPC Table 1's rows. "standard" is torchvision's head; "dcn" the same head with deformable tower convs.
# The others (Fig. 5b) share a PConv tower: (iBN after each PConv, deformable PConvs, deformable extra convs)
TOWER_HEADS: dict[str, tuple[bool, bool, bool]] = {
    "pconv": (False, False, False),
    "pconv_ibn": (True, False, False),
    "sepc_lite": (True, False, True),
    "sepc": (True, True, True),
}
HEADS = ("standard", "dcn", *TOWER_HEADS)
NUM_PCONVS = 4  # the paper's stack (section 3.1)


def _relu(features: list[Tensor]) -> list[Tensor]:
    return [F.relu(x) for x in features]


class PConvBlock(nn.Module):
    """PConv -> integrated BN (when `ibn`) -> ReLU, on a list of levels (one step of the paper's stack)."""

    def __init__(
        self,
        channels: int,
        *,
        ibn: bool = True,
        ibn_sync: bool = False,
        deform: bool = False,
        align_corners: bool = True,
        init: str = "he",
    ) -> None:
        super().__init__()
        self.pconv = PConv(channels, channels, align_corners=align_corners, deform=deform, init=init)
        self.ibn = IntegratedBN(channels, sync=ibn_sync) if ibn else None

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        out = self.pconv(features)
        if self.ibn is not None:
            out = self.ibn(out)
        return _relu(out)


class _BranchConv(nn.Module):
    """A branch's extra conv: LevelConv + ReLU, with padding 1 or, `padding`=0, as the authors' code.

    Its "he" init (LevelConv's default) matters more than the PConvs': nothing normalises its output
    before the prediction convs, and at the authors' 0.01 FCOS's box branch (a ReLU on its distances) sat
    at zero boxes on the built-in set (docs/detection.md, "Initialisation").

    Their padding-0 conv shrinks each map by 2, and mmdetection, which takes the anchor grid from the
    prediction maps' sizes, lays the anchors on the shrunken grid, one stride off the locations the
    predictions are centred on. Here the result is kept at full size
    with each prediction over its own location (torchvision's anchors come from the FPN's map sizes):
    the padding-0 conv's outputs sit at the interior locations and the outer ring is zero. That equals a
    padding-0 conv zero-padded back by 1, and is computed as the padding-1 conv with its outer ring
    zeroed, which also works on maps smaller than 3x3 (they become all zero).
    """

    def __init__(self, channels: int, *, padding: int, deform: bool, init: str = "he") -> None:
        super().__init__()
        self.conv = LevelConv(channels, channels, deform=deform, init=init)
        self.zero_border = padding == 0

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        out = _relu(self.conv(features))  # (N, C, H_l, W_l)
        if self.zero_border:
            out = [x * _interior_mask(x) for x in out]
        return out


def _interior_mask(x: Tensor) -> Tensor:
    """(H, W) ones with a zero outer ring."""
    mask = x.new_zeros(x.shape[-2:])
    mask[1:-1, 1:-1] = 1
    return mask


class PyramidTower(nn.Module):
    """The SEPC head's body: 4 PConv blocks shared by both branches, then an extra conv per branch.

    `variant` is one of TOWER_HEADS (pconv, pconv_ibn, sepc_lite, sepc). `init` ("he" or "authors",
    polyscale.ops.pconv.INITS) initialises the PConvs and the extra convs. Returns the classification
    and the box branch's lists of maps, each level keeping its size.
    """

    def __init__(
        self,
        channels: int,
        variant: str = "sepc",
        *,
        ibn_sync: bool = False,
        align_corners: bool = True,
        extra_conv_padding: int = 1,
        init: str = "he",
    ) -> None:
        super().__init__()
        if variant not in TOWER_HEADS:
            raise ConfigError(f"`head`={variant!r}: a PConv tower is one of {', '.join(TOWER_HEADS)}.")
        if isinstance(extra_conv_padding, bool) or extra_conv_padding not in (0, 1):
            raise ConfigError(
                f"`extra_conv_padding`={extra_conv_padding!r}: use 1, or 0 for the authors' padding-0 extra "
                "convs."
            )
        ibn, deform_pconv, deform_extra = TOWER_HEADS[variant]
        if ibn_sync and not ibn:
            raise ConfigError(f"`ibn_sync`=True, but `head`={variant!r} has no integrated BN.")
        self.variant = variant
        self.pconvs = nn.Sequential(
            *(
                PConvBlock(
                    channels,
                    ibn=ibn,
                    ibn_sync=ibn_sync,
                    deform=deform_pconv,
                    align_corners=align_corners,
                    init=init,
                )
                for _ in range(NUM_PCONVS)
            )
        )
        branch = {"padding": extra_conv_padding, "deform": deform_extra, "init": init}
        self.cls_conv = _BranchConv(channels, **branch)
        self.reg_conv = _BranchConv(channels, **branch)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        shared = self.pconvs(list(features))  # run once for both branches
        return self.cls_conv(shared), self.reg_conv(shared)


class SEPCRetinaNetHead(RetinaNetHead):
    """torchvision's RetinaNetHead with its two towers replaced by one PyramidTower (`tower`).

    The branch heads keep `cls_logits` (num_anchors * K outputs, prior-probability bias) and `bbox_reg`
    (num_anchors * 4) and `compute_loss`; their `conv` towers become identities.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        variant: str = "sepc",
        **tower_options: Any,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes)  # builds towers that are dropped below
        self.tower = PyramidTower(in_channels, variant, **tower_options)
        self.classification_head.conv = nn.Identity()
        self.regression_head.conv = nn.Identity()

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        cls_features, reg_features = self.tower(x)
        return {
            "cls_logits": self.classification_head(cls_features),  # (N, sum H_l W_l A, K)
            "bbox_regression": self.regression_head(reg_features),  # (N, sum H_l W_l A, 4)
        }


class SEPCFCOSHead(FCOSHead):
    """torchvision's FCOSHead with no conv towers (num_convs=0) behind one PyramidTower (`tower`).

    The branch heads keep `cls_logits`, `bbox_reg`, `bbox_ctrness` and the loss; the tower's iBN takes
    the place of the towers' GroupNorm.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        variant: str = "sepc",
        **tower_options: Any,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs=0)
        self.tower = PyramidTower(in_channels, variant, **tower_options)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        cls_features, reg_features = self.tower(x)
        bbox_regression, bbox_ctrness = self.regression_head(reg_features)
        return {
            "cls_logits": self.classification_head(cls_features),  # (N, sum H_l W_l, K)
            "bbox_regression": bbox_regression,  # (N, sum H_l W_l, 4)
            "bbox_ctrness": bbox_ctrness,  # (N, sum H_l W_l, 1)
        }


def make_towers_deformable(head: RetinaNetHead | FCOSHead) -> RetinaNetHead | FCOSHead:
    """SEPC Table 1's "DCN head": every conv of both branch towers deformable on every level, in place.

    Each tower nn.Conv2d becomes a DeformableConv2d sharing its weight and bias (so torchvision's init is
    kept) with a zero-initialised offset conv; the prediction convs stay plain. Returns `head`.
    """
    for branch in (head.classification_head, head.regression_head):
        for parent in list(branch.conv.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d:
                    setattr(parent, name, DeformableConv2d.from_conv(child))
    return head


_HEAD_CLASSES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "retinanet": (RetinaNetHead, SEPCRetinaNetHead),
    "fcos": (FCOSHead, SEPCFCOSHead),
}


def create_head(
    family: str,
    head: str,
    in_channels: int,
    num_anchors: int,
    num_classes: int,
    *,
    ibn_sync: bool = False,
    align_corners: bool = True,
    extra_conv_padding: int = 1,
    init: str = "he",
) -> nn.Module:
    """The `head` variant (one of HEADS) of a RetinaNet-family (`family`="retinanet") or FCOS head."""
    if family not in _HEAD_CLASSES:
        raise ConfigError(f"`family`={family!r}: SEPC heads exist for {', '.join(_HEAD_CLASSES)}.")
    if head not in HEADS:
        raise ConfigError(f"`head`={head!r}: choose one of {', '.join(HEADS)}.")
    plain, tower_head = _HEAD_CLASSES[family]
    if head in TOWER_HEADS:
        options = {
            "ibn_sync": ibn_sync,
            "align_corners": align_corners,
            "extra_conv_padding": extra_conv_padding,
            "init": init,
        }
        return tower_head(in_channels, num_anchors, num_classes, head, **options)
    built = plain(in_channels, num_anchors, num_classes)
    return make_towers_deformable(built) if head == "dcn" else built


class PConvNeck(nn.Module):
    """A FeaturePyramidBackbone followed by `num_pconvs` PConv blocks over all its levels (Table 4).

    Every output level of `pyramid` (the max-pool "pool" level included) goes through PConv -> iBN ->
    ReLU `num_pconvs` times before the RPN and RoI heads. Keeps the interface torchvision's detectors and
    create_detector read: `out_channels`, `in_names` and `strides`, and an OrderedDict with the same keys.
    """

    def __init__(
        self,
        pyramid: FeaturePyramidBackbone,
        num_pconvs: int,
        *,
        ibn_sync: bool = False,
        align_corners: bool = True,
        init: str = "he",
    ) -> None:
        super().__init__()
        if isinstance(num_pconvs, bool) or not isinstance(num_pconvs, int) or num_pconvs < 1:
            raise ConfigError(
                f"`neck_pconv`={num_pconvs!r}: use a positive number of PConv blocks (0 = none)."
            )
        channels = pyramid.out_channels
        self.pyramid = pyramid
        self.pconvs = nn.Sequential(
            *(
                PConvBlock(channels, ibn=True, ibn_sync=ibn_sync, align_corners=align_corners, init=init)
                for _ in range(num_pconvs)
            )
        )
        self.out_channels = channels
        self.in_names = pyramid.in_names
        self.strides = pyramid.strides

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.pyramid(x)  # "0", "1", ..., "pool": (N, C, H_l, W_l), finest first
        return OrderedDict(zip(maps.keys(), self.pconvs(list(maps.values()))))
