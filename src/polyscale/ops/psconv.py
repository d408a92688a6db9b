"""Poly-Scale Convolution (PSConv).

Li, Yao, Chen: "PSConv: Squeezing Feature Pyramid into One Compact Poly-Scale Convolutional Layer",
ECCV 2020. Eq. (3): H[c, x, y] = sum_k sum_ij G[c, k, i, j] F[k, x + i D[c, k], y + j D[c, k]],
a K x K convolution whose every kernel (c, k) has its own dilation D[c, k]. D cycles through a
pattern of t rates along the input channels and, shifted by one channel per filter, along the
output channels (`axes="both"`, the paper's design); Table 5's ablations vary it along one axis only.

The module stores ONE dense weight of nn.Conv2d's shape in its own channel order (channels grouped
by dilation class, see `psconv_plan`), so it has nn.Conv2d's parameter count and multiply-adds, and
runs as a handful of grouped dilated convolutions with no input copies.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from polyscale.ops import _checks, _dilated
from polyscale.ops._permute import permuted_add_
from polyscale.ops.psconv_plan import (
    AXES,
    PLAN_MODES,
    ConvTerm,
    Layout,
    block_permutation,
    build_plan,
    class_matrix,
    global_rows,
    tiling,
)

IMPLS = PLAN_MODES  # formulations, see psconv_plan.build_plan ("blocks" is the naive one)
# Fastest formulation per device type, measured with scripts/bench_conv.py (docs/operators.md). CUDA
# was not measured in the session that wrote this; "grouped" is also the fewest kernel launches there.
DEFAULT_IMPL = {"cpu": "grouped", "cuda": "grouped"}
# ... and where each dilation class holds at most SMALL_CLASS_CHANNELS channels per group (ResNeXt-50
# layer1 and layer2: 4 and 8 channels per group, t = 4): oneDNN runs depthwise convs much faster than
# 2- and 4-channel groups, so the all-depthwise split wins (for 1-channel classes it is "shifts").
SMALL_CLASS_IMPL = {"cpu": "depthwise"}
SMALL_CLASS_CHANNELS = 2


# CPU: run the layer on chunks of the batch whose input is at most this many bytes (at least one
# sample). A PSConv is a sum of several convolutions; on a whole large batch every term's output and
# the running sum leave the cache, and the layer becomes memory-bound. Measured with
# scripts/bench_conv.py on a 2-core EPYC (docs/operators.md): 1.5x faster forward+backward for
# ResNeXt-50 layer1 (8 x 128 x 56 x 56), neutral for small layers. 0 turns chunking off.
CPU_CHUNK_BYTES = 2 << 20


def cpu_chunk_size(x: Tensor) -> int:
    """Samples per chunk for input x on the CPU (see CPU_CHUNK_BYTES): the whole batch when it fits."""
    per_sample = x[0].numel() * x.element_size()
    if CPU_CHUNK_BYTES <= 0 or per_sample == 0:
        return x.shape[0]
    return min(x.shape[0], max(1, CPU_CHUNK_BYTES // per_sample))


# Devices where impl=None measures instead of trusting DEFAULT_IMPL, when torch.backends.cudnn.benchmark
# is on (the trainer's setting on GPUs unless trainer.deterministic): like cuDNN's own algorithm search,
# the first call for each layer configuration and input signature times every formulation (forward,
# plus backward when grad is enabled) and keeps the fastest for the rest of the process.
AUTOTUNE_DEVICES = frozenset({"cuda"})
AUTOTUNE_REPEATS = 3
_TUNED: dict[tuple, str] = {}


def autotuned() -> dict[tuple, str]:
    """The formulations chosen so far: {(layer config, input signature): impl}."""
    return dict(_TUNED)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of fn(), with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for NHWC-strided tensors, else contiguous (what nn.Conv2d's output follows)."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


class PSConv2d(nn.Module):
    """Drop-in for nn.Conv2d(in, out, k, stride, padding, groups=groups, bias=bias) with Eq. (3)'s D.

    `padding` is the padding of the dilation-1 kernels (None: k // 2, "same"); dilation d gets
    padding + (d - 1)(k - 1) / 2 so all kernels share centres and the output grid, at any stride.
    `impl` picks the formulation ("grouped", "shifts", "blocks" or "depthwise": the same values, different
    convolution splits, see psconv_plan.build_plan); None picks the fastest measured for the
    input's device (`default_impl`), or on CUDA with torch.backends.cudnn.benchmark on, times them
    all once per layer configuration and input signature and keeps the fastest (AUTOTUNE_DEVICES).
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
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.out_channels = _checks.positive_int("out_channels", out_channels)
        k = _checks.odd_kernel("kernel_size", kernel_size)
        self.kernel_size = (k, k)
        self.stride = _checks.int_pair("stride", stride, minimum=1)
        self.padding = _checks.int_pair("padding", k // 2 if padding is None else padding, minimum=0)
        self.groups = _checks.positive_int("groups", groups)
        _checks.divides("groups", groups, in_channels=in_channels, out_channels=out_channels)
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
        self._plans = {name: build_plan(self._layout, self._matrix, name) for name in IMPLS}
        self._concat: dict[str, tuple | None] = {}
        self._placement: dict[str, list] = {}
        for name in IMPLS:
            self._compile(name)

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

    def dense_weight(self) -> Tensor:
        """G of Eq. (3), (C_out, C_in // groups, k, k): the stored parameter itself."""
        return self.weight

    @torch.no_grad()
    def load_dense_weight(self, weight: Tensor) -> None:
        """Set G (in this module's channel order); afterwards dense_weight() equals `weight`."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"weight must have shape {tuple(self.weight.shape)} (C_out, C_in/groups, k, k), "
                f"got {tuple(weight.shape)}"
            )
        self.weight.copy_(weight)

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

    # ---- execution ----

    def default_impl(self, device_type: str) -> str:
        """The formulation used when impl=None, for inputs on `device_type` ("cpu", "cuda", ...)."""
        if self.in_channels // self.groups <= SMALL_CLASS_CHANNELS * len(self.dilation_pattern):
            return SMALL_CLASS_IMPL.get(device_type, DEFAULT_IMPL.get(device_type, "grouped"))
        return DEFAULT_IMPL.get(device_type, "grouped")

    def _compile(self, impl: str) -> None:
        """Precompute, as Python ints plus small index buffers, how each term of a plan is run."""
        plan, per_group = self._plans[impl], self.out_channels // self.groups
        rows = [global_rows(term, self.groups, per_group) for term in plan]
        # terms writing disjoint channels join as one cat (axes="output"); one term needs no joining
        self._concat[impl] = tiling(rows, self.out_channels) if len(plan) > 1 else None
        self._placement[impl] = []
        for i, term in enumerate(plan):
            if term.rows == tuple(range(per_group)):
                self._placement[impl].append("add")
                continue
            # weight rows to gather (and scatter targets); buffers follow .to(device), not in state dicts
            self.register_buffer(f"_rows_{impl}_{i}", torch.tensor(rows[i]), persistent=False)
            blocks = block_permutation(term.rows, per_group)
            if blocks is None:  # not a permutation (uneven classes in the "blocks" plan)
                self._placement[impl].append("scatter")
                continue
            size, perm = blocks
            self._placement[impl].append(((self.groups, len(perm), size), tuple(perm)))

    def _term_weight(self, term: ConvTerm, rows: Tensor | None) -> Tensor:
        """The conv weight of one term, gathered from the dense weight (differentiable, small)."""
        k = self.kernel_size[0]
        weight = self.weight if rows is None else self.weight.index_select(0, rows)
        weight = weight[:, term.in_start : term.in_stop]  # (G*m*co, m*ci, k, k)
        m = term.groups
        if m == 1:
            return weight
        co, ci = len(term.rows) // m, term.in_per_group
        # conv group j only sees input slice j: keep the diagonal blocks
        blocks = weight.reshape(self.groups, m, co, m, ci, k, k).diagonal(dim1=1, dim2=3)
        return blocks.movedim(-1, 1).reshape(self.groups * m * co, ci, k, k)

    def _term_inputs(self, x: Tensor, plan: tuple[ConvTerm, ...]) -> list[Tensor]:
        """The input of every term: x itself, or its slice of every group (one split, no zero-fill)."""
        per_group = self.in_channels // self.groups
        if all(term.in_start == 0 and term.in_stop == per_group for term in plan):
            return [x] * len(plan)
        cuts = sorted({0, per_group} | {c for term in plan for c in (term.in_start, term.in_stop)})
        grouped = x.unflatten(1, (self.groups, per_group))  # (N, G, C_in/G, H, W)
        pieces = grouped.split([b - a for a, b in zip(cuts, cuts[1:])], dim=2)
        channels_last = _memory_format(x) == torch.channels_last
        inputs = []
        for term in plan:
            if term.in_start == 0 and term.in_stop == per_group:
                inputs.append(x)
                continue
            first, last = cuts.index(term.in_start), cuts.index(term.in_stop)
            part = pieces[first] if last == first + 1 else torch.cat(pieces[first:last], dim=2)
            if channels_last:  # keep NHWC (one copy at most): merge (G, slice) behind H, W
                part = part.permute(0, 3, 4, 1, 2).flatten(3, 4).contiguous().permute(0, 3, 1, 2)
            else:
                part = part.flatten(1, 2)
            inputs.append(part)
        return inputs

    def _place(self, out: Tensor, y: Tensor, impl: str, i: int) -> Tensor:
        """Add term i's conv output into `out` at its channels (in place: no conv saves its output)."""
        placement = self._placement[impl][i]
        if placement == "add":
            return out.add_(y)
        if placement == "scatter":
            return out.index_add_(1, getattr(self, f"_rows_{impl}_{i}"), y)
        blocks, perm = placement
        return permuted_add_(out, y, blocks, perm)  # whole blocks move, one pass each way

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H', W')
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self._run(x, self._choose_impl(x))

    def _run(self, x: Tensor, impl: str) -> Tensor:
        weights = [
            self._term_weight(term, getattr(self, f"_rows_{impl}_{i}", None))
            for i, term in enumerate(self._plans[impl])
        ]  # gathered once, shared by all chunks
        chunk = cpu_chunk_size(x) if x.device.type == "cpu" else x.shape[0]
        if chunk >= x.shape[0]:
            return self._forward(x, impl, weights)
        # CPU: a few samples at a time, so the terms' outputs and sums stay in cache (docs/operators.md)
        return torch.cat([self._forward(part, impl, weights) for part in x.split(chunk)])

    def _choose_impl(self, x: Tensor) -> str:
        """self.impl if set; else the autotuned choice (AUTOTUNE_DEVICES) or the device's default."""
        if self.impl is not None:
            return self.impl
        device = x.device.type
        if (
            device not in AUTOTUNE_DEVICES
            or not torch.backends.cudnn.benchmark
            or torch.compiler.is_compiling()
        ):
            return self.default_impl(device)
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        config = (
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.groups,
        )
        config += (self.dilation_pattern, self.axes, self.bias is not None)
        signature = (
            tuple(x.shape),
            x.dtype,
            _memory_format(x),
            str(x.device),
            torch.is_grad_enabled(),
            autocast,
        )
        key = (config, signature)
        if key not in _TUNED:
            _TUNED[key] = self._fastest_impl(x)
        return _TUNED[key]

    def _fastest_impl(self, x: Tensor) -> str:
        """Time every formulation on x (forward, and backward to x and the weights when grad is on)."""
        grad = torch.is_grad_enabled()
        params = [p for p in self.parameters() if p.requires_grad] if grad else []

        def step(impl: str) -> None:
            inp = x.detach().requires_grad_(grad)
            out = self._run(inp, impl)
            if grad:  # autograd.grad: nothing lands in .grad
                torch.autograd.grad(out, [inp, *params], torch.ones_like(out))

        times = {}
        for impl in IMPLS:
            step(impl)  # warm-up (cuDNN's own search, allocations)
            run = functools.partial(step, impl)
            times[impl] = statistics.median(_seconds(run, x.device) for _ in range(AUTOTUNE_REPEATS))
        return min(times, key=times.__getitem__)

    def _forward(self, x: Tensor, impl: str, weights: list[Tensor]) -> Tensor:
        plan, concat = self._plans[impl], self._concat[impl]
        # the first term seeds the sum (and adds the bias) when it writes every channel in order
        seeded = concat is None and self._placement[impl][0] == "add"
        half = (self.kernel_size[0] - 1) // 2
        ys, out = [], None
        for i, (term, inp, weight) in enumerate(zip(plan, self._term_inputs(x, plan), weights)):
            padding = tuple(p + (term.dilation - 1) * half for p in self.padding)  # same centres
            bias = self.bias if seeded and i == 0 else None
            groups = self.groups * term.groups
            y = _dilated.conv2d(inp, weight, bias, self.stride, padding, term.dilation, groups)
            if concat is not None:
                ys.append(y)
            elif seeded and i == 0:
                out = y
            else:
                if out is None:  # no term covers every channel in order: start from zeros
                    out = y.new_zeros(y.shape[0], self.out_channels, *y.shape[2:])
                    out = out.contiguous(memory_format=_memory_format(x))
                out = self._place(out, y, impl, i)
        if concat is not None:  # terms write disjoint channels (axes="output"): one cat of views
            sizes, order = concat
            pieces = [y.split(s, dim=1) for y, s in zip(ys, sizes)]
            out = torch.cat([pieces[t][j] for t, j in order], dim=1)
        assert out is not None
        if self.bias is not None and not seeded:
            out = out + self.bias.to(out.dtype).view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation_pattern={self.dilation_pattern}, axes={self.axes!r}"
        )
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s + (f", impl={self.impl!r}" if self.impl else "")
