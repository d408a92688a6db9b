"""torchvision's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN over any zoo backbone and conv type.

`create_detector(kind, backbone, num_classes)` builds the backbone's stage outputs (frozen as the papers
fine-tune), an FPN over them with the papers' levels, anchors that fit the levels' strides, and the
torchvision detector. Labels are 1..K for every kind (0 is never an object), so one data pipeline and one
evaluator serve all four; `num_classes` is K, without background, and is converted to each detector's
convention here. `head` swaps RetinaNet's / FCOS's head for one of the SEPC paper's (detection.sepc) and
`neck_pconv` puts stacked pyramid convolutions after the R-CNNs' FPN.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models import detection as tvd
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from polyscale.detection.backbone import FeaturePyramidBackbone, backbone_features
from polyscale.detection.free_anchor import FreeAnchor
from polyscale.detection.sepc import HEADS, TOWER_HEADS, PConvNeck, create_head
from polyscale.errors import ConfigError
from polyscale.models import get_model_spec
from polyscale.ops.pconv import INITS as PCONV_INITS

__all__ = ["DETECTOR_KINDS", "FCOS", "RetinaNet", "anchor_generator", "create_detector"]

DETECTOR_KINDS = ("retinanet", "free_anchor", "fcos", "faster_rcnn", "mask_rcnn")
P6P7_SOURCES = ("c5", "p5")

# Papers' defaults. P6/P7 source: the RetinaNet paper (sec. 4, and mmdetection's and SEPC's
# `add_extra_convs='on_input'`) computes P6 from C5; the FCOS paper (sec. 3.2) from P5.
_DEFAULT_P6P7 = {"retinanet": "c5", "free_anchor": "c5", "fcos": "p5"}
# The torchvision head each single-stage kind's `head` variants are built on (polyscale.detection.sepc)
_HEAD_FAMILY = {"retinanet": "retinanet", "free_anchor": "retinanet", "fcos": "fcos"}
_ROI_OUTPUT = {"box": 7, "mask": 14}  # MultiScaleRoIAlign sizes of torchvision's R-CNN defaults
_BOX_HEAD_DIM, _MASK_HEAD_DIM = 1024, 256  # torchvision's TwoMLPHead width and mask-head conv width


class _ForegroundLabels:
    """Single-stage detectors with K sigmoid outputs that take and return labels 1..K.

    torchvision's RetinaNet and FCOS use a target label directly as the output channel, so with K outputs
    they would want labels 0..K-1, while the R-CNNs (softmax with background 0) want 1..K. Shifting here
    gives all four detectors the same labels; the loss and the detections are otherwise torchvision's.
    """

    def compute_loss(self, targets: list[dict[str, Tensor]], *args: Any) -> dict[str, Tensor]:
        shifted = [{**t, "labels": t["labels"] - 1} for t in targets]
        return super().compute_loss(shifted, *args)  # type: ignore[misc]

    def postprocess_detections(self, *args: Any) -> list[dict[str, Tensor]]:
        detections = super().postprocess_detections(*args)  # type: ignore[misc]
        for d in detections:
            d["labels"] = d["labels"] + 1
        return detections


class RetinaNet(_ForegroundLabels, tvd.RetinaNet):
    """torchvision's RetinaNet with labels 1..K (K = `num_classes` sigmoid outputs, no background)."""


class FCOS(_ForegroundLabels, tvd.FCOS):
    """torchvision's FCOS with labels 1..K (K = `num_classes` sigmoid outputs, no background)."""


_CLASSES: dict[str, type[nn.Module]] = {
    "retinanet": RetinaNet,
    "free_anchor": FreeAnchor,  # RetinaNet with FreeAnchor's loss (labels 1..K too)
    "fcos": FCOS,
    "faster_rcnn": tvd.FasterRCNN,
    "mask_rcnn": tvd.MaskRCNN,
}


