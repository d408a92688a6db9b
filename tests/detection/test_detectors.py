"""create_detector: every kind over standard / PS / PyConv and ImageNet / CIFAR backbones, on tiny inputs."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from pycocotools.coco import COCO
from torch import nn
from torchvision.models import detection as tvd
from torchvision.ops import FrozenBatchNorm2d

import polyscale
from polyscale.detection import DETECTOR_KINDS, CocoEvaluator, create_detector
from polyscale.errors import ConfigError

NUM_CLASSES = 3
TINY = {"fpn_channels": 32, "min_size": 64, "max_size": 96}
# Head sizes and candidate counts that keep a CPU forward well under a second; score thresholds of 0 so
# an untrained model still returns detections to check.
SMALL = {
    "retinanet": {"topk_candidates": 100, "detections_per_img": 10, "score_thresh": 0.0},
    "fcos": {"topk_candidates": 100, "detections_per_img": 10, "score_thresh": 0.0},
    "faster_rcnn": {
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 50,
        "box_batch_size_per_image": 64,
        "box_detections_per_img": 10,
        "box_score_thresh": 0.0,
        "box_head_dim": 64,
    },
}
SMALL["mask_rcnn"] = {**SMALL["faster_rcnn"], "mask_head_dim": 16}
SMALL["free_anchor"] = SMALL["retinanet"]
# standard ImageNet net, PSConv on a CIFAR net (3 stages, strides 1/2/4), PyConv ImageNet net
BACKBONES = [("resnet50", None), ("resnet20", "psconv"), ("pyconvresnet50", None)]
SIZES = [(64, 96), (80, 64)]  # (H, W) of the two test images


def _detector(kind: str, backbone: str = "resnet50", conv=None, **kwargs) -> nn.Module:
    return create_detector(kind, backbone, NUM_CLASSES, conv=conv, **{**TINY, **SMALL[kind], **kwargs})


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) for h, w in SIZES]
    boxes = [
        torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]),
        torch.tensor([[10.0, 20.0, 30.0, 70.0]]),
    ]
    labels = [torch.tensor([1, 3]), torch.tensor([2])]
    targets = []
    for (h, w), b, lab in zip(SIZES, boxes, labels):
        masks = torch.zeros(len(b), h, w, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, b.int().tolist()):
            m[y0:y1, x0:x1] = 1
        targets.append({"boxes": b, "labels": lab, "masks": masks})
    return images, targets


@pytest.mark.parametrize("backbone,conv", BACKBONES)
@pytest.mark.parametrize("kind", DETECTOR_KINDS)
def test_detector_trains_and_detects(kind, backbone, conv):
    torch.manual_seed(0)
    model = _detector(kind, backbone, conv)
    images, targets = _batch()

    model.train()
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    body = model.backbone.body
    assert body.conv1.weight.grad is None  # the stem is frozen by default
    last_stage = [m for name, m in body.named_children() if name.startswith("layer")][-1]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in last_stage.parameters())

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for (h, w), det in zip(SIZES, detections):
        n = len(det["boxes"])
        assert n > 0 and det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
        assert det["labels"].min() >= 1 and det["labels"].max() <= NUM_CLASSES  # 1..K for every kind
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()  # original pixels
        if kind == "mask_rcnn":
            assert det["masks"].shape == (n, 1, h, w)


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_single_stage_heads_see_labels_shifted_to_output_channels(kind):
    # K sigmoid outputs: label l trains output l - 1; with one class, label 1 must be output 0
    model = create_detector(kind, "resnet20", 1, **TINY, **SMALL[kind])
    seen = []
    original = model.head.compute_loss

    def spy(targets, *args):
        seen.extend(t["labels"].tolist() for t in targets)
        return original(targets, *args)

    model.head.compute_loss = spy
    images, targets = _batch()
    for t in targets:
        t["labels"] = torch.ones_like(t["labels"])
    losses = model.train()(images, targets)
    assert seen == [[0, 0], [0]]
    assert all(torch.isfinite(v) for v in losses.values())


def test_anchors_follow_the_feature_strides():
    x = torch.rand(1, 3, 128, 256)
    expected_strides = {
        ("resnet50", "retinanet"): (8, 16, 32, 64, 128),
        ("resnet50", "faster_rcnn"): (4, 8, 16, 32, 64),
        ("resnet20", "retinanet"): (2, 4, 8, 16),  # CIFAR net: C3..C5 at strides 2/4, P6/P7
        ("resnet20", "faster_rcnn"): (1, 2, 4, 8),  # C2..C5 at strides 1/2/4, max-pool level
    }
    for (backbone, kind), strides in expected_strides.items():
        model = _detector(kind, backbone)
        assert model.backbone.strides == strides
        with torch.no_grad():
            maps = model.backbone.eval()(x)
        assert tuple(x.shape[-2] // m.shape[-2] for m in maps.values()) == strides, (backbone, kind)
        anchors = model.anchor_generator if kind == "retinanet" else model.rpn.anchor_generator
        if kind == "retinanet":
            # octave scales 2^(0, 1/3, 2/3) of 4 x stride (RetinaNet paper), not torchvision's rounded ints
            assert anchors.sizes == tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides)
            assert anchors.aspect_ratios == ((0.5, 1.0, 2.0),) * len(strides)
        else:
            assert anchors.sizes == tuple((8 * s,) for s in strides)
        assert len(anchors.sizes) == len(maps)
    fcos = _detector("fcos", "resnet20")
    assert fcos.anchor_generator.sizes == ((2,), (4,), (8,), (16,))  # FCOS reads the stride off the anchor

    # on a standard stride-4..128 pyramid the sizes are torchvision's defaults (its _default_anchorgen;
    # RetinaNet's truncated to ints there: 32, int(32 * 2 ** (1 / 3)) = 40, int(32 * 2 ** (2 / 3)) = 50, ...)
    assert _detector("faster_rcnn").rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    tv_retina = [[x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))] for x in (32, 64, 128, 256, 512)]
    ours = _detector("retinanet").anchor_generator.sizes
    assert [[math.floor(s) for s in level] for level in ours] == tv_retina
    assert _detector("fcos").anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))


@pytest.mark.parametrize(
    "kind,builder,kwargs",
    [
        ("faster_rcnn", tvd.fasterrcnn_resnet50_fpn, {}),
        ("mask_rcnn", tvd.maskrcnn_resnet50_fpn, {}),
        ("fcos", tvd.fcos_resnet50_fpn, {}),
        ("retinanet", tvd.retinanet_resnet50_fpn, {"p6p7_from": "p5"}),  # torchvision's v1: P6 from P5
    ],
)
def test_resnet50_detectors_have_torchvisions_layout(kind, builder, kwargs):
    # Same modules, names and shapes as torchvision's R50-FPN models (so their weights would load), with
    # num_classes K = 90 giving 91 R-CNN outputs (torchvision's COCO count) and 90 sigmoid outputs.
    def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
        sd = model.state_dict()  # torchvision's unfrozen BN adds batch counters; FrozenBatchNorm2d has none
        return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}

    ours = create_detector(kind, "resnet50", 90, **kwargs)
    reference = builder(weights=None, weights_backbone=None, num_classes=91 if "rcnn" in kind else 90)
    assert shapes(ours) == shapes(reference)


def test_feature_levels_and_roi_names():
    for backbone, names in (("resnet50", ["0", "1", "2", "3"]), ("resnet20", ["0", "1", "2"])):
        model = _detector("mask_rcnn", backbone)
        with torch.no_grad():
            maps = model.backbone.eval()(torch.rand(1, 3, 64, 64))
        assert list(maps) == [*names, "pool"]
        assert model.roi_heads.box_roi_pool.featmap_names == names
        assert model.roi_heads.mask_roi_pool.featmap_names == names
        assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1  # + background
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == NUM_CLASSES + 1
    retina = _detector("retinanet")
    assert retina.head.classification_head.num_classes == NUM_CLASSES  # sigmoid outputs, no background
    assert retina.backbone.fpn.extra_blocks.p6.in_channels == 2048  # P6 from C5 (RetinaNet paper)
    assert _detector("retinanet", p6p7_from="p5").backbone.fpn.extra_blocks.p6.in_channels == 32
    assert _detector("fcos").backbone.fpn.extra_blocks.p6.in_channels == 32  # P6 from P5 (FCOS paper)


def _frozen_bn_only(module: nn.Module) -> bool:
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)]
    return bool(norms) and all(isinstance(m, FrozenBatchNorm2d) for m in norms)


def test_freezing_follows_trainable_stages_and_frozen_bn():
    body = _detector("faster_rcnn").backbone.body  # defaults: 3 of 5 stages train, frozen BN
    for name, module in body.named_children():
        trainable = name in ("layer2", "layer3", "layer4")
        assert all(p.requires_grad == trainable for p in module.parameters()), name
    assert _frozen_bn_only(body)
    assert all(p.requires_grad for p in _detector("faster_rcnn").backbone.fpn.parameters())

    body = _detector("faster_rcnn", frozen_bn=False).backbone.body
    assert _frozen_bn_only(body.layer1) and isinstance(body.bn1, FrozenBatchNorm2d)  # frozen stages whole
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.layer2.modules())

    body = _detector("retinanet", "resnet20", trainable_stages=4, frozen_bn=False).backbone.body
    assert all(p.requires_grad for p in body.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    body = _detector("retinanet", "resnet20", trainable_stages=0).backbone.body
    assert not any(p.requires_grad for p in body.parameters())
    with pytest.raises(ConfigError, match="trainable_stages"):
        _detector("retinanet", "resnet20", trainable_stages=5)  # stem + 3 stages


def test_backbone_checkpoint_loads_without_the_classifier(tmp_path):
    classifier = polyscale.create_model("resnet20", num_classes=10)
    with torch.no_grad():
        for p in classifier.parameters():
            p.uniform_()
    torch.save(classifier.state_dict(), tmp_path / "resnet20.pt")
    model = _detector("faster_rcnn", "resnet20", backbone_checkpoint=tmp_path / "resnet20.pt")
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, classifier.layer3[0].conv1.weight)
    assert torch.equal(body.bn1.weight, classifier.bn1.weight)  # copied into the frozen BN


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="retinanet, free_anchor, fcos, faster_rcnn, mask_rcnn"):
        create_detector("yolo")
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['rpn_top_n'\]"):
        create_detector("faster_rcnn", "resnet20", rpn_top_n=5)
    with pytest.raises(ConfigError, match="GroupNorm"):
        create_detector("fcos", "resnet20", fpn_channels=48)
    with pytest.raises(ConfigError, match="p6p7_from"):
        create_detector("faster_rcnn", "resnet20", p6p7_from="c5")
    with pytest.raises(ConfigError, match="p6p7_from"):
        create_detector("retinanet", "resnet20", p6p7_from="c4")
    with pytest.raises(ConfigError, match="mask_head_dim"):
        create_detector("retinanet", "resnet20", mask_head_dim=8)
    with pytest.raises(ConfigError, match="num_classes"):
        create_detector("retinanet", "resnet20", 0)
    with pytest.raises(ConfigError, match="Unknown model"):
        create_detector("retinanet", "resnet21")


def test_exposed_at_top_level():
    assert polyscale.create_detector is create_detector


def test_mask_rcnn_outputs_feed_the_coco_evaluator():
    torch.manual_seed(0)
    model = _detector("mask_rcnn", "resnet20").eval()
    images, targets = _batch()
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i + 10, "height": h, "width": w} for i, (h, w) in enumerate(SIZES)],
        "categories": [{"id": c} for c in (1, 5, 9)],
        "annotations": [
            {"id": 100 * i + j + 1, "image_id": i + 10, "category_id": (1, 5, 9)[int(label) - 1],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
            for i, t in enumerate(targets)
            for j, ((x0, y0, x1, y1), label) in enumerate(zip(t["boxes"].tolist(), t["labels"]))
        ],
    }  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    evaluator = CocoEvaluator(gt, [1, 5, 9], iou_types=("bbox", "segm"))
    with torch.no_grad():
        evaluator.update(model(images), [10, 11])
    metrics = evaluator.compute(expected_images=2)
    assert set(metrics) >= {"bbox_AP", "bbox_AP50", "segm_AP", "segm_APl"}
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("bbox_AP", "segm_AP"))
