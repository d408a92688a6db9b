"""`out += y` with y's channel blocks permuted, in one pass each way (how PSConv's terms land).

Autograd's own choices are slow here: index_add_ over single channels of an NHWC tensor makes one
strided pass per channel, and the gather in its backward is slower still. Moving whole blocks (one
strided add per block forward, one strided copy per block backward) costs one pass each way in both
memory formats. The permutation is a tuple of Python ints: no index tensors, nothing to move between
devices, no host-device synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _PermutedAdd(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, out: Tensor, y: Tensor, blocks: tuple[int, int, int], perm: tuple[int, ...]
    ) -> Tensor:
        # blocks = (groups, blocks per group, channels per block); view (N, G, m, b, H, W)
        ctx.blocks, ctx.perm = blocks, perm
        ctx.mark_dirty(out)
        dst, src = out.unflatten(1, blocks), y.unflatten(1, blocks)
        for j, target in enumerate(perm):
            dst.select(2, target).add_(src.select(2, j))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # grad_y[:, g, j] = grad[:, g, perm[j]]: one strided block copy per j (a single pass, no zero
        # fill); CPU index_select / index_copy_ go element by element here (5-8x slower)
        grad_y = torch.empty_like(grad)
        src, dst = grad.unflatten(1, ctx.blocks), grad_y.unflatten(1, ctx.blocks)
        for j, target in enumerate(ctx.perm):
            dst.select(2, j).copy_(src.select(2, target))
        return grad, grad_y, None, None


def permuted_add_(out: Tensor, y: Tensor, blocks: tuple[int, int, int], perm: tuple[int, ...]) -> Tensor:
    """In place: out[:, g, perm[j]] += y[:, g, j] over the (groups, m, block) split of the channels.

    Returns `out`. (N, C, H, W) in any memory format.
    """
    return _PermutedAdd.apply(out, y, blocks, perm)
