"""How PSConv runs: its impls compiled per layer, which impl runs, and CPU batch chunking.

Every impl computes the same Eq. (3) (psconv.py) as a sum of a few dilated grouped convolutions, its
*terms* (psconv_terms.py); impls differ only in how D is split into terms, and so in speed per device
and shape (docs/operators.md, "Impls" and "Speed"). Kept apart from the operator's definition:

- `PSConvImpl`: one impl compiled for one layer: each term's weight gathered from the dense weight,
  its input (x itself or a slice of every group) and where its output lands (in place, whole channel
  blocks at a time).
- `choose_impl`: the impl for PSConv2d(impl=None): the device's measured default (`default_impl`), or
  on CUDA under cudnn.benchmark the fastest one timed per layer and input signature.
- `cpu_chunk_size`: on the CPU a layer runs on cache-sized chunks of the batch.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polyscale.ops import _dilated
from polyscale.ops._permute import capturing_graph, permuted_add_
from polyscale.ops.psconv_terms import (
    IMPLS,
    ConvTerm,
    Layout,
    block_permutation,
    build_terms,
    global_rows,
    tiling,
)

# ---- which impl runs ----

# Fastest impl per device type, measured with scripts/bench_conv.py (docs/operators.md). CUDA is
# unmeasured; "grouped" also launches the fewest kernels there.
DEFAULT_IMPL = {"cpu": "grouped", "cuda": "grouped"}
# ... and where each dilation class holds at most SMALL_CLASS_CHANNELS channels per group (ResNeXt-50
# layer1 and layer2: 4 and 8 channels per group, t = 4): oneDNN runs depthwise convs much faster than
# 2- and 4-channel groups, so the all-depthwise split wins (for 1-channel classes it is "shifts").
SMALL_CLASS_IMPL = {"cpu": "depthwise"}
SMALL_CLASS_CHANNELS = 2

# Devices where impl=None measures instead of trusting DEFAULT_IMPL, when torch.backends.cudnn.benchmark
# is on (the trainer's setting on GPUs unless trainer.deterministic): like cuDNN's own algorithm search,
# the first call for each layer configuration and input signature times every impl (forward, plus
# backward when grad is enabled) and keeps the fastest for the rest of the process.
AUTOTUNE_DEVICES = frozenset({"cuda"})
AUTOTUNE_REPEATS = 3
_TUNED: dict[tuple, str] = {}


def default_impl(module: nn.Module, device_type: str) -> str:
    """The impl that impl=None runs on `device_type` ("cpu", "cuda", ...) when nothing is timed."""
    if module.in_channels // module.groups <= SMALL_CLASS_CHANNELS * len(module.dilation_pattern):
        return SMALL_CLASS_IMPL.get(device_type, DEFAULT_IMPL.get(device_type, "grouped"))
    return DEFAULT_IMPL.get(device_type, "grouped")


def choose_impl(module: nn.Module, x: Tensor) -> str:
    """The impl for impl=None: the device's default, or the fastest timed (AUTOTUNE_DEVICES)."""
    device = x.device.type
    if device not in AUTOTUNE_DEVICES or not torch.backends.cudnn.benchmark or torch.compiler.is_compiling():
        return default_impl(module, device)
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    config = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding)
    config += (module.groups, module.dilation_pattern, module.axes, module.bias is not None)
    signature = (tuple(x.shape), x.dtype, memory_format(x), str(x.device), torch.is_grad_enabled(), autocast)
    key = (config, signature)
    if key not in _TUNED:
        _TUNED[key] = _fastest_impl(module, x)
    return _TUNED[key]


def autotuned() -> dict[tuple, str]:
    """The impls chosen by timing so far: {(layer config, input signature): impl}."""
    return dict(_TUNED)


