"""Pyramid convolution (PConv), integrated BatchNorm (iBN) and SEPC's scale-equalizing deformable kernels.

Wang, Zhang, Yu, Feng, Zhang: "Scale-Equalizing Pyramid Convolution for Object Detection", CVPR 2020.
PConv is a 3-D convolution over a feature pyramid x_1..x_L (finest first), with three 3x3 kernels shared
by every level. Eq. (2):

    y_l = Upsample(w_1 * x_{l+1}) + w_0 * x_l + w_-1 *_{s2} x_{l-1}

where *_{s2} is a stride-2 convolution and Upsample a bilinear resize to x_l's size; the bottom level
has no x_{l-1} term and the top level no x_{l+1} term (section 3). iBN (section 3.2) normalises with
statistics collected over all levels at once. SEPC (section 4) keeps the kernels but, on every level
above the bottom one, samples their input at offsets predicted from that input (deformable convolution,
DCNv1), so that the shared kernel can stretch to each level's blur.

Every operator here takes and returns a list of (N, C, H_l, W_l) maps, finest level first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyscale.ops import _checks
from polyscale.ops._deform import deform_conv2d

__all__ = ["INITS", "DeformableConv2d", "IntegratedBN", "LevelConv", "PConv"]

# Weight init of PConv's kernels and LevelConv (biases 0 either way):
#   "he": He-normal, std sqrt(2 / (9 * C_in)) for a 3x3 kernel (fan-in, ReLU gain), as convs that feed
#         a BatchNorm usually start;
#   "authors": N(0, 0.01), the authors' code (as mmdetection's RetinaNet head), whatever the width.
# Under iBN the scale of a PConv's weights leaves its output unchanged but not its training: the smaller
# the weights, the larger each SGD step is relative to them. At 64 channels 0.01 is a sixth of the "he"
# std, and the default detection run with the sepc_lite head reached 21.2 box AP50 with "authors" and
# 99.8 with "he" (docs/detection.md, "Initialisation").
INITS = ("he", "authors")
_AUTHORS_STD = 0.01


def _init_conv(conv: nn.Conv2d, init: str) -> None:
    """`init` (one of INITS) for `conv`'s weight; its bias 0."""
    if init == "authors":
        nn.init.normal_(conv.weight, std=_AUTHORS_STD)
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(conv.bias)


