"""Detection: torchvision's detectors over the zoo's backbones, and COCO evaluation of their outputs.

`create_detector(kind, backbone, num_classes)` builds RetinaNet / FCOS / Faster R-CNN / Mask R-CNN with
an FPN over any zoo network and conv type; `CocoEvaluator` scores their outputs with pycocotools, over
one rank or several. Plain keyword arguments in, no config objects.

The evaluator is imported on first use, so that building detectors (and `import polyscale`) does not
need pycocotools.
"""

from typing import Any

from polyscale.detection.backbone import FeaturePyramidBackbone, LastLevelP6P7, backbone_features
from polyscale.detection.detectors import DETECTOR_KINDS, FCOS, RetinaNet, anchor_generator, create_detector

_COCO_EVAL_NAMES = ("IOU_TYPES", "METRIC_NAMES", "CocoEvaluator", "contiguous_category_map")

__all__ = [
    "DETECTOR_KINDS",
    "FCOS",
    "FeaturePyramidBackbone",
    "LastLevelP6P7",
    "RetinaNet",
    "anchor_generator",
    "backbone_features",
    "create_detector",
    *_COCO_EVAL_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _COCO_EVAL_NAMES:
        from polyscale.detection import coco_eval

        return getattr(coco_eval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
