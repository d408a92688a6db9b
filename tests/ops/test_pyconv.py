"""PyConv2d: level shapes and parameter counts, default splits, values, and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyscale.ops import PyConv2d


def test_pyconvresnet50_layer1_levels() -> None:
    """PyConvResNet-50 layer1 conv2 (64 -> 64): kernels 3/5/7/9 with groups 1/4/8/16, 16 outputs each."""
    module = PyConv2d(64, 64, (3, 5, 7, 9), (1, 4, 8, 16))
    shapes = [tuple(level.weight.shape) for level in module.levels]
    assert shapes == [(16, 64, 3, 3), (16, 16, 5, 5), (16, 8, 7, 7), (16, 4, 9, 9)]
    assert sum(p.numel() for p in module.parameters()) == 16 * (64 * 9 + 16 * 25 + 8 * 49 + 4 * 81)
    assert list(module.state_dict()) == [f"levels.{i}.weight" for i in range(4)]
    assert all(
        level.bias is None and level.padding == (level.kernel_size[0] // 2,) * 2 for level in module.levels
    )


@pytest.mark.parametrize(
    ("kernels", "pyramid_groups", "out_channels", "splits"),
    [
        ((3, 5, 7), (1, 4, 8), 128, (32, 32, 64)),  # three levels: 1/4, 1/4, 1/2
        ((3, 5), (1, 4), 256, (128, 128)),  # two levels: 1/2 each
        ((3,), (1,), 512, (512,)),  # one level: a plain 3x3
    ],
)
def test_default_splits(kernels, pyramid_groups, out_channels, splits) -> None:
    module = PyConv2d(64, out_channels, kernels, pyramid_groups)
    assert module.out_splits == splits
    assert tuple(level.out_channels for level in module.levels) == splits


@pytest.mark.parametrize("stride", [1, 2])
def test_forward_is_the_concatenation_of_the_levels(stride) -> None:
    """Every level sees the whole input; outputs concatenate in level order; stride on every level."""
    module = PyConv2d(16, 24, (3, 5, 7), (1, 2, 4), stride, out_splits=(4, 8, 12)).double()
    x = torch.randn(2, 16, 15, 14, dtype=torch.float64)
    expected = torch.cat(
        [
            F.conv2d(x, lvl.weight, None, stride, k // 2, 1, g)
            for lvl, k, g in zip(module.levels, (3, 5, 7), (1, 2, 4))
        ],
        dim=1,
    )
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)
    assert module(x).shape == nn.Conv2d(16, 24, 3, stride, 1)(x.float()).shape


def test_channels_last_and_bf16_autocast() -> None:
    module = PyConv2d(32, 32, (3, 5), (1, 4))
    x = torch.randn(2, 32, 10, 10)
    expected = module(x)
    out = module(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pyramid_groups": (1, 4, 8)}, r"pyramid_groups has 3 entries but kernel_sizes has 4"),
        ({"out_splits": (16, 16, 32)}, r"out_splits has 3 entries but kernel_sizes has 4"),
        ({"out_splits": (16, 16, 16, 8)}, r"out_splits \(16, 16, 16, 8\) must sum to out_channels=64"),
        ({"kernel_sizes": (3, 4, 7, 9)}, r"kernel_sizes\[1\] must be odd"),
        ({"pyramid_groups": (1, 4, 8, 48)}, r"pyramid_groups\[3\]=48 must divide in_channels=64"),
        (
            {"pyramid_groups": (1, 4, 8, 32), "out_splits": (16, 16, 16, 16), "in_channels": 96},
            r"pyramid_groups\[3\]=32 must divide",
        ),
        ({"out_channels": 66}, r"out_channels=66 cannot be split into PyConv's 4-level shares"),
        ({"pyramid_groups": (1, 0, 8, 16)}, r"pyramid_groups\[1\] must be a positive integer"),
        ({"stride": 0}, r"stride must be a positive integer"),
    ],
)
def test_bad_arguments_raise(kwargs, message) -> None:
    args = {"in_channels": 64, "out_channels": 64} | kwargs
    with pytest.raises(ValueError, match=message):
        PyConv2d(**args)
