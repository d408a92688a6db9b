"""Pyramidal Convolution (PyConv).

Duta, Liu, Zhu, Shao: "Pyramidal Convolution: Rethinking Convolutional Neural Networks for Visual
Recognition", arXiv:2006.11538, 2020. A PyConv layer has several levels; level i convolves the WHOLE
input with kernel k_i and groups g_i (larger kernels use more groups, which keeps the cost flat) and
produces its share of the output channels; the levels' outputs are concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polyscale.ops import _checks

# PyConvResNet's pyramid per stage (the authors' code): fewer levels as the feature map shrinks, and
# more groups for larger kernels. The defaults of the factory, the model zoo and PyConv2d (stage 1)
# all read these; configs point here instead of restating them.
PYCONV_KERNELS = ((3, 5, 7, 9), (3, 5, 7), (3, 5), (3,))
PYCONV_GROUPS = ((1, 4, 8, 16), (1, 4, 8), (1, 4), (1,))
# PyConvHGResNet ("high grouping"): the same kernels, with twice the inner width and more groups
PYCONV_HG_GROUPS = ((32, 32, 32, 32), (32, 64, 64), (32, 64), (32,))

# PyConv's split of the output channels by number of levels (fractions of out_channels)
DEFAULT_SPLITS = {1: (1,), 2: (1, 1), 3: (1, 1, 2), 4: (1, 1, 1, 1)}


def default_out_splits(out_channels: int, levels: int) -> tuple[int, ...]:
    """PyConv's default split: 4 levels 1/4 each, 3 levels 1/4, 1/4, 1/2, 2 levels 1/2 each, 1 all.

    More than four levels split evenly. ValueError if out_channels cannot be split that way.
    """
    shares = DEFAULT_SPLITS.get(levels, (1,) * levels)
    total = sum(shares)
    if out_channels % total:
        raise ValueError(
            f"out_channels={out_channels} cannot be split into PyConv's {levels}-level shares "
            f"{shares}/{total}; use a multiple of {total} or pass out_splits explicitly"
        )
    return tuple(out_channels // total * share for share in shares)


class PyConv2d(nn.Module):
    """Pyramid of convolutions over the same input, concatenated: (N, C_in, H, W) -> (N, C_out, H', W').

    Level i is nn.Conv2d(in_channels, out_splits[i], kernel_sizes[i], stride, padding=k_i // 2,
    groups=pyramid_groups[i], bias=False), stored in `levels` (state-dict keys `levels.{i}.weight`).
    `pyramid_groups` holds one group count per level (not nn.Conv2d's single `groups`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int] = PYCONV_KERNELS[0],
        pyramid_groups: Sequence[int] = PYCONV_GROUPS[0],
        stride: int = 1,
        *,
        out_splits: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        in_channels = _checks.positive_int("in_channels", in_channels)
        out_channels = _checks.positive_int("out_channels", out_channels)
        kernel_sizes = _checks.int_sequence("kernel_sizes", kernel_sizes)
        pyramid_groups = _checks.int_sequence("pyramid_groups", pyramid_groups)
        stride = _checks.positive_int("stride", stride)
        if len(pyramid_groups) != len(kernel_sizes):
            raise ValueError(
                f"pyramid_groups has {len(pyramid_groups)} entries but kernel_sizes has {len(kernel_sizes)}; "
                "give one group count per pyramid level"
            )
        if out_splits is None:
            out_splits = default_out_splits(out_channels, len(kernel_sizes))
        out_splits = _checks.int_sequence("out_splits", out_splits)
        if len(out_splits) != len(kernel_sizes):
            raise ValueError(
                f"out_splits has {len(out_splits)} entries but kernel_sizes has {len(kernel_sizes)}; "
                "give one output width per pyramid level"
            )
        if sum(out_splits) != out_channels:
            raise ValueError(f"out_splits {out_splits} must sum to out_channels={out_channels}")
        for i, (k, g, split) in enumerate(zip(kernel_sizes, pyramid_groups, out_splits)):
            _checks.odd_kernel(f"kernel_sizes[{i}]", k)
            _checks.divides(f"pyramid_groups[{i}]", g, in_channels=in_channels, **{f"out_splits[{i}]": split})

        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.kernel_sizes, self.pyramid_groups, self.out_splits = kernel_sizes, pyramid_groups, out_splits
        self.levels = nn.ModuleList(
            nn.Conv2d(in_channels, split, k, stride, padding=k // 2, groups=g, bias=False)
            for k, g, split in zip(kernel_sizes, pyramid_groups, out_splits)
        )

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H', W')
        if len(self.levels) == 1:
            return self.levels[0](x)
        return torch.cat([level(x) for level in self.levels], dim=1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_sizes={self.kernel_sizes}, "
            f"pyramid_groups={self.pyramid_groups}, stride={self.stride}, out_splits={self.out_splits}"
        )
