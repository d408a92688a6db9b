"""FreeAnchor: its loss against hand arithmetic, Mean-max's limits, gradients, a tiny detector training."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

import polyscale.detection.free_anchor as free_anchor_module
from polyscale.detection.backbone import FeaturePyramidBackbone, backbone_features
from polyscale.detection.detectors import anchor_generator
from polyscale.detection.free_anchor import FreeAnchor, free_anchor_loss, matched_probability, mean_max
from polyscale.errors import ConfigError

# ---- plain-float arithmetic for the hand-made case (independent of the module's tensors) ----


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def _encode(box: list[float], anchor: list[float]) -> list[float]:
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
    bw, bh = box[2] - box[0], box[3] - box[1]
    bx, by = box[0] + bw / 2, box[1] + bh / 2
    return [(bx - ax) / aw, (by - ay) / ah, math.log(bw / aw), math.log(bh / ah)]


def _decode(d: list[float], anchor: list[float]) -> list[float]:
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    cx, cy = anchor[0] + aw / 2 + d[0] * aw, anchor[1] + ah / 2 + d[1] * ah
    w, h = aw * math.exp(d[2]), ah * math.exp(d[3])
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _smooth_l1(x: float, beta: float = 0.11) -> float:
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# Anchors: a0 is object 0 itself; a1, a2 share its top-left corner with heights 8 and 5; a3 is far away.
ANCHORS = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 5.0], [20.0, 20.0, 30.0, 30.0]]
# Object 0 (label 1 -> channel 0): IoUs 1, 0.8, 0.5, 0 -> bag {a0, a1} with bag size 2.
# Object 1 (label 2 -> channel 1): IoUs 0.6, 0.75, 0.833, 0 -> bag {a2, a1}.
BOXES = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0]]
CHANNELS = [0, 1]
LOGITS = [[2.0, -1.0], [0.5, 0.3], [-0.5, 1.5], [-3.0, -2.0]]  # (A, K)
# the predictions move and resize a0..a2, so the negative term's predicted-box IoUs differ from the anchors'
REGRESSION = [
    [0.02, -0.05, 0.0, 0.03],
    [0.0, -0.02, 0.02, 0.05],
    [0.0, 0.1, -0.05, 0.2],
    [0.0, 0.0, 0.0, 0.0],
]  # (A, 4)


def _hand_losses(bag_size: int = 2, t: float = 0.6, alpha: float = 0.5, w_loc: float = 0.75) -> tuple:
    """The expected (positive, negative) loss of the hand-made case, in plain floats."""
    bags = [[0, 1], [2, 1]]  # read off the IoU table above
    positive = 0.0
    for box, channel, bag in zip(BOXES, CHANNELS, bags):
        likelihoods = []
        for j in bag:
            target = _encode(box, ANCHORS[j])
            distance = sum(_smooth_l1(p - g) for p, g in zip(REGRESSION[j], target))
            likelihoods.append(_sigmoid(LOGITS[j][channel]) * math.exp(-w_loc * distance))
        weights = [1 / (1 - p) for p in likelihoods]
        mean_max_value = sum(p * w for p, w in zip(likelihoods, weights)) / sum(weights)
        positive -= math.log(mean_max_value)

    predicted = [_decode(d, a) for d, a in zip(REGRESSION, ANCHORS)]
    matched = [[0.0, 0.0] for _ in ANCHORS]  # m_jk
    for box, channel in zip(BOXES, CHANNELS):
        ious = [_iou(p, box) for p in predicted]
        best = max(ious)
        for j, iou in enumerate(ious):
            m = min(1.0, max(0.0, (iou - t) / (best - t)))
            matched[j][channel] = max(matched[j][channel], m)
    negative = 0.0
    for j in range(len(ANCHORS)):
        for k in range(2):
            q = _sigmoid(LOGITS[j][k]) * (1 - matched[j][k])
            negative += q**2 * -math.log(1 - q)
    num_objects = len(BOXES)
    return alpha * positive / num_objects, (1 - alpha) * negative / (num_objects * bag_size)


def _tensors(dtype=torch.float64, requires_grad: bool = False):
    cls_logits = torch.tensor([LOGITS], dtype=dtype, requires_grad=requires_grad)  # (1, A, K)
    regression = torch.tensor([REGRESSION], dtype=dtype, requires_grad=requires_grad)  # (1, A, 4)
    return cls_logits, regression, [torch.tensor(ANCHORS)], [torch.tensor(BOXES)], [torch.tensor(CHANNELS)]


def _loss(cls_logits, regression, anchors, boxes, channels, **kwargs):
    coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    return free_anchor_loss(cls_logits, regression, anchors, boxes, channels, coder, bag_size=2, **kwargs)


def test_hand_made_case_matches_the_paper_arithmetic():
    # the case exercises every branch: a1 sits in both bags, its predicted box is partly matched to both
    # objects (0 < m < 1), a0 / a2 are their objects' best boxes (m = 1) and a3 is matched to nothing
    predicted = [_decode(d, a) for d, a in zip(REGRESSION, ANCHORS)]
    for box in BOXES:
        ious = [_iou(p, box) for p in predicted]
        assert 0.6 < ious[1] < max(ious) and ious[3] == 0.0

    expected_positive, expected_negative = _hand_losses()
    losses = _loss(*_tensors())
    assert set(losses) == {"positive_bag", "negative_bag"}
    assert losses["positive_bag"].item() == pytest.approx(expected_positive, abs=1e-6)
    assert losses["negative_bag"].item() == pytest.approx(expected_negative, abs=1e-6)
    # float32 inputs: the same numbers, and float32 results
    losses32 = _loss(*_tensors(torch.float32))
    assert losses32["positive_bag"].dtype == torch.float32
    assert losses32["positive_bag"].item() == pytest.approx(expected_positive, abs=1e-5)
    assert losses32["negative_bag"].item() == pytest.approx(expected_negative, abs=1e-5)


def test_hyper_parameters_enter_as_the_paper_says():
    for kwargs in ({"alpha": 0.25}, {"iou_threshold": 0.5}, {"bbox_reg_weight": 1.0}):
        hand = {"alpha": "alpha", "iou_threshold": "t", "bbox_reg_weight": "w_loc"}
        expected = _hand_losses(**{hand[k]: v for k, v in kwargs.items()})
        losses = _loss(*_tensors(), **kwargs)
        assert losses["positive_bag"].item() == pytest.approx(expected[0], abs=1e-6), kwargs
        assert losses["negative_bag"].item() == pytest.approx(expected[1], abs=1e-6), kwargs


def test_mean_max_is_the_mean_of_equal_values_and_between_mean_and_max():
    for value in (1e-6, 0.1, 0.5, 0.9, 0.999):
        x = torch.full((5,), value, dtype=torch.float64)
        assert mean_max(x).item() == pytest.approx(value, rel=1e-9)
    x = torch.rand(100, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mm = mean_max(x, dim=1)
    assert (mm >= x.mean(1) - 1e-12).all() and (mm <= x.amax(1) + 1e-12).all()


@pytest.mark.parametrize("delta", [1e-3, 1e-6])
def test_mean_max_tends_to_the_max_as_probabilities_saturate(delta):
    # every pattern of near-0 / near-1 values: Mean-max is within about delta * n of the max
    for pattern in itertools.product((0.0, 1.0), repeat=4):
        x = torch.tensor(pattern, dtype=torch.float64).clamp(delta, 1 - delta)
        assert abs(mean_max(x).item() - max(pattern)) < 5 * delta, pattern
    # and it is safe at exactly 0 and 1 in float32
    x = torch.tensor([[0.0, 1.0, 0.3], [0.0, 0.0, 0.0]])
    mm = mean_max(x, dim=1)
    assert torch.isfinite(mm).all() and mm[0].item() == pytest.approx(1.0) and mm[1].item() < 1e-6


def test_image_without_objects_only_has_negatives():
    cls_logits = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    regression = torch.zeros(2, 4, 4, dtype=torch.float64)
    anchors = [torch.tensor(ANCHORS)] * 2
    empty = torch.zeros(0, 4)
    losses = _loss(cls_logits, regression, anchors, [empty, empty], [torch.zeros(0, dtype=torch.long)] * 2)
    assert losses["positive_bag"].item() == 0.0
    # every anchor negative: sum p^2 * -log(1 - p), normalised by 1 object (at least one) x bag size 2
    expected = sum(_sigmoid(z) ** 2 * -math.log(1 - _sigmoid(z)) for z in cls_logits.flatten().tolist())
    assert losses["negative_bag"].item() == pytest.approx(0.5 * expected / 2, abs=1e-9)

    # mixed with the hand-made image: the empty one adds negatives, the normaliser stays 2 objects
    logits, reg, anchors, boxes, channels = _tensors()
    both = _loss(
        torch.cat([logits, cls_logits[:1]]),
        torch.cat([reg, regression[:1]]),
        anchors * 2,
        boxes + [empty],
        channels + [torch.zeros(0, dtype=torch.long)],
    )
    positive, negative = _hand_losses()
    assert both["positive_bag"].item() == pytest.approx(positive, abs=1e-6)
    empty_part = sum(_sigmoid(z) ** 2 * -math.log(1 - _sigmoid(z)) for z in cls_logits[0].flatten().tolist())
    assert both["negative_bag"].item() == pytest.approx(negative + 0.5 * empty_part / 4, abs=1e-6)


def test_gradients_reach_scores_and_boxes_but_not_through_the_matching():
    cls_logits, regression, anchors, boxes, channels = _tensors(requires_grad=True)
    losses = _loss(cls_logits, regression, anchors, boxes, channels)
    losses["positive_bag"].backward(retain_graph=True)
    # the positive term reaches the scores and boxes of the bag anchors a0..a2, not the far anchor a3
    assert (cls_logits.grad[0, :3].abs().sum(1) > 0).all() and (regression.grad[0, :3].abs().sum(1) > 0).all()
    assert (cls_logits.grad[0, 3] == 0).all() and (regression.grad[0, 3] == 0).all()

    cls_logits.grad, regression.grad = None, None
    losses["negative_bag"].backward()
    assert (cls_logits.grad.abs() > 0).sum() > 0
    # boxes enter the negative term only through the IoU-based weights m, which carry no gradient
    assert regression.grad is None or (regression.grad == 0).all()

    pred = torch.tensor(ANCHORS, requires_grad=True)
    m = matched_probability(pred, torch.tensor(BOXES), torch.tensor(CHANNELS), 2, 0.6)
    assert not m.requires_grad and m.shape == (4, 2)
    # saturated linear: 1 at each object's best box, 0 below the threshold, in between otherwise
    assert m[0, 0] == 1 and m[2, 1] == 1 and m[2, 0] == 0 and m[3].sum() == 0
    assert m[1, 0].item() == pytest.approx((0.8 - 0.6) / (1 - 0.6))
    assert m[1, 1].item() == pytest.approx((0.75 - 0.6) / (50 / 60 - 0.6), rel=1e-5)


def test_loss_is_float32_and_finite_under_autocast_and_saturated_logits():
    cls_logits, regression, anchors, boxes, channels = _tensors(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _loss(cls_logits, regression, anchors, boxes, channels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    big = torch.full((1, 4, 2), 60.0, requires_grad=True)  # sigmoid rounds to 1 in float32
    losses = _loss(big, torch.zeros(1, 4, 4), anchors, boxes, channels)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(big.grad).all()


# ---- the detector ----

NUM_CLASSES = 3
SIZES = [(64, 96), (80, 64)]


def _detector(**kwargs) -> FreeAnchor:
    """A tiny FreeAnchor built as create_detector builds RetinaNet (resnet20 C3..C5, P6/P7 from C5)."""
    body = backbone_features("resnet20", out_indices=(2, 3))
    fpn = FeaturePyramidBackbone(body, 32, "p6p7_c5")
    small = {"topk_candidates": 100, "detections_per_img": 10, "score_thresh": 0.0}
    return FreeAnchor(
        fpn,
        NUM_CLASSES,
        min_size=64,
        max_size=96,
        anchor_generator=anchor_generator("retinanet", fpn.strides),
        **{**small, **kwargs},
    )


LABELS = (torch.tensor([1, 3]), torch.tensor([2]))


def _batch():
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) for h, w in SIZES]
    targets = [
        {
            "boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[10.0, 20.0, 30.0, 70.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def test_detector_trains_and_detects_with_labels_one_to_k():
    torch.manual_seed(0)
    model = _detector(bag_size=20)
    images, targets = _batch()
    # plain SGD with a rate that lowers the loss steadily in 10 steps (Adam or lr 0.5 overshoot here)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    model.train()
    totals = []
    for _ in range(10):
        losses = model(images, targets)
        assert set(losses) == {"positive_bag", "negative_bag"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.95 * totals[0] and totals[-1] == min(totals), totals

    model.eval()
    with torch.no_grad():
        detections = model(images)
    for (h, w), det in zip(SIZES, detections):
        n = len(det["boxes"])
        assert n > 0 and det["scores"].shape == (n,)
        assert det["labels"].min() >= 1 and det["labels"].max() <= NUM_CLASSES
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()


def test_detector_feeds_output_channels_to_the_loss_and_checks_labels(monkeypatch):
    model = _detector(bag_size=8).train()
    images, targets = _batch()
    seen = []
    original = free_anchor_module.free_anchor_loss

    def spy(cls_logits, bbox_regression, anchors, boxes, channels, *args, **kwargs):
        seen.extend(c.tolist() for c in channels)
        assert kwargs["bag_size"] == 8 and cls_logits.shape[-1] == NUM_CLASSES
        return original(cls_logits, bbox_regression, anchors, boxes, channels, *args, **kwargs)

    monkeypatch.setattr(free_anchor_module, "free_anchor_loss", spy)
    model(images, targets)
    assert seen == [[0, 2], [1]]  # labels 1..K -> channels 0..K-1

    targets[1]["labels"] = torch.tensor([0])  # 0 is never an object
    with pytest.raises(ValueError, match="labels 1..3"):
        model(images, targets)


@pytest.mark.parametrize(
    "kwargs",
    [{"bag_size": 0}, {"alpha": 1.5}, {"iou_threshold": 1.0}, {"gamma": -1.0}, {"bbox_reg_weight": 0}],
)
def test_bad_hyper_parameters_are_refused(kwargs):
    with pytest.raises(ConfigError):
        _detector(**kwargs)
