"""Dilated convolutions with a CPU backward of our own (used by PSConv's dilated terms).

For stride 1 both gradients of a dilated convolution can be written with other, healthier kernels:

- grad_input is the correlation of grad_output with the flipped, per-group transposed kernel at the
  same dilation (a forward convolution): gx = conv2d(gy, flip(w^T), padding=d (k - 1) - p, dilation=d).
- grad_weight[o, i, a, b] = sum_{n,h,w} x_pad[n, i, h + d a, w + d b] gy[n, o, h, w]. Splitting h and
  w by their residue modulo d ("polyphase", space-to-batch) turns it into the weight gradient of an
  UNdilated convolution over d*d phase images: one copy of x and one of gy, then that kernel.

Two cases take this path on the CPU (oneDNN), everything else is plain F.conv2d:

- Depthwise weights (one input channel per group), both gradients: oneDNN runs the backward of a
  dilated depthwise conv on a generic kernel, 2.5-3x slower than these (docs/operators.md).
- bf16 / fp16 channels_last grouped convs (2+ input channels per group), grad_weight only: oneDNN's
  dilated weight gradient there returns non-finite values or crashes the process (torch 2.14.1,
  e.g. groups=2, dilation 4); its undilated one is fine.

Same values as autograd's (up to float summation order; tested in float64), no extra multiply-adds.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _phases(t: Tensor, d: int, left: int, size: tuple[int, int]) -> Tensor:
    """Zero-pad t (N, C, H, W) by `left` at the top/left and to `size` at the bottom/right, then split
    rows and columns by residue mod d: (N * d * d, C, size[0] / d, size[1] / d), channels_last."""
    n, c, h, w = t.shape
    uh, uw = size[0] // d, size[1] // d
    if left % d == 0 and h % d == 0 and w % d == 0:  # the usual case: one strided copy, zero the border
        z = t.new_empty(n, d, d, uh, uw, c)
        a, bh, bw = left // d, left // d + h // d, left // d + w // d
        zv = z.permute(0, 5, 3, 1, 4, 2)  # (N, C, uh, d, uw, d): row u * d + r of the padded image
        zv[:, :, a:bh, :, a:bw, :] = t.view(n, c, h // d, d, w // d, d)
        for border in (zv[:, :, :a], zv[:, :, bh:], zv[:, :, a:bh, :, :a], zv[:, :, a:bh, :, bw:]):
            border.zero_()
    else:  # odd sizes: pad (or crop) first, then one copy
        padded = F.pad(t, (left, size[1] - left - w, left, size[0] - left - h))
        z = padded.view(n, c, uh, d, uw, d).permute(0, 3, 5, 2, 4, 1).contiguous()
    return z.view(n * d * d, uh, uw, c).permute(0, 3, 1, 2)


class _DilatedConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, dilation: int, groups: int
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, 1, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        p, d, groups, has_bias = ctx.conf
        k = weight.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if weight.shape[1] == 1:  # depthwise: weight (C*m, 1, k, k) -> (C, m, k, k), flipped
                flipped = weight.reshape(groups, -1, k, k).flip(-2, -1)
                grad_x = F.conv2d(grad, flipped, None, 1, d * (k - 1) - p, d, groups)
            else:  # oneDNN's own grad_input is fine (and as fast) for wider groups
                grad_x = torch.ops.aten.convolution_backward(
                    grad, x, weight, None, [1, 1], [p, p], [d, d], False, [0, 0], groups, [True, False, False]
                )[0]
        if ctx.needs_input_grad[1]:
            uh, uw = -(-grad.shape[-2] // d), -(-grad.shape[-1] // d)  # phase sizes of grad, rounded up
            xs = _phases(x, d, p, (d * (uh + k - 1), d * (uw + k - 1)))
            gs = _phases(grad, d, 0, (d * uh, d * uw))
            grad_w = torch.ops.aten.convolution_backward(
                gs, xs, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [False, True, False]
            )[1]
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _candidate(
    x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: int
) -> bool:
    """A stride-1 dilated CPU conv with a square kernel, "same"-or-less padding, in a graph."""
    k = weight.shape[-1]
    return (
        x.device.type == "cpu"
        and dilation > 1
        and stride == (1, 1)
        and weight.shape[-2] == k
        and padding[0] == padding[1] <= dilation * (k - 1)
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
    )


def _takes_own_backward(x: Tensor, weight: Tensor, groups: int) -> bool:
    if weight.shape[1] == 1 and groups == x.shape[1]:  # depthwise
        return True
    half = x.dtype in (torch.bfloat16, torch.float16)
    return half and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: int,
    groups: int,
) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups), with our own CPU backward for the
    stride-1 dilated convs listed in the module docstring."""
    if not _candidate(x, weight, stride, padding, dilation):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    autocast = torch.is_autocast_enabled("cpu")
    if autocast:  # the Function runs in one dtype: cast as autocast would, then turn it off inside
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast("cpu", enabled=False) if autocast else contextlib.nullcontext():
        if _takes_own_backward(x, weight, groups):
            return _DilatedConv.apply(x, weight, bias, padding[0], dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
