"""`out += y` with y's channel blocks permuted, in one pass each way (how PSConv's terms land).

Autograd's own choices are slow here: index_add_ over single channels of an NHWC tensor makes one
strided pass per channel, and the gather in its backward is slower still. Moving whole blocks (one
strided add per block forward, one strided copy per block backward) costs one pass each way in both
memory formats. The permutation is a tuple of Python ints: no index tensors, nothing to move between
devices, no host-device synchronisation.

While a graph is being captured (torch.jit.trace, torch.export and the ONNX exporter built on it) the
same sum is one gather and an out-of-place add instead: tracing refuses the in-place autograd Function,
and export would turn its block adds into scatters (ONNX ScatterElements, half of onnxruntime's time on
PS-ResNet-50).
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


def capturing_graph() -> bool:
    """True while torch.jit.trace or torch.export (the ONNX exporter included) records the forward."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def permuted_add_(out: Tensor, y: Tensor, blocks: tuple[int, int, int], perm: tuple[int, ...]) -> Tensor:
    """In place: out[:, g, perm[j]] += y[:, g, j] over the (groups, m, block) split of the channels.

    Returns the sum: `out` itself, or a new tensor while a graph is captured (use the return value).
    (N, C, H, W) in any memory format.
    """
    if capturing_graph():
        inverse = [0] * len(perm)
        for j, target in enumerate(perm):
            inverse[target] = j
        index = torch.tensor(inverse, device=y.device)
        return out + y.unflatten(1, blocks).index_select(2, index).flatten(1, 3)  # block j lands at perm[j]
    return _PermutedAdd.apply(out, y, blocks, perm)
