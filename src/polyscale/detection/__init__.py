"""Detection: torchvision's detectors over the zoo's backbones, and COCO evaluation of their outputs.

`create_detector(kind, backbone, num_classes)` builds RetinaNet / FreeAnchor / FCOS / Faster / Mask R-CNN with
an FPN over any zoo network and conv type, optionally with the SEPC paper's PConv heads (`head=`) or a
PConv neck (`neck_pconv=`; both in `sepc`); `CocoEvaluator` scores their outputs with pycocotools, over
one rank or several. Plain keyword arguments in, no config objects.

The evaluator is imported on first use, so that building detectors (and `import polyscale`) does not
need pycocotools.
"""

from typing import Any

from polyscale.detection.backbone import FeaturePyramidBackbone, LastLevelP6P7, backbone_features
from polyscale.detection.detectors import DETECTOR_KINDS, FCOS, RetinaNet, anchor_generator, create_detector
from polyscale.detection.sepc import (
    HEADS,
    PConvNeck,
    PyramidTower,
    SEPCFCOSHead,
    SEPCRetinaNetHead,
    create_head,
    make_towers_deformable,
)

_COCO_EVAL_NAMES = ("IOU_TYPES", "METRIC_NAMES", "CocoEvaluator", "contiguous_category_map")

__all__ = [
    "DETECTOR_KINDS",
    "FCOS",
    "FeaturePyramidBackbone",
    "HEADS",
    "LastLevelP6P7",
    "PConvNeck",
    "PyramidTower",
    "RetinaNet",
    "SEPCFCOSHead",
    "SEPCRetinaNetHead",
    "anchor_generator",
    "backbone_features",
    "create_detector",
    "create_head",
    "make_towers_deformable",
    *_COCO_EVAL_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _COCO_EVAL_NAMES:
        from polyscale.detection import coco_eval

        return getattr(coco_eval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
