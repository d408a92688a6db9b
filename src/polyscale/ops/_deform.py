"""DCNv1 (deformable convolution with offsets only, one offset group) as fast as each device allows.

On CUDA this is torchvision.ops.deform_conv2d. On the CPU torchvision's kernel is slow, its backward
most of all (SEPC-lite's training step on the built-in detection set spent 46% of its time there), so
the same function is computed from PyTorch ops: for every kernel tap, the input is sampled bilinearly at
the tap's offset position (F.grid_sample, zero outside the map), and one contraction with the weight
sums over channels and taps. Bilinear sampling with zeros outside is the interpolation torchvision's
kernel uses, so values and gradients (input, weight, offsets) agree to float rounding (tests compare
them in float64); on the CPU it runs a training step about 10x faster at every size we measured
(4x4 to 50x84 maps). It holds the sampled taps, (N, C, kh * kw, H_out, W_out), in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d as _torchvision_deform_conv2d

Pair = tuple[int, int]


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation) without a mask."""
    if x.device.type != "cpu":
        return _torchvision_deform_conv2d(x, offset, weight, bias, stride, padding, dilation)
    return sampled_deform_conv2d(x, offset, weight, bias, stride, padding, dilation)


def sampled_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """DCNv1 from grid_sample and one contraction. x (N, C, H, W), offset (N, 2 kh kw, H_out, W_out) as
    (dy, dx) per tap in row-major tap order, weight (C_out, C, kh, kw); returns (N, C_out, H_out, W_out)."""
    n, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = offset.shape[-2:]
    taps = kh * kw

    def positions(size_out: int, step: int, pad: int, tap_step: int, kernel: int) -> tuple[Tensor, Tensor]:
        base = torch.arange(size_out, device=x.device, dtype=x.dtype) * step - pad  # tap 0's position
        return base, torch.arange(kernel, device=x.device, dtype=x.dtype) * tap_step

    base_y, tap_y = positions(out_h, stride[0], padding[0], dilation[0], kh)
    base_x, tap_x = positions(out_w, stride[1], padding[1], dilation[1], kw)
    offset = offset.view(n, taps, 2, out_h, out_w)
    rows = base_y.view(1, 1, out_h, 1) + tap_y.repeat_interleave(kw).view(1, taps, 1, 1) + offset[:, :, 0]
    cols = base_x.view(1, 1, 1, out_w) + tap_x.repeat(kh).view(1, taps, 1, 1) + offset[:, :, 1]
    # pixel index p -> grid_sample's [-1, 1] with align_corners=False (pixel centres at (2p + 1) / size - 1)
    grid = torch.stack(((2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1), dim=-1)  # (N, K, Ho, Wo, 2)
    sampled = F.grid_sample(
        x, grid.view(n, taps * out_h, out_w, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    ).view(n, channels, taps, out_h, out_w)
    out = torch.einsum("nckhw,ock->nohw", sampled, weight.reshape(out_channels, channels, taps))
    return out if bias is None else out + bias.view(1, -1, 1, 1)
