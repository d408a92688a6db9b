"""Dynamic PSConv: a learned binary mask chooses, kernel by kernel, the small or the large dilation rate.

Li, Yao, Chen: "PSConv: Squeezing Feature Pyramid into One Compact Poly-Scale Convolutional Layer",
ECCV 2020, section 4.2 ("Pattern of Dilation Rates"): "we develop a learnable binary mask to distinguish
the large dilation rate from the small one. This binary mask is decomposed via the Kronecker product,
where the STE (Straight-Through Estimator) technique is utilized to solve the discrete optimization
problem"; the dynamic PS-ResNet-50 with rates 1 and 2 reaches 21.138% top-1 error. The paper says no
more and no code was released, so the design below is ours (in the spirit of DGConv, Zhang et al.,
ICCV 2019, whose channel-connectivity mask is a Kronecker product of gated 2 x 2 factors).

Eq. (3) with D[c, k] = rates[M[c, k]] for a binary mask M (C_out, C_in / groups):
H = conv(F, G * M, dilation=rates[1]) + conv(F, G * (1 - M), dilation=rates[0]): two convolutions,
twice nn.Conv2d's multiply-adds while the mask is learned; `to_static()` then freezes it into
`TwoRateConv2d` (polyscale.ops.two_rate_conv), which runs every kernel once at its rate (nn.Conv2d's
parameters and multiply-adds).

The mask. Rows are indexed (group, output channel in the group), each padded to a power of two; columns
are the input channels of a group, padded likewise. M is the Kronecker product of binary factors, then
cropped to (C_out, C_in / groups) (so channel counts that are not powers of two just use a corner of a
larger mask):

    M = crop(F_top ⊗ ... ⊗ F_1 ⊗ F_0),   M[c, k] = prod_p F_p[bit p of c, bit p of k]

- local factors F_0 (finest) ... : 2 x 2 while both the local output and the input index still have a
  binary digit at that position, 2 x 1 / 1 x 2 once one of them has run out (at least one factor);
- group factors on top: one 2 x 1 factor per binary digit of the group index (a factor never mixes
  group and input digits, so with groups the same local structure can repeat in every group).

Every factor entry is a gate with its own logit (all logits of a layer are ONE 1-d parameter,
`gate_logits`: 4 per 2 x 2 factor, about 4 log2(C) per layer, no dense mask). Forward: entry = 1 where its
logit is > 0. Backward (STE): the gradient of the soft mask, the same Kronecker product of the gates'
sigmoids, so every gate gets a gradient even where another factor is 0.

Initialisation (`init`): "large" (every factor all ones), "small" (F_0 all zeros, the rest ones: gates
of every factor still receive gradients through the soft mask), "static": PSConv2d's default pattern
{1, 2, 1, 4} in the paper's interleaved layout with its rates > 1 mapped to the large rate, i.e. kernel
(c, k) is large where (k - c) mod 4 is odd, that is where c + k is odd (c local to its group): exactly
F_0 = [[0, 1], [1, 0]] and all other factors ones, for any channel and group count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polyscale.ops import _dilated
from polyscale.ops._dense import DenseWeight
from polyscale.ops.two_rate_conv import TwoRateConv2d, check_rates

__all__ = [
    "GATE_LOGIT",
    "RATE_INITS",
    "DynamicPSConv2d",
    "TwoRateConv2d",  # re-exported: to_static() returns it; defined in polyscale.ops.two_rate_conv
    "convert_to_static",
    "factor_shapes",
    "large_fraction_penalty",
    "mean_large_fraction",
]

RATE_INITS = ("small", "large", "static")
# |logit| of every gate at initialisation: sigmoid(2) = 0.88, so the soft mask of an all-ones product of
# ~10 factors is ~0.3 (not vanishing) while a gate needs a few updates to flip.
GATE_LOGIT = 2.0


def _bits(n: int) -> int:
    """ceil(log2(n)): binary digits of the indices 0..n-1 (0 for n = 1)."""
    return (n - 1).bit_length()


def factor_shapes(out_per_group: int, in_per_group: int, groups: int) -> tuple[tuple[int, int], ...]:
    """Shapes of the Kronecker factors, coarsest first: the group factors (2, 1), then the local ones."""
    a, n, b = _bits(out_per_group), _bits(in_per_group), _bits(groups)
    local = [(2 if p < a else 1, 2 if p < n else 1) for p in range(max(a, n, 1))]  # p = 0: finest
    return ((2, 1),) * b + tuple(reversed(local))


def _initial_factors(shapes: tuple[tuple[int, int], ...], init: str) -> list[list[list[int]]]:
    """The binary factors an `init` starts from (coarsest first), as plain ints."""
    factors = [[[1] * q for _ in range(p)] for p, q in shapes]
    p, q = shapes[-1]  # F_0: the finest local digits of the output (rows) and input (columns) index
    if init == "small":
        factors[-1] = [[0] * q for _ in range(p)]
    elif init == "static":  # large where c + k is odd: the parities of c and k are their digits 0
        factors[-1] = [[(r + s) % 2 for s in range(q)] for r in range(p)]
    return factors


def _kron(factors: Sequence[Tensor]) -> Tensor:
    return functools.reduce(torch.kron, factors)


class DynamicPSConv2d(DenseWeight, nn.Module):
    """Drop-in for nn.Conv2d(in, out, k, stride, padding, groups=groups, bias=bias) whose every kernel
    (c, k) has dilation rates[1] where the learned mask M[c, k] is 1 and rates[0] where it is 0.

    `padding` is the padding of the dilation-1 kernels (None: k // 2, "same"); rate d gets
    padding + (d - 1)(k - 1) / 2, so both rates share centres and the output grid (as in PSConv2d).
    The module stores nn.Conv2d's weight and bias plus `gate_logits` (the mask's few gates, see the
    module docstring); `dilation_matrix()` / `dense_weight()` are its contract, as for PSConv2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | None = None,
        groups: int = 1,
        bias: bool = False,
        *,
        rates: Sequence[int] = (1, 2),
        init: str = "static",
    ) -> None:
        super().__init__()
        k = self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.rates = check_rates(rates)
        if init not in RATE_INITS:
            raise ValueError(f"`init` must be one of {RATE_INITS}, got {init!r}")
        self.init = init
        self.factor_shapes = factor_shapes(out_channels // groups, in_channels // groups, groups)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, k, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # 1-d, like norm weights and biases: exempt from weight decay under optim.no_decay_norm_bias
        self.gate_logits = nn.Parameter(torch.empty(sum(p * q for p, q in self.factor_shapes)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default weight / bias initialisation; the gates as `init` says."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_gates(self.init)

    @torch.no_grad()
    def reset_gates(self, init: str) -> None:
        """Set the mask to `init` ("small", "large" or "static"), every gate at |logit| = GATE_LOGIT."""
        if init not in RATE_INITS:
            raise ValueError(f"`init` must be one of {RATE_INITS}, got {init!r}")
        bits = [v for f in _initial_factors(self.factor_shapes, init) for row in f for v in row]
        logits = torch.tensor([GATE_LOGIT if v else -GATE_LOGIT for v in bits])
        self.gate_logits.copy_(logits)

    # ---- the mask ----

    def _factor_logits(self) -> list[Tensor]:
        sizes = [p * q for p, q in self.factor_shapes]
        return [t.view(s) for t, s in zip(self.gate_logits.split(sizes), self.factor_shapes)]

    def _crop(self, full: Tensor) -> Tensor:
        """(2^b * 2^a, 2^n) Kronecker product -> (C_out, C_in / groups): per group, the top-left corner."""
        g, out_pg, in_pg = self.groups, self.out_channels // self.groups, self.in_channels // self.groups
        per_group = full.view(1 << _bits(g), 1 << _bits(out_pg), full.shape[1])
        return per_group[:g, :out_pg, :in_pg].reshape(self.out_channels, in_pg)

    def factors(self) -> list[Tensor]:
        """The binarised factors (0/1 floats, coarsest first): large_rate_mask() == crop(kron(*factors()))."""
        return [(t > 0).to(t.dtype).detach() for t in self._factor_logits()]

    def soft_mask(self) -> Tensor:
        """The relaxed mask, crop(kron of the gates' sigmoids), (C_out, C_in / groups): the STE's backward."""
        return self._crop(_kron([torch.sigmoid(t) for t in self._factor_logits()]))

    def mask(self) -> Tensor:
        """M as 0/1 floats (C_out, C_in / groups) that carry the STE gradient to `gate_logits`."""
        soft = self.soft_mask()
        hard = self._crop(_kron(self.factors()))
        return hard + (soft - soft.detach())  # the value of hard (exactly), the gradient of soft

    def large_rate_mask(self) -> Tensor:
        """BoolTensor (C_out, C_in / groups): True where kernel (c, k) has the large rate rates[1]."""
        with torch.no_grad():
            return self._crop(_kron(self.factors())) > 0

    def large_fraction(self) -> float:
        """The share of kernels at the large rate (0..1)."""
        return float(self.large_rate_mask().float().mean())

    def large_fraction_estimate(self) -> Tensor:
        """The share of large-rate kernels as a differentiable scalar (the regulariser's input): the exact
        hard share forward, the soft mask's gradient backward. (The soft share itself is a poor estimate:
        products of ~10 sigmoids sit far below 1 where the hard mask is 1.)"""
        return self.mask().mean()

    # ---- the operator's definition ----

    def dilation_matrix(self) -> Tensor:
        """D as a LongTensor (C_out, C_in // groups): rates[1] where the mask is 1, else rates[0]."""
        small, large = self.rates
        return torch.where(self.large_rate_mask(), large, small).long()

    def _padding(self, rate: int) -> tuple[int, int]:
        half = (self.kernel_size[0] - 1) // 2
        return (self.padding[0] + (rate - 1) * half, self.padding[1] + (rate - 1) * half)

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H', W')
        """Two convolutions of the whole input, on the complementary masked weights G * M and G * (1 - M).

        Both run in eval mode too (the mask may still change between calls); `to_static()` gives the
        module with nn.Conv2d's cost.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        m = self.mask().to(self.weight.dtype)[:, :, None, None]  # (C_out, C_in/groups, 1, 1)
        large = self.weight * m
        small = self.weight - large  # G * (1 - M), exactly
        (r0, r1), g = self.rates, self.groups
        y = _dilated.conv2d(x, large, self.bias, self.stride, self._padding(r1), r1, g)
        return y + _dilated.conv2d(x, small, None, self.stride, self._padding(r0), r0, g)

    @torch.no_grad()
    def to_static(self) -> TwoRateConv2d:
        """The operator with today's mask frozen: a TwoRateConv2d with this weight and bias (copies), equal
        to this module's output in eval mode up to float rounding, with nn.Conv2d's parameter count and
        multiply-adds; on this module's device and dtype, in its train/eval mode."""
        static = TwoRateConv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.groups,
            self.bias is not None,
            rates=self.rates,
            large_mask=self.large_rate_mask(),
        ).to(device=self.weight.device, dtype=self.weight.dtype)
        static.weight.copy_(self.weight)
        if self.bias is not None:
            static.bias.copy_(self.bias)
        return static.train(self.training)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, rates={self.rates}, init={self.init!r}"
        )
        s += f", groups={self.groups}" if self.groups != 1 else ""
        return s + (", bias=False" if self.bias is None else "")


