"""Schema of the `detector` config group (task=detection): which torchvision detector, and how its
backbone (the `model` group's network) is fine-tuned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DetectorConfig"]


@dataclass
class DetectorConfig:
    """Arguments of polyscale.detection.create_detector besides the backbone and the class count."""

    name: str = "retinanet"  # retinanet | free_anchor | fcos | faster_rcnn | mask_rcnn
    # null: the papers' fine-tuning when the backbone starts from a checkpoint (model.checkpoint_path):
    # stem + first stage frozen (3 of 5 trainable) and every BatchNorm frozen (statistics and affine);
    # without one (training from scratch) everything trains, with live BatchNorm.
    trainable_stages: int | None = None
    frozen_bn: bool | None = None
    fpn_channels: int = 256
    p6p7_from: str | None = None  # retinanet / fcos: c5 | p5 (null: the detector's paper)
    box_head_dim: int | None = None  # faster / mask R-CNN box head width (null: torchvision's 1024)
    mask_head_dim: int | None = None  # mask R-CNN mask head width (null: 256)
    # SEPC paper: retinanet / fcos head standard | dcn | pconv | pconv_ibn | sepc_lite | sepc (Table 1), and
    # faster / mask R-CNN PConv + iBN + ReLU blocks after the FPN (Table 4; 0 = none)
    head: str = "standard"
    neck_pconv: int = 0
    ibn_sync: bool = False  # integrated BN as SyncBatchNorm (for 1-2 images per GPU)
    pconv_align_corners: bool = True  # PConv's bilinear upsampling (True: the authors' code)
    extra_conv_padding: int = 1  # PConv heads' extra per-branch convs; 0 = the authors' padding mistake
    pconv_init: str = "he"  # PConv heads' and necks' weights: he | authors (N(0, 0.01); the presets')
    # More keyword arguments of torchvision's constructor, e.g. {score_thresh: 0.05, detections_per_img: 100}
    options: dict[str, Any] = field(default_factory=dict)
