"""Slow, obviously-correct references of PSConv's Eq. (3), shared by the operator tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def loop_reference(
    x: Tensor, weight: Tensor, dilation: Tensor, stride: int, padding: int, groups: int, bias: Tensor | None
) -> Tensor:
    """Eq. (3) term by term: H[c] += G[c, k, i, j] * F[k, y*s + (i - r) D + r', ...] with explicit loops.

    `padding` is the dilation-1 padding p; the kernel centre of output y sits at input y*s - p + r
    (r = (K - 1) / 2) for every dilation, which is what "same" padding at every dilation means.
    """
    n, c_in, h, w = x.shape
    c_out, in_per_group, k, _ = weight.shape
    out_per_group, r = c_out // groups, (k - 1) // 2
    h_out, w_out = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    margin = padding + r * int(dilation.max())  # enough zeros for the widest kernel
    xp = F.pad(x, (margin,) * 4)
    out = torch.zeros(n, c_out, h_out, w_out, dtype=x.dtype)
    for c in range(c_out):
        for kk in range(in_per_group):
            channel = (c // out_per_group) * in_per_group + kk  # input channel in c's group
            d = int(dilation[c, kk])
            for i in range(k):
                for j in range(k):
                    top = margin - padding + r + (i - r) * d  # padded row of output row 0's tap
                    left = margin - padding + r + (j - r) * d
                    patch = xp[
                        :, channel, top : top + stride * h_out : stride, left : left + stride * w_out : stride
                    ]
                    out[:, c] += weight[c, kk, i, j] * patch
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def masked_reference(
    x: Tensor, weight: Tensor, dilation: Tensor, stride: int, padding: int, groups: int, bias: Tensor | None
) -> Tensor:
    """Eq. (3) as a sum over the distinct rates d of nn.Conv2d(dilation=d) with the other kernels zeroed."""
    k = weight.shape[-1]
    out = 0
    for d in dilation.unique().tolist():
        mask = (dilation == d).to(weight.dtype)[:, :, None, None]
        out = out + F.conv2d(
            x, weight * mask, None, stride, padding + d * (k - 1) // 2 - (k - 1) // 2, d, groups
        )
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def constant_blocks(dilation: Tensor, groups: int) -> list[tuple[int, slice, slice]]:
    """D cut where any row or column changes: (rate, output rows, input columns) of every cell.

    Every cell has one rate. In PSConv's class-contiguous order that is t x t cells per group; in the
    paper's interleaved order it degrades to single channels.
    """
    c_out, in_per_group = dilation.shape
    out_per_group = c_out // groups
    cells = []
    for g in range(groups):
        d = dilation[g * out_per_group : (g + 1) * out_per_group]
        rows = [0] + [r for r in range(1, out_per_group) if not torch.equal(d[r], d[r - 1])] + [out_per_group]
        cols = [0] + [c for c in range(1, in_per_group) if not torch.equal(d[:, c], d[:, c - 1])]
        cols.append(in_per_group)
        for r0, r1 in zip(rows, rows[1:]):
            for c0, c1 in zip(cols, cols[1:]):
                out_rows = slice(g * out_per_group + r0, g * out_per_group + r1)
                in_cols = slice(g * in_per_group + c0, g * in_per_group + c1)
                cells.append((int(d[r0, c0]), out_rows, in_cols))
    return cells


def blocks_reference(
    x: Tensor, weight: Tensor, dilation: Tensor, stride: int, padding: int, groups: int, bias: Tensor | None
) -> Tensor:
    """Eq. (3) as the naive split: one dilated nn.Conv2d per constant cell of D, nothing merged."""
    k, in_per_group = weight.shape[-1], weight.shape[1]
    outputs = []  # (output rows, conv output)
    for rate, rows, cols in constant_blocks(dilation, groups):
        local = slice(cols.start % in_per_group, cols.start % in_per_group + cols.stop - cols.start)
        w = weight[rows, local]
        outputs.append(
            (rows, F.conv2d(x[:, cols], w, None, stride, padding + (rate - 1) * (k - 1) // 2, rate))
        )
    n, _, h, w = outputs[0][1].shape
    out = x.new_zeros(n, weight.shape[0], h, w)
    for rows, y in outputs:
        out = out.index_add(1, torch.arange(rows.start, rows.stop), y)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def reference_of(module, x: Tensor, reference=masked_reference) -> Tensor:
    """A reference applied to a PSConv2d's own dense_weight() / dilation_matrix() (differentiable)."""
    return reference(
        x,
        module.dense_weight(),
        module.dilation_matrix(),
        module.stride[0],
        module.padding[0],
        module.groups,
        module.bias,
    )
