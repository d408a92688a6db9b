"""Test-only reference of the PSConv authors' layer and state-dict generators, written from NOTES.md.

The original layer is the sum of three convs on C channels split into P = 4 contiguous parts per group:
a grouped conv (groups = G*P, dilation d), the same with dilation 2d applied to the input with the two
halves of every group's channels swapped, and a dense (per group) 3x3 conv with dilation 1 whose blocks
(out part o, in part o) and (out part (o+2) mod 4, in part o) are masked to zero. `masked_groups`
restricts the masking to some groups, as the authors' grouped version does by mistake.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

# A copy of the project's reference listing of the released files' keys and shapes.
OFFICIAL = Path(__file__).parent / "data" / "official_state_dicts.json"


def official_shapes() -> dict[str, dict[str, list[int]]]:
    """Model -> key -> shape of the authors' released files."""
    return json.loads(OFFICIAL.read_text())


class OriginalPSConv(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 2,
        parts: int = 4,
        masked_groups: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self.groups = groups
        gp = groups * parts
        self.gwconv = nn.Conv2d(
            in_channels, out_channels, 3, stride, dilation, dilation, groups=gp, bias=False
        )
        d2 = 2 * dilation
        self.gwconv_shift = nn.Conv2d(in_channels, out_channels, 3, stride, d2, d2, groups=gp, bias=False)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)
        og, ig = out_channels // groups, in_channels // groups
        out_part = (torch.arange(og) // (og // parts))[:, None]
        in_part = (torch.arange(ig) // (ig // parts))[None, :]
        block = (in_part == out_part) | (in_part == (out_part + parts // 2) % parts)  # (og, ig)
        mask = torch.zeros(groups, og, ig, dtype=torch.bool)
        for g in range(groups) if masked_groups is None else masked_groups:
            mask[g] = block
        self.register_buffer("mask", mask.flatten(0, 1), persistent=False)  # (C_out, C_in/G)
        with torch.no_grad():
            self.conv.weight[self.mask] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        swapped = x.view(n, self.groups, 2, c // self.groups // 2, h, w).flip(2).reshape(n, c, h, w)
        return self.gwconv(x) + self.gwconv_shift(swapped) + self.conv(x)


def to_original(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every bottleneck's conv2 of a standard ResNet/ResNeXt by an OriginalPSConv (in place)."""
    for name, module in list(model.named_modules()):
        if name.count(".") == 1 and hasattr(module, "conv3"):
            conv = module.conv2
            module.conv2 = OriginalPSConv(
                conv.in_channels, conv.out_channels, conv.stride[0], conv.groups, **kwargs
            )
    return model


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random BN affine parameters and statistics so that channel permutation errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, OriginalPSConv):
                std = (2.0 / m.conv.weight[0].numel()) ** 0.5  # He scale of the effective dense kernel
                for conv in (m.gwconv, m.gwconv_shift, m.conv):
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
                m.conv.weight[m.mask] = 0


def generated_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the keys and shapes of the authors' file `name`, random values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_shapes()[name].items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return out
