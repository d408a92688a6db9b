"""SEPC heads on torchvision's RetinaNet / FCOS and the PConv neck on Faster / Mask R-CNN: structure,
parameter counts computed from the layer shapes, the padding-0 option, arguments, and tiny training runs."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import deform_conv2d

from polyscale.config.detection import DetectorConfig
from polyscale.detection import DETECTOR_KINDS, HEADS, create_detector
from polyscale.detection.sepc import (
    PConvNeck,
    PyramidTower,
    SEPCFCOSHead,
    SEPCRetinaNetHead,
    create_head,
    make_towers_deformable,
)
from polyscale.errors import ConfigError
from polyscale.ops.pconv import DeformableConv2d, IntegratedBN, PConv

C, K = 32, 3  # FPN width, classes
ANCHORS = {"retinanet": 9, "fcos": 1}
# 32x48 images and a CIFAR backbone: levels 16x24 .. 2x3, a deformable CPU backward stays cheap
TINY = {"fpn_channels": C, "min_size": 32, "max_size": 48, "size_divisible": 16}
SMALL = {"topk_candidates": 100, "detections_per_img": 10, "score_thresh": 0.0}
RCNN_SMALL = {
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 10,
    "box_score_thresh": 0.0,
    "box_head_dim": 32,
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: a second thread only adds synchronisation (see tests/ops/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(masks: bool = False) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 48, generator=gen), torch.rand(3, 48, 32, generator=gen)]
    boxes = [
        torch.tensor([[4.0, 4.0, 20.0, 16.0], [24.0, 6.0, 44.0, 30.0]]),
        torch.tensor([[5.0, 10, 20, 40]]),
    ]
    targets = [
        {"boxes": boxes[0], "labels": torch.tensor([1, 3])},
        {"boxes": boxes[1], "labels": torch.tensor([2])},
    ]
    if masks:
        for image, t in zip(images, targets):
            m = torch.zeros(len(t["boxes"]), *image.shape[-2:], dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(m, t["boxes"].int().tolist()):
                mask[y0:y1, x0:x1] = 1
            t["masks"] = m
    return images, targets


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Parameter counts from the layer shapes: a 3x3 conv c -> o with bias has 9co + o parameters.
def _conv3(c: int, o: int) -> int:
    return 9 * c * o + o


OFFSET = _conv3(C, 18)  # a deformable kernel's offset conv
PCONV = 3 * _conv3(C, C)
IBN = 2 * C


def _expected_head_params(kind: str, head: str) -> int:
    a = ANCHORS[kind]
    if kind == "retinanet":
        predictions = _conv3(C, a * K) + _conv3(C, a * 4)
    else:
        predictions = _conv3(C, a * K) + _conv3(C, a * 4) + _conv3(C, a)  # + centre-ness
    if head in ("standard", "dcn"):
        tower_conv = _conv3(C, C) + (2 * C if kind == "fcos" else 0)  # FCOS: conv + GroupNorm
        deform = OFFSET if head == "dcn" else 0
        return 2 * 4 * (tower_conv + deform) + predictions
    ibn = head != "pconv"
    deform_pconv = head == "sepc"
    deform_extra = head in ("sepc_lite", "sepc")
    shared = 4 * (PCONV + (3 * OFFSET if deform_pconv else 0) + (IBN if ibn else 0))
    extra = 2 * (_conv3(C, C) + (OFFSET if deform_extra else 0))
    return shared + extra + predictions


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_head_parameter_counts_and_structure(kind, head) -> None:
    model = create_detector(kind, "resnet20", K, head=head, **TINY)
    assert _count(model.head) == _expected_head_params(kind, head)
    plain = RetinaNetHead if kind == "retinanet" else FCOSHead
    assert isinstance(model.head, plain)
    # the loss is torchvision's own, whatever the head
    assert type(model.head).compute_loss is plain.compute_loss
    deformable = [m for m in model.head.modules() if isinstance(m, DeformableConv2d)]
    pconvs = [m for m in model.head.modules() if isinstance(m, PConv)]
    if head == "standard":
        assert type(model.head) is plain and not deformable
    elif head == "dcn":
        assert len(deformable) == 8 and not pconvs  # every tower conv, not the prediction convs
        assert type(model.head.classification_head.cls_logits) is nn.Conv2d
    else:
        tower = model.head.tower
        assert isinstance(tower, PyramidTower) and len(tower.pconvs) == 4 and len(pconvs) == 4
        for branch in (model.head.classification_head, model.head.regression_head):
            assert not any(isinstance(m, nn.Conv2d) for m in branch.conv.modules())  # towers dropped
        assert all(p.deform == (head == "sepc") for p in pconvs)
        assert tower.cls_conv.conv.deform == tower.reg_conv.conv.deform == (head in ("sepc_lite", "sepc"))
        assert all((block.ibn is not None) == (head != "pconv") for block in tower.pconvs)


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_dcn_head_starts_as_the_standard_head(kind) -> None:
    torch.manual_seed(0)
    standard = create_head(kind, "standard", C, ANCHORS[kind], K)
    dcn = make_towers_deformable(copy.deepcopy(standard))
    features = [torch.randn(2, C, s, s) for s in (12, 6, 3)]
    with torch.no_grad():
        expected, out = standard(features), dcn(features)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-4, atol=1e-6)  # zero offsets


@pytest.mark.parametrize("head_class", [SEPCRetinaNetHead, SEPCFCOSHead])
def test_padding_zero_extra_convs_keep_predictions_over_their_locations(head_class) -> None:
    # extra_conv_padding=0 equals the authors' padding-0 (deformable above level 0) conv, zero-padded back
    torch.manual_seed(0)
    head = head_class(C, 1, K, "sepc", extra_conv_padding=0)
    conv = head.tower.cls_conv.conv.conv
    with torch.no_grad():
        conv.offset.weight.normal_(std=0.05)
        conv.offset.bias.normal_(std=0.5)
    sizes = ((9, 7), (5, 4), (3, 3), (2, 1))
    features = [torch.randn(2, C, h, w) for h, w in sizes]
    with torch.no_grad():
        shared = head.tower.pconvs(features)
        cls_out, _ = head.tower(features)
        outputs = head(features)
    for level, (x, y) in enumerate(zip(shared, cls_out)):
        assert y.shape == x.shape
        if min(x.shape[-2:]) < 3:
            assert torch.count_nonzero(y) == 0  # no room for a padding-0 output
            continue
        if level == 0:
            valid = F.conv2d(x, conv.weight, conv.bias)  # (N, C, H - 2, W - 2)
        else:
            offset = F.conv2d(x, conv.offset.weight, conv.offset.bias)
            valid = deform_conv2d(x, offset, conv.weight, conv.bias)
        torch.testing.assert_close(y, F.pad(F.relu(valid), (1, 1, 1, 1)), rtol=1e-5, atol=1e-6)
    assert outputs["cls_logits"].shape == (2, sum(h * w for h, w in sizes), K)


def test_ibn_sync_builds_sync_batch_norm() -> None:
    model = create_detector("retinanet", "resnet20", K, head="sepc_lite", ibn_sync=True, **TINY)
    norms = [m.bn for m in model.head.modules() if isinstance(m, IntegratedBN)]
    assert len(norms) == 4 and all(isinstance(bn, nn.SyncBatchNorm) for bn in norms)
    tower = create_detector(
        "retinanet", "resnet20", K, head="sepc", pconv_align_corners=False, **TINY
    ).head.tower
    assert not any(block.pconv.align_corners for block in tower.pconvs)


@pytest.mark.parametrize("init", ["he", "authors"])
def test_pconv_init_reaches_every_pconv_and_extra_conv(init) -> None:
    torch.manual_seed(0)
    std = {"he": (2 / (9 * 32)) ** 0.5, "authors": 0.01}[init]
    head = create_detector("fcos", "resnet20", K, head="sepc", fpn_channels=32, pconv_init=init).head
    neck = create_detector("faster_rcnn", "resnet20", K, neck_pconv=2, fpn_channels=32, pconv_init=init)
    blocks = [*head.tower.pconvs, *neck.backbone.pconvs]
    convs = [k for b in blocks for k in (b.pconv.up, b.pconv.same, b.pconv.down)]
    convs += [head.tower.cls_conv.conv.conv, head.tower.reg_conv.conv.conv]
    assert len(convs) == 3 * 6 + 2
    for conv in convs:
        assert conv.weight.std().item() == pytest.approx(std, rel=0.1)
    # torchvision's prediction convs and the zero-init offset convs are left as they were
    assert head.classification_head.cls_logits.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert all(torch.count_nonzero(b.pconv.up.offset.weight) == 0 for b in head.tower.pconvs)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_single_stage_detector_with_each_head_trains(kind, head) -> None:
    torch.manual_seed(0)
    model = create_detector(kind, "resnet20", K, head=head, **TINY, **SMALL)
    images, targets = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    model.train()
    losses, learned = [], set()
    for _ in range(6):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        learned |= {n for n, p in model.head.named_parameters() if p.grad is not None and p.grad.any()}
        torch.nn.utils.clip_grad_norm_(params, 35.0)  # as the recipes
        optimizer.step()
        losses.append(loss.item())
    # every head parameter learns, offset convs included (FCOS's ReLU'd box outputs may all start at
    # zero on these two images, so gradients are counted over the steps, not at the first one)
    silent = [n for n, _ in model.head.named_parameters() if n not in learned]
    assert not silent, silent
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and all(len(d["boxes"]) > 0 for d in detections)
    assert all(d["labels"].min() >= 1 and d["labels"].max() <= K for d in detections)


def test_padding_zero_head_trains_a_step() -> None:
    torch.manual_seed(0)
    model = create_detector("retinanet", "resnet20", K, head="sepc", extra_conv_padding=0, **TINY, **SMALL)
    images, targets = _batch()
    losses = model.train()(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_two_stage_detectors_with_a_pconv_neck(kind) -> None:
    torch.manual_seed(0)
    extra = {"mask_head_dim": 8} if kind == "mask_rcnn" else {}
    model = create_detector(kind, "resnet20", K, neck_pconv=2, **TINY, **RCNN_SMALL, **extra)
    neck = model.backbone
    assert isinstance(neck, PConvNeck) and len(neck.pconvs) == 2
    assert neck.strides == neck.pyramid.strides == (1, 2, 4, 8) and neck.in_names == ["0", "1", "2"]
    assert neck.out_channels == C
    assert _count(neck) - _count(neck.pyramid) == 2 * (PCONV + IBN)
    images, targets = _batch(masks=kind == "mask_rcnn")
    with torch.no_grad():
        maps = neck.eval()(torch.rand(1, 3, 32, 48))
    assert list(maps) == ["0", "1", "2", "pool"] and [tuple(m.shape[-2:]) for m in maps.values()] == [
        (32, 48),
        (16, 24),
        (8, 12),
        (4, 6),
    ]

    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.any() for p in neck.pconvs.parameters())
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    if kind == "mask_rcnn":
        assert all(d["masks"].shape[-2:] == image.shape[-2:] for d, image in zip(detections, images))


@pytest.mark.parametrize("kind", DETECTOR_KINDS)
def test_detector_config_defaults_are_accepted_by_every_kind(kind) -> None:
    # the detection task passes every DetectorConfig field that is not None to create_detector
    cfg = DetectorConfig()
    fields = ("head", "neck_pconv", "ibn_sync", "pconv_align_corners", "extra_conv_padding", "pconv_init")
    with torch.device("meta"):
        model = create_detector(kind, "resnet20", K, **TINY, **{f: getattr(cfg, f) for f in fields})
    assert not isinstance(model.backbone, PConvNeck)


def test_bad_arguments_raise_config_errors() -> None:
    # ConfigError renders the message's `argument` marks bare (str) or as config keys (the task)
    def build(kind: str = "retinanet", **kwargs) -> nn.Module:
        return create_detector(kind, "resnet20", K, **{**TINY, **kwargs})

    with pytest.raises(ConfigError, match="standard, dcn, pconv, pconv_ibn, sepc_lite, sepc"):
        build(head="sepc_full")
    with pytest.raises(ConfigError, match="head='sepc' applies to retinanet, free_anchor, fcos only"):
        build("faster_rcnn", head="sepc")
    with pytest.raises(ConfigError, match="neck_pconv=2 applies to faster_rcnn and mask_rcnn only"):
        build(neck_pconv=2)
    with pytest.raises(ConfigError, match="neck_pconv=-1"):
        build("mask_rcnn", neck_pconv=-1)
    with pytest.raises(ConfigError, match="extra_conv_padding=2"):
        build(head="sepc", extra_conv_padding=2)
    with pytest.raises(ConfigError, match="extra_conv_padding=0 applies to the PConv heads"):
        build(head="dcn", extra_conv_padding=0)
    with pytest.raises(ConfigError, match="ibn_sync=True needs integrated BN"):
        build(head="pconv", ibn_sync=True)
    with pytest.raises(ConfigError, match="pconv_align_corners=False needs a PConv"):
        build(pconv_align_corners=False)
    with pytest.raises(ConfigError, match="pconv_init='normal': use he .* or authors"):
        build(head="sepc", pconv_init="normal")
    with pytest.raises(ConfigError, match="pconv_init='authors' needs a PConv head"):
        build(head="dcn", pconv_init="authors")
    with pytest.raises(ConfigError, match="GroupNorm"):
        build("fcos", head="dcn", fpn_channels=24)
    assert isinstance(build("fcos", head="sepc", fpn_channels=24).head, SEPCFCOSHead)  # no GroupNorm there
    with pytest.raises(ConfigError, match="head='x': a PConv tower is one of"):
        PyramidTower(C, "x")
    with pytest.raises(ConfigError, match="neck_pconv=0"):
        PConvNeck(build("faster_rcnn").backbone, 0)
