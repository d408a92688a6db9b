"""Detection backbones: a zoo network's stage outputs, frozen as the papers fine-tune, under an FPN.

`backbone_features` is the zoo's `features_only` extractor (a list of maps plus timm's `feature_info`)
with the stem and lower stages frozen; `FeaturePyramidBackbone` puts torchvision's FPN and the extra
levels of each detector family over any such extractor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from polyscale.models import create_model, freeze_backbone, freeze_batch_norm

__all__ = ["FeaturePyramidBackbone", "LastLevelP6P7", "backbone_features"]


def backbone_features(
    name: str,
    *,
    out_indices: Sequence[int],
    conv: str | Mapping[str, Any] | None = None,
    checkpoint_path: str | Path | None = None,
    trainable_stages: int = 3,
    frozen_bn: bool = True,
) -> nn.Module:
    """The zoo network `name` as a frozen-as-fine-tuned feature extractor (a list of maps, `feature_info`).

    Stages count as torchvision's `trainable_layers`: stem + stages, from the top (`freeze_backbone`).
    A frozen stage is frozen whole: besides requires_grad False its BatchNorms become FrozenBatchNorm2d
    even with `frozen_bn`=False, so that its statistics do not drift in train mode (mmdetection's
    `norm_eval` on frozen stages; torchvision would let them update). `frozen_bn` freezes every BN.
    """
    body = create_model(
        name, features_only=True, out_indices=tuple(out_indices), conv=conv, checkpoint_path=checkpoint_path
    )
    freeze_backbone(body, trainable_stages, frozen_bn=frozen_bn)
    if not frozen_bn:
        for child_name, child in list(body.named_children()):
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                setattr(body, child_name, freeze_batch_norm(child))
    return body


class LastLevelP6P7(ExtraFPNBlock):
    """P6 = 3x3/2 conv of C5 (`from_c5`, RetinaNet paper) or of P5 (FCOS paper); P7 = 3x3/2 conv of ReLU(P6).

    torchvision's class of the same name picks the source by comparing channel counts, which goes wrong
    when C5 happens to have as many channels as the FPN; here the source is explicit.
    """

    def __init__(self, in_channels: int, out_channels: int, *, from_c5: bool) -> None:
        super().__init__()
        self.from_c5 = from_c5
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the FPN's own init (torchvision, Detectron)
            nn.init.zeros_(conv.bias)

    def forward(
        self, results: list[Tensor], inputs: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(inputs[-1] if self.from_c5 else results[-1])
        p7 = self.p7(torch.relu(p6))
        return [*results, p6, p7], [*names, "p6", "p7"]


class FeaturePyramidBackbone(nn.Module):
    """`body` (list of stage maps) -> FPN -> OrderedDict of `out_channels`-channel maps, "0".. + extras.

    The interface torchvision's detectors expect (`out_channels`; names "0".."3" + "pool" for
    MultiScaleRoIAlign), with `strides` recording every output level's stride for the anchor generator.

    Args:
        body: returns a list of maps and has `feature_info` (timm's features_only convention).
        out_channels: FPN width.
        extra: "p6p7_c5" / "p6p7_p5" (two stride-2 conv levels from C5 or P5), "pool" (max-pool P6), or
            None.
    """

    def __init__(self, body: nn.Module, out_channels: int, extra: str | None) -> None:
        super().__init__()
        channels = list(body.feature_info.channels())
        strides = list(body.feature_info.reduction())
        extra_block: ExtraFPNBlock | None
        if extra in ("p6p7_c5", "p6p7_p5"):
            from_c5 = extra == "p6p7_c5"
            extra_block = LastLevelP6P7(
                channels[-1] if from_c5 else out_channels, out_channels, from_c5=from_c5
            )
            strides += [strides[-1] * 2, strides[-1] * 4]
        elif extra == "pool":
            extra_block = LastLevelMaxPool()  # kernel 1, stride 2: a subsampled P5
            strides.append(strides[-1] * 2)
        elif extra is None:
            extra_block = None
        else:
            raise ValueError(f"extra must be p6p7_c5, p6p7_p5, pool or None, got {extra!r}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.in_names = [str(i) for i in range(len(channels))]
        self.strides = tuple(strides)  # one per output level, bottom to top

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict(zip(self.in_names, self.body(x))))
