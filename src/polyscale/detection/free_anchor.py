"""FreeAnchor: a RetinaNet trained by maximum-likelihood matching of anchors to objects.

Zhang, Wan, Liu, Ji, Ye: "FreeAnchor: Learning to Match Anchors for Visual Object Detection", NeurIPS 2019.
The detector is RetinaNet (same head, anchors and inference); only the training loss differs. Instead of
assigning each anchor to an object by a fixed IoU threshold, every object b_i gets a bag A_i of the n
anchors whose IoU with it is highest, and the loss lets the network choose which of them matches:

    P_ij     = P_ij^cls * P_ij^loc,  P_ij^loc = exp(-w_loc * L_ij)                     (i object, j in A_i)
    L_pos    = -alpha / N * sum_i log Mean-max({P_ij : j in A_i})
    Mean-max(X) = sum_x x / (1 - x) / sum_x 1 / (1 - x)
    L_neg    = -(1 - alpha) / (N n) * sum_{j,k} q_jk^gamma log(1 - q_jk),  q_jk = P_jk^cls (1 - m_jk)

P_ij^cls is the sigmoid score of object i's class at anchor j, L_ij the smooth-L1 distance between anchor
j's regression and the box coder's encoding of b_i (summed over the 4 coordinates), N the number of
objects. m_jk, the probability that anchor j is matched to some object of class k, is the largest over
those objects of a saturated linear function of the IoU between anchor j's *predicted* box and b_i: 0
below `iou_threshold` t, 1 at that object's best IoU over all anchors, linear in between. It weights the
negative term without taking gradient (the paper's P{a_j in A_-} = 1 - m_jk). Mean-max behaves like the
mean while all of a bag's likelihoods are low (every anchor learns early in training) and like the max
once one of them is confident, which is what lets the network settle on the best anchor itself.

`FreeAnchor` is torchvision's RetinaNet with this loss and with labels 1..K, as polyscale's other
single-stage detectors (K sigmoid outputs, label k -> output k - 1). It subclasses torchvision's class
rather than polyscale's RetinaNet so that `polyscale.detection.detectors` can import it without a cycle.
Any head that returns RetinaNet's {"cls_logits", "bbox_regression"} works (the SEPC heads included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import detection as tvd
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from polyscale.errors import ConfigError

__all__ = ["FreeAnchor", "free_anchor_loss", "matched_probability", "mean_max"]

_EPS = 1e-12  # keeps 1 / (1 - x) and log(x) finite; representable in float32


def mean_max(probs: Tensor, dim: int = -1, eps: float = _EPS) -> Tensor:
    """The paper's Mean-max: sum x / (1 - x) over sum 1 / (1 - x), reducing `dim` of `probs` in [0, 1].

    A mean weighted by 1 / (1 - x): the plain mean when all x are equal, close to the max when one x
    nears 1, and always between the two. x is clamped to [eps, 1] and 1 - x to at least eps, the float32-safe
    form of clamping x to [eps, 1 - eps].
    """
    probs = probs.clamp(min=eps)
    weight = 1.0 / (1.0 - probs).clamp(min=eps)
    return (probs * weight).sum(dim) / weight.sum(dim)


@torch.no_grad()
def matched_probability(
    pred_boxes: Tensor, gt_boxes: Tensor, gt_channels: Tensor, num_classes: int, iou_threshold: float
) -> Tensor:
    """m_jk: the probability that anchor j is matched to some object of class k, shape (A, K), no gradient.

    Per object i, a saturated linear function of the IoU between each anchor's predicted box and b_i: 0 below
    `iou_threshold` t, 1 at the best IoU any anchor reaches for b_i, (iou - t) / (best - t) between (all 0
    when even the best is not above t). Per class, the max over its objects (0 for classes without objects).
    It only weights the negative loss, so it is computed without gradient, as in the paper.

    Args:
        pred_boxes: (A, 4) decoded boxes of the anchors, xyxy.
        gt_boxes: (M, 4) object boxes, xyxy.
        gt_channels: (M,) the objects' class output channels, 0..K-1.
        num_classes: K.
        iou_threshold: t.
    """
    iou = box_iou(gt_boxes, pred_boxes)  # (M, A)
    best = iou.amax(dim=1, keepdim=True)  # (M, 1)
    # iou <= best always, so where best <= t the numerator is <= 0 and the clamp gives 0 (no 0 / 0).
    span = (best - iou_threshold).clamp(min=torch.finfo(iou.dtype).tiny)
    per_object = ((iou - iou_threshold) / span).clamp(0.0, 1.0)  # (M, A)
    per_class = iou.new_zeros(num_classes, iou.shape[1])  # (K, A)
    index = gt_channels[:, None].expand_as(per_object)
    per_class.scatter_reduce_(0, index, per_object, reduce="amax")
    return per_class.T  # (A, K)


def free_anchor_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: list[Tensor],
    gt_boxes: list[Tensor],
    gt_channels: list[Tensor],
    box_coder: det_utils.BoxCoder,
    *,
    bag_size: int = 50,
    iou_threshold: float = 0.6,
    alpha: float = 0.5,
    gamma: float = 2.0,
    bbox_reg_weight: float = 0.75,
    smooth_l1_beta: float = 0.11,
) -> dict[str, Tensor]:
    """FreeAnchor's loss of a batch: {"positive_bag", "negative_bag"}, each a scalar (see the module doc).

    Vectorised per image; the sums run over the whole batch and are normalised by its object count N (at
    least 1): the positive term by N, the negative term by N * `bag_size`. An image without objects adds
    only negative terms, with every anchor negative. Computed in float32 (or float64 for float64 inputs)
    with autocast off, so that the likelihoods keep their precision under mixed precision.

    Args:
        cls_logits: (B, A, K) classification logits of the head.
        bbox_regression: (B, A, 4) box regression of the head, in `box_coder`'s encoding.
        anchors: per image (A, 4) anchors, xyxy.
        gt_boxes: per image (M, 4) object boxes, xyxy.
        gt_channels: per image (M,) class output channels 0..K-1 (labels 1..K minus 1).
        box_coder: encodes targets and decodes predictions (RetinaNet's: weights (1, 1, 1, 1)).
        bag_size: n, anchors per object's bag (fewer if the image has fewer anchors).
        iou_threshold: t of the saturated linear matching probability.
        alpha: weight of the positive term; the negative term gets 1 - alpha.
        gamma: focusing exponent of the negative focal loss.
        bbox_reg_weight: w_loc, scales the smooth-L1 distance inside P^loc = exp(-w_loc L).
        smooth_l1_beta: the smooth-L1 transition point.
    """
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    num_classes = cls_logits.shape[-1]
    positive = cls_logits.new_zeros((), dtype=dtype)
    negative = cls_logits.new_zeros((), dtype=dtype)
    num_objects = 0
    with torch.autocast(device_type=cls_logits.device.type, enabled=False):
        for logits, regression, image_anchors, boxes, channels in zip(
            cls_logits, bbox_regression, anchors, gt_boxes, gt_channels
        ):
            logits, regression = logits.to(dtype), regression.to(dtype)  # (A, K), (A, 4)
            image_anchors, boxes = image_anchors.to(dtype), boxes.to(dtype)  # (A, 4), (M, 4)
            num_objects += len(boxes)
            probs = logits.sigmoid()  # (A, K)

            # Positive bags: the n anchors of highest IoU with each object, likelihood P^cls * P^loc.
            bag = (
                box_iou(boxes, image_anchors).topk(min(bag_size, len(image_anchors)), dim=1).indices
            )  # (M, n)
            cls_prob = probs[bag, channels[:, None]]  # (M, n)
            targets = box_coder.encode_single(
                boxes[:, None].expand(*bag.shape, 4).reshape(-1, 4), image_anchors[bag].reshape(-1, 4)
            ).view(*bag.shape, 4)  # (M, n, 4)
            distance = F.smooth_l1_loss(regression[bag], targets, beta=smooth_l1_beta, reduction="none")
            loc_prob = torch.exp(-bbox_reg_weight * distance.sum(-1))  # (M, n)
            positive = positive - mean_max(cls_prob * loc_prob, dim=1).log().sum()

            # Negatives: every anchor and class, weighted by 1 - m (no gradient through m).
            pred_boxes = box_coder.decode_single(regression.detach(), image_anchors)  # (A, 4)
            matched = matched_probability(pred_boxes, boxes, channels, num_classes, iou_threshold)  # (A, K)
            # -log(1 - (1 - m) sigmoid(z)) = softplus(z) - softplus(z + log m): exact where m = 0 (then
            # softplus(z)) and finite for saturated logits, where 1 - q would round to 0.
            bce = F.softplus(logits) - F.softplus(logits + matched.log())  # (A, K)
            focal = (probs * (1.0 - matched)).pow(gamma)  # (A, K)
            negative = negative + (focal * bce).sum()

    num_objects = max(num_objects, 1)
    return {
        "positive_bag": alpha * positive / num_objects,
        "negative_bag": (1.0 - alpha) * negative / (num_objects * bag_size),
    }


class FreeAnchor(tvd.RetinaNet):
    """torchvision's RetinaNet trained with FreeAnchor's loss, with labels 1..K (K sigmoid outputs).

    Built exactly as torchvision's RetinaNet (its keyword arguments pass through; `proposal_matcher`,
    `fg_iou_thresh` and `bg_iou_thresh` are accepted but unused, since FreeAnchor learns the matching);
    the loss hyper-parameters are keyword-only, with the paper's values. Train mode returns
    {"positive_bag", "negative_bag"}; eval mode returns RetinaNet's detections.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        bag_size: int = 50,
        iou_threshold: float = 0.6,
        alpha: float = 0.5,
        gamma: float = 2.0,
        bbox_reg_weight: float = 0.75,
        smooth_l1_beta: float = 0.11,
        **kwargs: Any,
    ) -> None:
        if bag_size < 1:
            raise ConfigError(f"`bag_size`={bag_size} must be at least 1 (anchors per object's bag).")
        if not 0.0 <= iou_threshold < 1.0:
            raise ConfigError(f"`iou_threshold`={iou_threshold} must lie in [0, 1).")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"`alpha`={alpha} must lie in [0, 1] (weight of the positive term).")
        if gamma < 0 or bbox_reg_weight <= 0 or smooth_l1_beta <= 0:
            raise ConfigError(
                f"`gamma`={gamma} must be >= 0 and `bbox_reg_weight`={bbox_reg_weight}, "
                f"`smooth_l1_beta`={smooth_l1_beta} positive."
            )
        super().__init__(backbone, num_classes, **kwargs)  # torchvision's RetinaNet arguments
        self.bag_size = bag_size
        self.iou_threshold = iou_threshold
        self.alpha = alpha
        self.gamma = gamma
        self.bbox_reg_weight = bbox_reg_weight
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        """FreeAnchor's loss in place of RetinaNet's; torchvision's `forward` calls it in train mode.

        Labels 1..K become output channels 0..K-1 here, as polyscale's RetinaNet shifts them.
        """
        cls_logits = head_outputs["cls_logits"]  # (B, A, K)
        num_classes = cls_logits.shape[-1]
        channels = [t["labels"] - 1 for t in targets]
        # a label outside 1..K would silently index another class (label 0 -> channel -1 -> class K)
        labels = torch.cat([t["labels"] for t in targets]) if targets else cls_logits.new_zeros(0)
        if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(
                f"FreeAnchor takes labels 1..{num_classes}; "
                f"got labels {int(labels.min())}..{int(labels.max())}."
            )
        return free_anchor_loss(
            cls_logits,
            head_outputs["bbox_regression"],
            anchors,
            [t["boxes"] for t in targets],
            channels,
            self.box_coder,
            bag_size=self.bag_size,
            iou_threshold=self.iou_threshold,
            alpha=self.alpha,
            gamma=self.gamma,
            bbox_reg_weight=self.bbox_reg_weight,
            smooth_l1_beta=self.smooth_l1_beta,
        )

    def postprocess_detections(self, *args: Any) -> list[dict[str, Tensor]]:
        """RetinaNet's detections with output channel k reported as label k + 1."""
        detections = super().postprocess_detections(*args)
        for d in detections:
            d["labels"] = d["labels"] + 1
        return detections
