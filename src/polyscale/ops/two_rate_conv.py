"""TwoRateConv2d: a K x K conv whose every kernel has one of two dilation rates, fixed by a bool mask.

It is the frozen form of Dynamic PSConv (PSConv, ECCV 2020, section 4.2; `DynamicPSConv2d.to_static()` in
polyscale.ops.dynamic_psconv): Eq. (3) with D[c, k] = rates[M[c, k]] for a fixed binary mask M. The
definition is one line (kernel (c, k) at dilation rates[M[c, k]]); the rest of this file is how it runs
fast: `_plan` splits the mask into a few grouped dilated convs that use every kernel exactly once
(nn.Conv2d's parameter count and multiply-adds), with at most two channel gathers and no scatter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polyscale.ops import _dilated
from polyscale.ops._dense import DenseWeight

__all__ = ["TwoRateConv2d", "check_rates"]


def check_rates(rates: Sequence[int]) -> tuple[int, int]:
    """`rates` as (small, large): two positive integers in increasing order."""
    ok = isinstance(rates, Sequence) and not isinstance(rates, str) and len(rates) == 2
    ok = ok and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates)
    if not ok or rates[0] >= rates[1]:
        raise ValueError(
            f"`rates` must be two positive integers, small then large (e.g. [1, 2]), got {rates!r}"
        )
    return int(rates[0]), int(rates[1])


Span = tuple[int, int]  # [start, stop) in TwoRateConv2d's index buffer


@dataclass(frozen=True)
class _Term:
    """One grouped dilated conv of TwoRateConv2d: `groups` blocks of (rows / groups) x cols kernels."""

    rate: int  # 0: rates[0], 1: rates[1]
    groups: int
    rows: int  # output channels of the term (all blocks)
    cols: int  # input channels of one block
    weight: Span | None  # flat (row * C_in/groups + col) indices of its kernels; None: the whole weight
    inputs: Span | None  # input channels, block after block; None: x itself


@dataclass(frozen=True)
class _Plan:
    """How TwoRateConv2d runs: its terms, and how their outputs become (N, C_out, H', W').

    The outputs of one rate's terms, concatenated (plus `pad` zero channels for output channels with no
    kernel at that rate), list every output channel once. The rate-1 outputs are brought into the
    rate-0 order by `align` (without rate-0 terms that order is the natural one), the total into the
    natural order by `order` (None: already in that order): two channel gathers at most, no scatter.
    """

    terms: tuple[_Term, ...]  # rate 0 first
    pad: tuple[int, int]
    align: Span | None
    order: Span | None


def _plan(mask: list[list[bool]], groups: int) -> tuple[_Plan, list[int]]:
    """Split a (C_out, C_in/groups) rate mask into grouped convs, each kernel in exactly one of them.

    Output channels of one group whose kernels of a rate sit on the same input channels form a block;
    blocks of equal shape run as ONE grouped conv on the inputs they need, gathered block after block
    (blocks ordered by their first channel, so that a regular mask such as the static checkerboard gives
    both rates the same channel order). Returns the plan and its index buffer's contents.
    """
    out_channels, in_pg = len(mask), len(mask[0])
    out_pg = out_channels // groups
    terms, index, orders = [], [], []

    def span(values: list[int], identity: int) -> Span | None:
        if values == list(range(identity)):
            return None
        index.extend(values)
        return (len(index) - len(values), len(index))

    for rate in (0, 1):
        blocks: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for c in range(out_channels):
            cols = tuple(k for k in range(in_pg) if mask[c][k] == bool(rate))
            if cols:
                blocks.setdefault((c // out_pg, cols), []).append(c)
        shapes: dict[tuple[int, int], list[tuple[int, tuple[int, ...], list[int]]]] = {}
        for (g, cols), rows in blocks.items():  # (in order of their first channel)
            shapes.setdefault((len(rows), len(cols)), []).append((g, cols, rows))
        order = []
        for (n_rows, n_cols), members in shapes.items():
            weight = [r * in_pg + k for _, cols, rows in members for r in rows for k in cols]
            inputs = [g * in_pg + k for g, cols, _ in members for k in cols]
            order += [r for _, _, rows in members for r in rows]
            terms.append(
                _Term(
                    rate=rate,
                    groups=len(members),
                    rows=n_rows * len(members),
                    cols=n_cols,
                    weight=span(weight, out_channels * in_pg),
                    inputs=span(inputs, groups * in_pg),
                )
            )
        seen = set(order)
        orders.append(order + [c for c in range(out_channels) if c not in seen])  # then the zero channels
    pad = tuple(out_channels - sum(t.rows for t in terms if t.rate == rate) for rate in (0, 1))
    position = {c: i for i, c in enumerate(orders[1])}
    align = span([position[c] for c in orders[0]], out_channels) if pad[1] < out_channels else None
    first = {c: i for i, c in enumerate(orders[0])}
    order = span([first[c] for c in range(out_channels)], out_channels)
    return _Plan(tuple(terms), pad, align, order), index


class TwoRateConv2d(DenseWeight, nn.Module):
    """A K x K conv whose kernel (c, k) has dilation rates[1] where `large_mask[c, k]` is True and
    rates[0] elsewhere: a trained DynamicPSConv2d frozen by `to_static()`.

    Stores nn.Conv2d's `weight` (C_out, C_in/groups, k, k) and `bias`, and the mask as a bool buffer (in
    the state dict: it defines the operator). It runs as a few grouped dilated convs (see `_plan`) that
    use every kernel exactly once: nn.Conv2d's parameter count and multiply-adds. `padding` as in
    DynamicPSConv2d (that of the dilation-1 kernels).
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
        large_mask: Tensor | None = None,
    ) -> None:
        super().__init__()
        k = self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.rates = check_rates(rates)
        shape = (out_channels, in_channels // groups)
        if large_mask is None:
            large_mask = torch.zeros(shape, dtype=torch.bool)
        if tuple(large_mask.shape) != shape:
            raise ValueError(
                f"`large_mask` must have shape {shape} (C_out, C_in/groups), got {tuple(large_mask.shape)}"
            )
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, k, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.register_buffer("large_mask", large_mask.detach().to(torch.bool).clone())
        self._compile()
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def _compile(self) -> None:
        """The conv terms of the current mask (plain ints; the indices as one non-persistent buffer)."""
        self._plan, index = _plan(self.large_mask.cpu().tolist(), self.groups)
        device = self.large_mask.device
        self.register_buffer("_index", torch.tensor(index, dtype=torch.long, device=device), persistent=False)
        self._cached: tuple[tuple, list[Tensor]] | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._compile()  # a loaded mask brings its own terms

    def large_rate_mask(self) -> Tensor:
        """BoolTensor (C_out, C_in / groups): True where kernel (c, k) has the large rate rates[1]."""
        return self.large_mask.clone()

    def large_fraction(self) -> float:
        """The share of kernels at the large rate (0..1)."""
        return float(self.large_mask.float().mean())

    def dilation_matrix(self) -> Tensor:
        """D as a LongTensor (C_out, C_in // groups)."""
        return torch.where(self.large_mask, self.rates[1], self.rates[0]).long()

    def _slice(self, where: Span) -> Tensor:
        return self._index[where[0] : where[1]]

    def _term_weights(self) -> list[Tensor]:
        """Every term's conv weight, gathered from the dense weight; kept between calls without autograd
        (inference), until the weight changes."""
        w, k = self.weight, self.kernel_size[0]
        cache = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = (w._version, w.data_ptr(), w.dtype, w.device) if cache else None
        if cache and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        flat = w.reshape(-1, k, k)  # (C_out * C_in/groups, k, k)
        weights = [
            (w if t.weight is None else flat.index_select(0, self._slice(t.weight))).reshape(
                t.rows, t.cols, k, k
            )
            for t in self._plan.terms
        ]
        self._cached = (key, weights) if cache else None
        return weights

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H', W')
        """The terms' dilated grouped convs, each rate's outputs concatenated, then summed in one order."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        plan, half = self._plan, (self.kernel_size[0] - 1) // 2
        per_rate: list[list[Tensor]] = [[], []]
        for term, w in zip(plan.terms, self._term_weights()):
            inp = x if term.inputs is None else x.index_select(1, self._slice(term.inputs))
            rate = self.rates[term.rate]
            padding = (self.padding[0] + (rate - 1) * half, self.padding[1] + (rate - 1) * half)
            per_rate[term.rate].append(_dilated.conv2d(inp, w, None, self.stride, padding, rate, term.groups))
        sums: list[Tensor | None] = []
        for ys, pad in zip(per_rate, plan.pad):
            if ys and pad:  # zeros for the output channels without a kernel at this rate
                ys.append(ys[0].new_zeros(ys[0].shape[0], pad, *ys[0].shape[2:]))
            sums.append((ys[0] if len(ys) == 1 else torch.cat(ys, 1)) if ys else None)  # (N, C_out, H', W')
        out, large = sums
        if large is not None:
            large = large if plan.align is None else large.index_select(1, self._slice(plan.align))
            out = large if out is None else out + large
        assert out is not None  # every kernel is in some term
        if plan.order is not None:
            out = out.index_select(1, self._slice(plan.order))
        return out if self.bias is None else out + self.bias[:, None, None]

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, rates={self.rates}, large_fraction={self.large_fraction():.3f}"
        )
        s += f", groups={self.groups}" if self.groups != 1 else ""
        return s + (", bias=False" if self.bias is None else "")
