"""Poly-Scale Convolution (PSConv).

Li, Yao, Chen: "PSConv: Squeezing Feature Pyramid into One Compact Poly-Scale Convolutional Layer",
ECCV 2020. Eq. (3): H[c, x, y] = sum_k sum_ij G[c, k, i, j] F[k, x + i D[c, k], y + j D[c, k]],
a K x K convolution whose every kernel (c, k) has its own dilation D[c, k]. D cycles through a
pattern of t rates along the input channels and, shifted by one channel per filter, along the
output channels (`axes="both"`, the paper's design); Table 5's ablations vary it along one axis only.

The module stores ONE dense weight of nn.Conv2d's shape in its own channel order (channels grouped
by dilation class, see `psconv_terms`), so it has nn.Conv2d's parameter count and multiply-adds, and
runs as a handful of grouped dilated convolutions with no input copies (`psconv_impls`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polyscale.ops import _checks
from polyscale.ops._dense import DenseWeight
from polyscale.ops.psconv_impls import choose_impl, compile_impls, cpu_chunk_size
from polyscale.ops.psconv_terms import AXES, IMPLS, Layout, class_matrix


class PSConv2d(DenseWeight, nn.Module):
    """Drop-in for nn.Conv2d(in, out, k, stride, padding, groups=groups, bias=bias) with Eq. (3)'s D.

    `padding` is the padding of the dilation-1 kernels (None: k // 2, "same"); dilation d gets
    padding + (d - 1)(k - 1) / 2 so all kernels share centres and the output grid, at any stride.
    `impl` picks how Eq. (3) is split into convolutions ("grouped", "shifts" or "depthwise": the same
    values, different conv terms, see psconv_terms.build_terms) and is fixed at construction; None
    compiles them all and runs, per call, what psconv_impls.choose_impl picks for the input: "grouped"
    unless measurements for its device and shape say otherwise.
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
        dilation_pattern: Sequence[int] = (1, 2, 1, 4),
        axes: str = "both",
        impl: str | None = None,
    ) -> None:
        super().__init__()
        k = self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.dilation_pattern = _checks.int_sequence("dilation_pattern", dilation_pattern)
        if axes not in AXES:
            raise ValueError(f"axes must be one of {AXES}, got {axes!r}")
        self.axes = axes
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"impl must be None (per-device default) or one of {tuple(IMPLS)}, got {impl!r}")
        self.impl = impl
        in_per_group, out_per_group = in_channels // groups, out_channels // groups
        t = len(self.dilation_pattern)
        if t > in_per_group:
            raise ValueError(
                f"dilation_pattern has {t} rates but each group has only in_channels/groups={in_per_group} "
                f"input channels; use a pattern of at most {in_per_group} rates or fewer groups"
            )

        self._layout = Layout.build(in_per_group, out_per_group, t)
        self._matrix = class_matrix(self.dilation_pattern, axes)
        # the impls that may run (impl=None: all, chosen per call); their terms' weight rows as ONE
        # index buffer, non-persistent: it follows .to() and stays out of state dicts
        self._impls, rows = compile_impls(
            IMPLS if impl is None else (impl,),
            self._layout,
            self._matrix,
            groups,
            k,
            self.stride,
            self.padding,
        )
        self.register_buffer("_term_rows", rows, persistent=False)

        self.weight = nn.Parameter(torch.empty(out_channels, in_per_group, k, k))  # module order
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default initialisation (same fan-in, so the same distribution)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- the operator's definition, in the module's own channel order ----

    def dilation_matrix(self) -> Tensor:
        """D as a LongTensor (C_out, C_in // groups); the same class pattern repeats in every group."""
        layout = self._layout
        rows = [[self._matrix[b][a] for a in layout.input_classes()] for b in layout.output_classes()]
        return torch.tensor(rows, dtype=torch.long, device=self.weight.device).repeat(self.groups, 1)

    def paper_order(self) -> tuple[Tensor, Tensor]:
        """(out_index, in_index) with dilation_matrix()[out_index][:, in_index] == the paper's layout.

        In the paper's interleaved layout channel k of a group has class k mod t, so its D is
        D[c, k] = pattern[(k - c) mod t] for axes="both". out_index spans all C_out channels,
        in_index the C_in // groups channels of one group. Converters use it to relabel weights.
        """
        out_local = self._layout.interleaved_outputs()
        per_group = self.out_channels // self.groups
        out_index = [g * per_group + i for g in range(self.groups) for i in out_local]
        return torch.tensor(out_index), torch.tensor(self._layout.interleaved_inputs())

    def forward(self, x: Tensor, impl: str | None = None) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H', W')
        """Eq. (3) as the sum of a few dilated grouped convs (the impl's terms; "grouped" runs three for
        {1, 2, 1, 4}). `impl` overrides the module's choice for this one call (the autotuner's timing)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        chosen = self._impls[impl or self.impl or choose_impl(self, x)]
        weights = chosen.term_weights(self.weight, self._term_rows)  # gathered once, shared by all chunks
        chunk = cpu_chunk_size(x)
        if chunk >= x.shape[0]:
            return chosen.run(x, weights, self.bias, self._term_rows)
        # CPU: a few samples at a time, so every term's output and the running sum stay in cache
        return torch.cat([chosen.run(part, weights, self.bias, self._term_rows) for part in x.split(chunk)])

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation_pattern={self.dilation_pattern}, axes={self.axes!r}"
        )
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s + (f", impl={self.impl!r}" if self.impl else "")