def _init_name(value: object) -> str:
    if value not in INITS:
        raise ValueError(f"`init`={value!r}: use one of {', '.join(map(repr, INITS))}")
    return str(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def _level_index(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}`={value!r} must be a level index (0 = the finest level, 1, 2, ...)")
    return value


def _check_levels(features: Sequence[Tensor], channels: int, minimum: int) -> None:
    """ValueError unless `features` holds at least `minimum` 4-D maps with the same batch and `channels`."""
    if isinstance(features, Tensor) or not isinstance(features, Sequence):
        raise ValueError(
            f"`features` must be a list of (N, C, H, W) maps, finest first; got {type(features)}"
        )
    if len(features) < minimum:
        raise ValueError(
            f"`features` has {len(features)} level(s); use at least {minimum} (finest first)"
            + (": PConv convolves across neighbouring levels" if minimum > 1 else "")
        )
    for level, x in enumerate(features):
        if x.dim() != 4 or x.shape[1] != channels or x.shape[0] != features[0].shape[0]:
            raise ValueError(
                f"`features`[{level}] has shape {tuple(x.shape)}; every level must be (N, {channels}, H, W) "
                f"with the same N (N={features[0].shape[0]} at level 0)"
            )


def _resize(x: Tensor, like: Tensor, align_corners: bool) -> Tensor:
    """x bilinearly resized to `like`'s exact (H, W); x itself when the sizes already agree."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=align_corners)


class DeformableConv2d(nn.Conv2d):
    """nn.Conv2d that samples its input at offsets predicted from that input (DCNv1: no mask, one group).

    Unlike torchvision.ops.DeformConv2d, which takes the offsets as a forward argument, this module owns
    the conv that predicts them: `offset`, with the main conv's kernel, stride, padding and dilation and
    2 * kh * kw output channels (18 for 3x3), zero-initialised so that a new module equals the plain conv.
    `forward(x, deform=False)` runs the plain conv with the same weight (SEPC's bottom level).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        *,
        bias: bool = True,
    ) -> None:
        in_channels = _checks.positive_int("`in_channels`", in_channels)
        out_channels = _checks.positive_int("`out_channels`", out_channels)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)
        kh, kw = self.kernel_size
        self.offset = nn.Conv2d(in_channels, 2 * kh * kw, kernel_size, stride, padding, dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> DeformableConv2d:
        """A deformable twin of `conv` that shares its weight and bias Parameters (zero offsets at first)."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"`conv` must have groups=1, zero padding and numeric padding, got groups={conv.groups}, "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        twin = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=conv.bias is not None,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        twin.weight = conv.weight
        twin.bias = conv.bias
        return twin

    def forward(self, x: Tensor, deform: bool = True) -> Tensor:
        if not deform:
            return super().forward(x)
        offset = self.offset(x)  # (N, 2*kh*kw, H_out, W_out): (dy, dx) per kernel tap and output pixel
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation
        )  # (N, C_out, H_out, W_out)


class PConv(nn.Module):
    """Pyramid convolution, Eq. (2): a list of L >= 2 maps in, a list of the same sizes out.

    Three 3x3 convs with biases, each shared by all levels: `up` (applied to x_{l+1}, then bilinearly
    resized to x_l's exact size with `align_corners`, True as in the authors' code), `same` (x_l) and
    `down` (stride 2, applied to x_{l-1}). The bottom (finest) level has no `down` term, the top level no
    `up` term. Sizes need not be powers of two: if the stride-2 `down` output of x_{l-1} is not exactly
    x_l's size (ceil(H_{l-1} / 2) is what a stride-2 pyramid gives), it is bilinearly resized to it too.

    `deform=True` is SEPC: every output level l >= `start_level` (default 1: all but the bottom level)
    runs each kernel as a deformable conv whose offsets come from that kernel's own offset conv
    (`up.offset`, `same.offset`, `down.offset`; zero-initialised, stride 2 for `down`) applied to the
    kernel's input; levels below `start_level` use the plain conv with the same weight.

    `init` "he" (default): He-normal weights, std sqrt(2 / (9 * in_channels)); "authors": std 0.01 as
    the authors' code (see INITS). Biases 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        align_corners: bool = True,
        deform: bool = False,
        start_level: int = 1,
        init: str = "he",
    ) -> None:
        super().__init__()
        self.in_channels = _checks.positive_int("`in_channels`", in_channels)
        self.out_channels = _checks.positive_int("`out_channels`", out_channels)
        self.align_corners = _flag("align_corners", align_corners)
        self.init = _init_name(init)
        self.deform = _flag("deform", deform)
        self.start_level = _level_index("start_level", start_level)
        conv = DeformableConv2d if deform else nn.Conv2d
        self.up = conv(in_channels, out_channels, 3, 1, 1)
        self.same = conv(in_channels, out_channels, 3, 1, 1)
        self.down = conv(in_channels, out_channels, 3, 2, 1)
        for kernel in (self.up, self.same, self.down):
            _init_conv(kernel, self.init)

    def _run(self, conv: nn.Conv2d, x: Tensor, level: int) -> Tensor:
        """`conv` applied to x on behalf of output level `level` (deformable there under SEPC)."""
        if self.deform:
            return conv(x, deform=level >= self.start_level)
        return conv(x)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_levels(features, self.in_channels, minimum=2)
        top = len(features) - 1
        outputs = []
        for level, x in enumerate(features):  # x: (N, C_in, H_l, W_l)
            y = self._run(self.same, x, level)  # (N, C_out, H_l, W_l)
            if level > 0:
                down = self._run(self.down, features[level - 1], level)  # (N, C_out, ~H_{l-1}/2, ...)
                y = y + _resize(down, x, self.align_corners)
            if level < top:
                up = self._run(self.up, features[level + 1], level)  # (N, C_out, H_{l+1}, W_{l+1})
                y = y + F.interpolate(
                    up, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners
                )
            outputs.append(y)
        return outputs

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, align_corners={self.align_corners}, "
            f"deform={self.deform}, start_level={self.start_level}, init={self.init!r}"
        )


class IntegratedBN(nn.Module):
    """One BatchNorm over all levels of a pyramid (the paper's iBN, section 3.2): list in, list out.

    Training statistics are those of all levels' pixels together, as if the levels were concatenated:
    each (N, C, H_l, W_l) map is viewed as (N, C, 1, H_l * W_l), the views are concatenated along the last
    axis and one BatchNorm2d (`bn`) runs on the result, which is split back. In eval mode the running
    statistics normalise every level. Per-level statistics with a shared affine ("single BN") collapse in
    the paper's Fig. 7; pooling the levels also gives the small top levels enough pixels for batches of
    ~4 images. `sync=True` uses nn.SyncBatchNorm (statistics across processes too, for 1-2 images per
    GPU); `nn.SyncBatchNorm.convert_sync_batchnorm(model)` converts an existing model's `bn` likewise.
    """

    def __init__(
        self, num_features: int, *, sync: bool = False, eps: float = 1e-5, momentum: float | None = 0.1
    ) -> None:
        super().__init__()
        self.num_features = _checks.positive_int("`num_features`", num_features)
        norm = nn.SyncBatchNorm if _flag("sync", sync) else nn.BatchNorm2d
        self.bn = norm(num_features, eps=eps, momentum=momentum)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_levels(features, self.num_features, minimum=1)
        sizes = [x.shape[-2] * x.shape[-1] for x in features]
        joined = torch.cat([x.flatten(2) for x in features], dim=2).unsqueeze(2)  # (N, C, 1, sum H_l W_l)
        normed = self.bn(joined).squeeze(2)  # (N, C, sum H_l W_l)
        return [y.view_as(x) for y, x in zip(normed.split(sizes, dim=2), features)]


class LevelConv(nn.Module):
    """One 3x3 conv (`conv`, with a bias) applied to every level of a pyramid: list in, list out.

    The SEPC head's extra per-branch conv (3x3, padding 1, so every level keeps its size). `deform=True`
    makes `conv` a DeformableConv2d (own zero-init offset conv) that deforms on levels >= `start_level`
    and runs plainly, with the same weight, below. `init` "he" (default): He-normal weights, std
    sqrt(2 / (9 * in_channels)); "authors": std 0.01. Biases 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        deform: bool = False,
        start_level: int = 1,
        init: str = "he",
    ) -> None:
        super().__init__()
        self.in_channels = _checks.positive_int("`in_channels`", in_channels)
        out_channels = _checks.positive_int("`out_channels`", out_channels)
        self.deform = _flag("deform", deform)
        self.start_level = _level_index("start_level", start_level)
        conv = DeformableConv2d if deform else nn.Conv2d
        self.conv = conv(in_channels, out_channels, 3, 1, 1)
        _init_conv(self.conv, _init_name(init))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_levels(features, self.in_channels, minimum=1)
        if not self.deform:
            return [self.conv(x) for x in features]
        return [self.conv(x, deform=level >= self.start_level) for level, x in enumerate(features)]
