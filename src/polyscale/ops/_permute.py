"""`out += y` with y's channel blocks permuted, in one pass each way (used by PSConv's plans).

Autograd's own choices are slow here: index_add_ over single channels of an NHWC tensor makes one
strided pass per channel, and the gather in its backward is slower still. Moving whole blocks
(one index entry per block) costs a few passes in both memory formats, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _PermutedAdd(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, out: Tensor, y: Tensor, blocks: tuple[int, int, int], perm: Tensor, inverse: tuple[int, ...]
    ) -> Tensor:
        # blocks = (groups, blocks per group, channels per block); view (N, G, m, b, H, W)
        ctx.blocks, ctx.inverse = blocks, inverse
        ctx.mark_dirty(out)
        out.unflatten(1, blocks).index_add_(2, perm, y.unflatten(1, blocks))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # grad_y[:, g, j] = grad[:, g, perm[j]]: one strided block copy per j (a single pass, no zero
        # fill); CPU index_select / index_copy_ go element by element here (5-8x slower)
        grad_y = torch.empty_like(grad)
        src, dst = grad.unflatten(1, ctx.blocks), grad_y.unflatten(1, ctx.blocks)
        for i, j in enumerate(ctx.inverse):
            dst.select(2, j).copy_(src.select(2, i))
        return grad, grad_y, None, None, None


def permuted_add_(
    out: Tensor, y: Tensor, blocks: tuple[int, int, int], perm: Tensor, inverse: tuple[int, ...]
) -> Tensor:
    """In place: out[:, g, perm[j]] += y[:, g, j] over the (groups, m, block) split of the channels.

    `inverse` is perm's inverse permutation. Returns `out`. (N, C, H, W) in any memory format.
    """
    return _PermutedAdd.apply(out, y, blocks, perm, inverse)
