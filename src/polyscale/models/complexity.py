"""Model size and cost: parameter counts and multiply-adds (the papers' "GFLOPs").

MACs come from `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add for convolutions and
matrix products), so they count what the operators actually execute: conv + fc, not BN / ReLU / pooling,
which is the convention of PSConv's Table 2 (ResNet-50: 4.089). A PSConv that runs as several grouped
dilated convs counts the same MACs as the dense conv it replaces.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int = 224, in_chans: int = 3) -> int:
    """Multiply-adds of one forward pass on one (in_chans, input_size, input_size) image, in eval mode."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, input_size, input_size, device=param.device, dtype=param.dtype)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