def anchor_generator(kind: str, strides: tuple[int, ...]) -> AnchorGenerator:
    """Anchors scaled to each level's stride, as the papers define them.

    RetinaNet: 3 octave scales x 3 ratios, base size 4 x stride (sizes 4s, 4s 2^(1/3), 4s 2^(2/3); paper
    sec. 4). FCOS: one point per location whose "anchor" size is the stride (FCOS reads strides from it).
    Faster / Mask R-CNN RPN: one size 8 x stride, 3 ratios (FPN paper: 32..512 on strides 4..64). On a
    stride-4..128 pyramid these are torchvision's defaults (which round the octave sizes to integers).
    """
    if kind in ("retinanet", "free_anchor"):
        sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides)
        ratios = ((0.5, 1.0, 2.0),) * len(strides)
    elif kind == "fcos":
        sizes = tuple((s,) for s in strides)
        ratios = ((1.0,),) * len(strides)
    elif kind in ("faster_rcnn", "mask_rcnn"):
        sizes = tuple((8 * s,) for s in strides)
        ratios = ((0.5, 1.0, 2.0),) * len(strides)
    else:
        raise ConfigError(f"Unknown detector `kind` {kind!r}; choose one of {', '.join(DETECTOR_KINDS)}.")
    return AnchorGenerator(sizes, ratios)


def _accepted_kwargs(cls: type) -> set[str]:
    """Keyword arguments the detector, its torchvision base (FreeAnchor passes RetinaNet's on) and its
    GeneralizedRCNNTransform accept from users."""
    own = {"self", "backbone", "num_classes", "min_size", "max_size", "kwargs", "image_mean", "image_std"}
    base = next(k for k in cls.__mro__ if k.__module__.startswith("torchvision."))
    names = (
        set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(base.__init__).parameters)
    ) - own
    names |= set(inspect.signature(GeneralizedRCNNTransform.__init__).parameters) - own
    return names | {"image_mean", "image_std"}


def _check_pyramid_options(
    kind: str,
    head: str,
    neck_pconv: int,
    ibn_sync: bool,
    align_corners: bool,
    extra_conv_padding: int,
    pconv_init: str,
) -> None:
    """ConfigError for an unknown SEPC head, or an SEPC option that the detector built would not use."""
    single_stage = kind in _HEAD_FAMILY
    if head not in HEADS:
        raise ConfigError(f"`head`={head!r}: choose one of {', '.join(HEADS)}.")
    if head != "standard" and not single_stage:
        raise ConfigError(
            f"`head`={head!r} applies to {', '.join(_HEAD_FAMILY)} only; {kind} takes PConvs after its FPN "
            "with `neck_pconv`."
        )
    if isinstance(neck_pconv, bool) or not isinstance(neck_pconv, int) or neck_pconv < 0:
        raise ConfigError(f"`neck_pconv`={neck_pconv!r}: use a number of PConv blocks, 0 for none.")
    if neck_pconv and single_stage:
        raise ConfigError(
            f"`neck_pconv`={neck_pconv} applies to faster_rcnn and mask_rcnn only; {kind} takes a PConv "
            "head with `head`."
        )
    if isinstance(extra_conv_padding, bool) or extra_conv_padding not in (0, 1):
        raise ConfigError(
            f"`extra_conv_padding`={extra_conv_padding!r}: use 1, or 0 for the authors' padding-0 convs."
        )
    has_pconv = head in TOWER_HEADS or neck_pconv > 0
    has_ibn = (head in TOWER_HEADS and TOWER_HEADS[head][0]) or neck_pconv > 0
    if extra_conv_padding != 1 and head not in TOWER_HEADS:
        raise ConfigError(
            f"`extra_conv_padding`={extra_conv_padding} applies to the PConv heads "
            f"({', '.join(TOWER_HEADS)}), not `head`={head!r}."
        )
    if not align_corners and not has_pconv:
        raise ConfigError("`pconv_align_corners`=False needs a PConv head (`head`) or neck (`neck_pconv`).")
    if pconv_init not in PCONV_INITS:
        raise ConfigError(
            f"`pconv_init`={pconv_init!r}: use he (He-normal) or authors (the authors' N(0, 0.01))."
        )
    if pconv_init != "he" and not has_pconv:
        raise ConfigError(f"`pconv_init`={pconv_init!r} needs a PConv head (`head`) or neck (`neck_pconv`).")
    if ibn_sync and not has_ibn:
        raise ConfigError(
            "`ibn_sync`=True needs integrated BN: `head`=pconv_ibn, sepc_lite or sepc, or `neck_pconv` > 0."
        )