def _fastest_impl(module: nn.Module, x: Tensor) -> str:
    """Time every impl on x (forward, and backward to x and the weights when grad is on)."""
    grad = torch.is_grad_enabled()
    params = [p for p in module.parameters() if p.requires_grad] if grad else []

    def step(impl: str) -> None:
        inp = x.detach().requires_grad_(grad)
        out = module.forward(inp, impl)  # not module(...): hooks see only the real call
        if grad:  # autograd.grad: nothing lands in .grad
            torch.autograd.grad(out, [inp, *params], torch.ones_like(out))

    times = {}
    for impl in IMPLS:
        step(impl)  # warm-up (cuDNN's own search, allocations)
        run = functools.partial(step, impl)
        times[impl] = statistics.median(_seconds(run, x.device) for _ in range(AUTOTUNE_REPEATS))
    return min(times, key=times.__getitem__)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of fn(), with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ---- CPU batch chunks ----

# CPU: run the layer on chunks of the batch whose input is at most this many bytes (at least one
# sample). A PSConv is a sum of several convolutions; on a whole large batch every term's output and
# the running sum leave the cache and the layer becomes memory-bound (docs/operators.md, "Speed").
# 0 turns chunking off.
CPU_CHUNK_BYTES = 2 << 20


def cpu_chunk_size(x: Tensor) -> int:
    """Samples per chunk for input x (see CPU_CHUNK_BYTES): the whole batch off the CPU, when it fits, or
    while a graph is captured for export (chunks would pin the batch size of the exported graph)."""
    if x.device.type != "cpu" or CPU_CHUNK_BYTES <= 0 or x.shape[0] == 0 or x[0].numel() == 0:
        return x.shape[0]
    if capturing_graph():  # export: one graph for every batch size
        return x.shape[0]
    per_sample = x[0].numel() * x.element_size()
    return min(x.shape[0], max(1, CPU_CHUNK_BYTES // per_sample))


# ---- running an impl's terms ----

# Where a term's output goes: "add" (every channel, in order), "scatter" (index_add_ at its rows), or
# ((groups, blocks per group, channels per block), perm): whole channel blocks permuted (permuted_add_).
Place = str | tuple[tuple[int, int, int], tuple[int, ...]]


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for NHWC-strided tensors, else contiguous (what nn.Conv2d's output follows)."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


@dataclass(frozen=True)
class PSConvImpl:
    """One impl compiled for one layer: its conv terms and how each one runs, as Python ints.

    The terms' weight rows (module output channels) live in ONE index tensor that the module keeps as
    a buffer, so it follows .to(); term i's rows are `row_index[rows[i][0]:rows[i][1]]`.
    """

    name: str
    terms: tuple[ConvTerm, ...]
    rows: tuple[tuple[int, int] | None, ...]  # None: all output channels, in order (no gather)
    places: tuple[Place, ...]
    concat: tuple[list[list[int]], list[tuple[int, int]]] | None  # terms tile the channels: one cat
    groups: int
    in_per_group: int
    out_channels: int
    kernel_size: int
    stride: tuple[int, int]
    padding: tuple[int, int]

    def term_weights(self, weight: Tensor, row_index: Tensor) -> list[Tensor]:
        """Every term's conv weight, gathered from the dense weight G (differentiable, small)."""
        k, weights = self.kernel_size, []
        for term, rows in zip(self.terms, self.rows):
            w = weight if rows is None else weight.index_select(0, row_index[rows[0] : rows[1]])
            w = w[:, term.in_start : term.in_stop]  # (G*m*co, m*ci, k, k)
            m = term.groups
            if m > 1:  # conv group j only sees input slice j: keep the diagonal blocks
                co, ci = len(term.rows) // m, term.in_per_group
                blocks = w.reshape(self.groups, m, co, m, ci, k, k).diagonal(dim1=1, dim2=3)
                w = blocks.movedim(-1, 1).reshape(self.groups * m * co, ci, k, k)
            weights.append(w)
        return weights

    def run(self, x: Tensor, weights: list[Tensor], bias: Tensor | None, row_index: Tensor) -> Tensor:
        """Eq. (3) on x (N, C_in, H, W): the sum of the terms' dilated convs, each at its channels."""
        # the first term seeds the sum (and adds the bias) when it writes every channel in order
        seeded = self.concat is None and self.places[0] == "add"
        half = (self.kernel_size - 1) // 2
        ys, out = [], None
        for i, (term, inp, weight) in enumerate(zip(self.terms, self._inputs(x), weights)):
            padding = tuple(p + (term.dilation - 1) * half for p in self.padding)  # same centres
            term_bias = bias if seeded and i == 0 else None
            groups = self.groups * term.groups
            y = _dilated.conv2d(inp, weight, term_bias, self.stride, padding, term.dilation, groups)
            if self.concat is not None:
                ys.append(y)
            elif seeded and i == 0:
                out = y
            else:
                if out is None:  # no term covers every channel in order: start from zeros
                    out = y.new_zeros(y.shape[0], self.out_channels, *y.shape[2:])
                    out = out.contiguous(memory_format=memory_format(x))
                out = self._place(out, y, i, row_index)
        if self.concat is not None:  # terms write disjoint channels (axes="output"): one cat of views
            sizes, order = self.concat
            pieces = [y.split(s, dim=1) for y, s in zip(ys, sizes)]
            out = torch.cat([pieces[t][j] for t, j in order], dim=1)
        assert out is not None
        if bias is not None and not seeded:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)
        return out

    def _inputs(self, x: Tensor) -> list[Tensor]:
        """The input of every term: x itself, or its slice of every group (one split, no zero-fill)."""
        per_group = self.in_per_group
        if all(term.in_start == 0 and term.in_stop == per_group for term in self.terms):
            return [x] * len(self.terms)
        cuts = sorted({0, per_group} | {c for term in self.terms for c in (term.in_start, term.in_stop)})
        grouped = x.unflatten(1, (self.groups, per_group))  # (N, G, C_in/G, H, W)
        pieces = grouped.split([b - a for a, b in zip(cuts, cuts[1:])], dim=2)
        channels_last = memory_format(x) == torch.channels_last
        inputs = []
        for term in self.terms:
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

    def _place(self, out: Tensor, y: Tensor, i: int, row_index: Tensor) -> Tensor:
        """Add term i's output into `out` at its channels, in place (no conv saves its output)."""
        place = self.places[i]
        if place == "add":
            return out.add_(y)
        if place == "scatter":
            start, stop = self.rows[i]  # type: ignore[misc]
            return out.index_add_(1, row_index[start:stop], y)
        blocks, perm = place
        return permuted_add_(out, y, blocks, perm)  # whole blocks move, one pass each way


def compile_impls(
    names: Sequence[str],
    layout: Layout,
    matrix: list[list[int]],
    groups: int,
    kernel_size: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> tuple[dict[str, PSConvImpl], Tensor]:
    """The impls `names` compiled for one layer, and the index tensor holding their terms' rows."""
    in_per_group, out_per_group = sum(layout.in_sizes), sum(layout.out_sizes)
    impls, row_index = {}, []
    for name in names:
        terms = build_terms(layout, matrix, name)
        term_rows = [global_rows(term, groups, out_per_group) for term in terms]
        rows: list[tuple[int, int] | None] = []
        places: list[Place] = []
        for term, global_term_rows in zip(terms, term_rows):
            if term.rows == tuple(range(out_per_group)):
                rows.append(None)
                places.append("add")
                continue
            rows.append((len(row_index), len(row_index) + len(global_term_rows)))
            row_index += global_term_rows
            blocks = block_permutation(term.rows, out_per_group)
            if blocks is None:  # not a permutation of whole blocks (uneven classes)
                places.append("scatter")
            else:
                size, perm = blocks
                places.append(((groups, len(perm), size), tuple(perm)))
        # terms writing disjoint channels join as one cat (axes="output"); one term needs no joining
        concat = tiling(term_rows, groups * out_per_group) if len(terms) > 1 else None
        impls[name] = PSConvImpl(
            name,
            terms,
            tuple(rows),
            tuple(places),
            concat,
            groups,
            in_per_group,
            groups * out_per_group,
            kernel_size,
            stride,
            padding,
        )
    return impls, torch.tensor(row_index, dtype=torch.long)
