"""The weight contract shared by the dilation operators (PSConv2d, DynamicPSConv2d, TwoRateConv2d).

Each stores G of PSConv's Eq. (3) as its own `weight`, shaped like nn.Conv2d's, so reading and setting
the dense weight is the parameter itself; what differs between them is the dilation matrix D.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DenseWeight:
    """`dense_weight()` / `load_dense_weight()` for operators whose `weight` is G itself."""

    weight: Tensor

    def dense_weight(self) -> Tensor:
        """G of Eq. (3), (C_out, C_in // groups, k, k): the stored parameter, in nn.Conv2d's channel order."""
        return self.weight

    @torch.no_grad()
    def load_dense_weight(self, weight: Tensor) -> None:
        """Set G; afterwards dense_weight() equals `weight`."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"`weight` must have shape {tuple(self.weight.shape)} (C_out, C_in/groups, k, k), "
                f"got {tuple(weight.shape)}"
            )
        self.weight.copy_(weight)
