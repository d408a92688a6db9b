"""What the dilation operators (PSConv2d, DynamicPSConv2d, TwoRateConv2d) share: nn.Conv2d's geometry
arguments, checked the same way, and the weight contract.

Each stores G of PSConv's Eq. (3) as its own `weight`, shaped like nn.Conv2d's, so reading and setting
the dense weight is the parameter itself; what differs between them is the dilation matrix D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polyscale.ops import _checks


class DenseWeight:
    """`dense_weight()` / `load_dense_weight()` for operators whose `weight` is G itself."""

    weight: Tensor

    def _set_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int],
        padding: int | Sequence[int] | None,
        groups: int,
    ) -> int:
        """Check and store nn.Conv2d's geometry (square odd kernel; padding None: k // 2, that of the
        dilation-1 kernels); returns k."""
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        k = _checks.odd_kernel("kernel_size", kernel_size)
        self.kernel_size = (k, k)
        self.stride = _checks.int_pair("stride", stride, minimum=1)
        self.padding = _checks.int_pair("padding", k // 2 if padding is None else padding, minimum=0)
        self.groups = _checks.positive_int("groups", groups)
        _checks.divides("groups", groups, in_channels=in_channels, out_channels=out_channels)
        return k

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