# ---- whole networks: analysis, the regulariser, deployment ----


def _dynamic_layers(model: nn.Module) -> list[DynamicPSConv2d]:
    return [m for m in model.modules() if isinstance(m, DynamicPSConv2d)]


def mean_large_fraction(model: nn.Module) -> float | None:
    """The mean over the model's DynamicPSConv2d layers of their large-rate share; None without any."""
    layers = _dynamic_layers(model)
    return sum(m.large_fraction() for m in layers) / len(layers) if layers else None


def large_fraction_penalty(model: nn.Module, target: float) -> Tensor:
    """mean over DynamicPSConv2d layers of (large_fraction_estimate() - target)^2: pulls every layer's
    share of large-rate kernels towards `target` (through the STE); 0 (a tensor) without such layers."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"`large_fraction_target` must lie in [0, 1], got {target!r}")
    layers = _dynamic_layers(model)
    if not layers:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return torch.stack([(m.large_fraction_estimate() - target) ** 2 for m in layers]).mean()


def convert_to_static(model: nn.Module) -> nn.Module:
    """Replace, in place, every DynamicPSConv2d of `model` by its `to_static()`; returns `model`."""
    for name, child in list(model.named_children()):
        if isinstance(child, DynamicPSConv2d):
            setattr(model, name, child.to_static())
        else:
            convert_to_static(child)
    return model