def create_detector(
    kind: str,
    backbone: str = "resnet50",
    num_classes: int = 80,
    *,
    conv: str | Mapping[str, Any] | None = None,
    backbone_checkpoint: str | Path | None = None,
    trainable_stages: int = 3,
    frozen_bn: bool = True,
    fpn_channels: int = 256,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    p6p7_from: str | None = None,
    box_head_dim: int | None = None,
    mask_head_dim: int | None = None,
    head: str = "standard",
    neck_pconv: int = 0,
    ibn_sync: bool = False,
    pconv_align_corners: bool = True,
    extra_conv_padding: int = 1,
    pconv_init: str = "he",
    **kwargs: Any,
) -> nn.Module:
    """A torchvision detector with an FPN over the zoo network `backbone`.

    Call it as torchvision's detectors: `model(images, targets)` in train mode returns a dict of losses,
    `model(images)` in eval mode a list of {"boxes" (xyxy, input pixels), "scores", "labels"(, "masks")}.
    Images are float (3, H, W) in [0, 1], normalised inside with ImageNet statistics by default.

    Args:
        kind: retinanet | free_anchor (RetinaNet trained with FreeAnchor's loss) | fcos | faster_rcnn |
            mask_rcnn.
        backbone: a zoo name (`polyscale.list_models()`); 4-stage ImageNet nets or 3-stage CIFAR nets.
        num_classes: object classes K, without background. Targets and detections use labels 1..K for
            every kind. Inside: the single-stage kinds get K sigmoid outputs, Faster / Mask R-CNN K + 1
            softmax outputs (0 = background).
        conv: the backbone's spatial conv, as `create_model`'s `conv` (None: the name's own).
        backbone_checkpoint: weights of the backbone network (e.g. ImageNet); its classifier is dropped.
        trainable_stages: how many of stem + stages train, counted from the top (5 = all of an ImageNet
            net, 4 of a CIFAR one); the default 3 freezes the stem and the first stage, as the papers.
        frozen_bn: every backbone BatchNorm frozen (statistics and affine), as the papers.
        fpn_channels: FPN width, also the width of the single-stage heads' conv towers.
        min_size, max_size: the resize of torchvision's transform (shorter side, cap on the longer side).
        p6p7_from: single-stage kinds: P6 computed from "c5" or "p5" (None: the detector's paper, C5 for
            RetinaNet, P5 for FCOS).
        box_head_dim, mask_head_dim: Faster / Mask R-CNN: width of the two-FC box head (torchvision: 1024)
            and of the four mask-head convs (256); small values make CPU runs practical.
        head: single-stage head, a row of SEPC Table 1: standard (torchvision's), dcn (its tower convs
            deformable), pconv, pconv_ibn, sepc_lite or sepc (4 PConvs shared by both branches, then an
            extra conv per branch; docs/detection.md).
        neck_pconv: Faster / Mask R-CNN: PConv + iBN + ReLU blocks stacked after the FPN (0 = none; SEPC
            Table 4).
        ibn_sync: integrated BN (pconv_ibn, sepc_lite, sepc heads; the neck) as SyncBatchNorm.
        pconv_align_corners: the PConvs' bilinear upsampling (True as the authors' code).
        extra_conv_padding: padding of the PConv heads' extra per-branch convs: 1, or 0 as the authors'
            code by mistake (the maps are zero-padded back to keep predictions over their anchors).
        pconv_init: weights of the PConv heads' and necks' convs: "he" (He-normal, std sqrt(2 / (9 C)))
            or "authors" (N(0, 0.01), the authors' code; the SEPC presets'). docs/detection.md.
        kwargs: passed to the torchvision constructor (e.g. score_thresh, detections_per_img,
            rpn_batch_size_per_image, box_batch_size_per_image, box_detections_per_img, image_mean,
            size_divisible). Modules given here (anchor_generator, box_predictor, ...) replace ours, and a
            box / mask predictor must then have K + 1 outputs.
    """
    if kind not in DETECTOR_KINDS:
        raise ConfigError(f"Unknown detector `kind` {kind!r}; choose one of {', '.join(DETECTOR_KINDS)}.")
    if num_classes < 1:
        raise ConfigError(f"`num_classes`={num_classes} must be at least 1 (object classes, no background).")
    if fpn_channels < 1:
        raise ConfigError(f"`fpn_channels`={fpn_channels} must be positive.")
    single_stage = kind in _HEAD_FAMILY
    if kind == "fcos" and head in ("standard", "dcn") and fpn_channels % 32:
        raise ConfigError(
            f"`fpn_channels`={fpn_channels}: FCOS's head normalises with GroupNorm(32, channels), so use a "
            "multiple of 32 (or a PConv `head`, which has no GroupNorm)."
        )
    if not single_stage and p6p7_from is not None:
        raise ConfigError(
            f"`p6p7_from` applies to {', '.join(_HEAD_FAMILY)} only; {kind} adds a max-pool level."
        )
    if single_stage and (box_head_dim is not None or mask_head_dim is not None):
        raise ConfigError(f"`box_head_dim` / `mask_head_dim` apply to the R-CNN kinds only, not {kind}.")
    if kind == "faster_rcnn" and mask_head_dim is not None:
        raise ConfigError("`mask_head_dim` applies to mask_rcnn only.")
    _check_pyramid_options(
        kind, head, neck_pconv, ibn_sync, pconv_align_corners, extra_conv_padding, pconv_init
    )
    p6p7_from = p6p7_from or _DEFAULT_P6P7.get(kind)
    if single_stage and p6p7_from not in P6P7_SOURCES:
        raise ConfigError(f"`p6p7_from`={p6p7_from!r}: use one of {', '.join(P6P7_SOURCES)} (or None).")
    cls = _CLASSES[kind]
    unknown = sorted(set(kwargs) - _accepted_kwargs(cls))
    if unknown:
        raise ConfigError(
            f"create_detector({kind!r}) got unknown argument(s) {unknown}; it passes these to "
            f"torchvision's {cls.__name__}, which accepts: "
            f"{', '.join(sorted(_accepted_kwargs(cls)))}."
        )

    # Levels as the papers: single-stage detectors start at C3 (layer2), the R-CNNs at C2 (layer1). On a
    # CIFAR net (strides 1/2/4) the same stage indices give a pyramid of strides 2..16 or 1..8.
    num_stages = get_model_spec(backbone).num_stages
    out_indices = tuple(range(2 if single_stage else 1, num_stages + 1))
    body = backbone_features(
        backbone,
        out_indices=out_indices,
        conv=conv,
        checkpoint_path=backbone_checkpoint,
        trainable_stages=trainable_stages,
        frozen_bn=frozen_bn,
    )
    extra = f"p6p7_{p6p7_from}" if single_stage else "pool"
    fpn = FeaturePyramidBackbone(body, fpn_channels, extra)

    anchors_kw = "anchor_generator" if single_stage else "rpn_anchor_generator"
    kwargs.setdefault(anchors_kw, anchor_generator(kind, fpn.strides))
    if single_stage:
        if head != "standard":
            num_anchors = kwargs[anchors_kw].num_anchors_per_location()[0]
            kwargs["head"] = create_head(
                _HEAD_FAMILY[kind],
                head,
                fpn_channels,
                num_anchors,
                num_classes,
                ibn_sync=ibn_sync,
                align_corners=pconv_align_corners,
                extra_conv_padding=extra_conv_padding,
                init=pconv_init,
            )
        return cls(fpn, num_classes, min_size=min_size, max_size=max_size, **kwargs)

    # R-CNN heads are built here rather than by torchvision so that their widths can shrink, and so that
    # RoIAlign reads the FPN levels this backbone has ("0".."3" on 4-stage nets, "0".."2" on CIFAR nets;
    # the max-pool level "pool" feeds the RPN only, as in torchvision and the FPN paper).
    classes = num_classes + 1  # softmax over background (0) and the K classes
    box_dim = box_head_dim or _BOX_HEAD_DIM
    res = _ROI_OUTPUT["box"]
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(fpn.in_names, output_size=res, sampling_ratio=2))
    kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * res**2, box_dim))
    kwargs.setdefault("box_predictor", FastRCNNPredictor(box_dim, classes))
    if kind == "mask_rcnn":
        mask_dim = mask_head_dim or _MASK_HEAD_DIM
        mask_pool = MultiScaleRoIAlign(fpn.in_names, output_size=_ROI_OUTPUT["mask"], sampling_ratio=2)
        kwargs.setdefault("mask_roi_pool", mask_pool)
        kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, (mask_dim,) * 4, 1))
        kwargs.setdefault("mask_predictor", MaskRCNNPredictor(mask_dim, mask_dim, classes))
    # SEPC Table 4: stacked PConvs over every FPN level (names, widths and strides kept) before the RPN
    features: nn.Module = fpn
    if neck_pconv:
        features = PConvNeck(
            fpn, neck_pconv, ibn_sync=ibn_sync, align_corners=pconv_align_corners, init=pconv_init
        )
    # num_classes=None: the class count lives in the predictors (torchvision refuses both).
    return cls(features, None, min_size=min_size, max_size=max_size, **kwargs)
