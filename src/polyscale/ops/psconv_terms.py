"""The conv terms of PSConv's impls: the channel layout and the plain convolutions each impl runs.

Eq. (3) of the PSConv paper only depends on D through the *class* of each channel: in the paper's
interleaved layout input channel k has class k mod t and output channel c has class c mod t, and
D[c, k] = M[c mod t, k mod t] for a small t x t class matrix M (see `class_matrix`). So a module may
store its channels class by class ("class-contiguous" layout) without changing the operator: every
same-dilation part of D then becomes a few dense rectangles, and rectangles of equal shape whose
inputs are adjacent merge into ONE grouped convolution, a *term*. Each weight entry belongs to exactly
one term, so every impl executes exactly the multiply-adds of nn.Conv2d and stores no dead weights.

Classes are laid out in digit-reversed order (bit-reversed for t = 2^n, e.g. [0, 2, 1, 3] for t = 4):
that order keeps every residue class modulo every divisor of t contiguous, which is what lets the
cyclic pattern {1, 2, 1, 4} run as three convolutions (d=1: groups=2, d=2 and d=4: groups=4).
Everything here is plain Python ints, built once per layer shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AXES = ("both", "input", "output")


def class_matrix(pattern: tuple[int, ...], axes: str) -> list[list[int]]:
    """M[b][a]: the dilation between output class b and input class a (t x t)."""
    t = len(pattern)
    if axes == "both":  # each filter is the previous one shifted by one input channel
        return [[pattern[(a - b) % t] for a in range(t)] for b in range(t)]
    if axes == "input":  # Table 5, row 1: every filter sees the same cycle along its inputs
        return [[pattern[a] for a in range(t)] for _ in range(t)]
    return [[pattern[b]] * t for b in range(t)]  # "output": one dilation per filter


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def class_order(t: int) -> list[int]:
    """Digit-reversed order of 0..t-1 (mixed radix over the prime factors of t, smallest first).

    E.g. [0, 2, 1, 3] for t = 4 and [0, 4, 2, 6, 1, 5, 3, 7] for t = 8: the residues modulo any
    product of the leading factors (2, 4, ... for t = 2^n) form contiguous runs.
    """
    order = [0]
    for p in reversed(_prime_factors(t)):
        order = [j + p * x for j in range(p) for x in order]
    return order


def class_sizes(channels: int, t: int) -> list[int]:
    """How many of `channels` interleaved channels fall into each class (k mod t)."""
    return [len(range(a, channels, t)) for a in range(t)]


@dataclass(frozen=True)
class Layout:
    """Where each class lives in a module's own channel order (within one group)."""

    order: tuple[int, ...]  # classes in storage order
    in_offsets: tuple[int, ...]  # in_offsets[a]: first local input channel of class a
    in_sizes: tuple[int, ...]
    out_offsets: tuple[int, ...]
    out_sizes: tuple[int, ...]

    @staticmethod
    def build(in_per_group: int, out_per_group: int, t: int) -> Layout:
        order = class_order(t)
        in_sizes, out_sizes = class_sizes(in_per_group, t), class_sizes(out_per_group, t)

        def offsets(sizes: list[int]) -> tuple[int, ...]:
            result, start = [0] * t, 0
            for a in order:
                result[a], start = start, start + sizes[a]
            return tuple(result)

        return Layout(tuple(order), offsets(in_sizes), tuple(in_sizes), offsets(out_sizes), tuple(out_sizes))

    def input_classes(self) -> list[int]:
        """Class of every local input channel, in storage order."""
        return [a for a in self.order for _ in range(self.in_sizes[a])]

    def output_classes(self) -> list[int]:
        return [b for b in self.order for _ in range(self.out_sizes[b])]

    def interleaved_inputs(self) -> list[int]:
        """index[k] = storage position of the paper's interleaved input channel k."""
        t = len(self.order)
        return [self.in_offsets[k % t] + k // t for k in range(sum(self.in_sizes))]

    def interleaved_outputs(self) -> list[int]:
        t = len(self.order)
        return [self.out_offsets[c % t] + c // t for c in range(sum(self.out_sizes))]


@dataclass(frozen=True)
class ConvTerm:
    """One F.conv2d call: `groups` equal input slices tiling [in_start, in_stop) of every group.

    Its output channel i (within one group) is the module's local output channel rows[i]; the
    weight rows of conv group j are rows[j * len(rows) // groups : ...] restricted to input slice j.
    """

    dilation: int
    in_start: int
    in_stop: int
    groups: int
    rows: tuple[int, ...]

    @property
    def in_per_group(self) -> int:
        return (self.in_stop - self.in_start) // self.groups


def _rectangles(layout: Layout, matrix: list[list[int]], dilation: int) -> list[tuple[int, int, tuple]]:
    """Dense (input slice, output rows) rectangles where D == dilation, as (start, stop, rows)."""
    # input classes with the same set of same-dilation output classes share one rectangle
    by_targets: dict[tuple[int, ...], list[int]] = {}
    for a in layout.order:
        targets = tuple(b for b in layout.order if matrix[b][a] == dilation and layout.out_sizes[b])
        if targets and layout.in_sizes[a]:
            by_targets.setdefault(targets, []).append(a)
    rects = []
    for targets, sources in by_targets.items():
        rows = tuple(layout.out_offsets[b] + r for b in targets for r in range(layout.out_sizes[b]))
        # a rectangle whose input classes are not adjacent in storage splits into contiguous runs
        run: list[int] = []
        for a in sources + [None]:
            if run and (
                a is None or layout.in_offsets[a] != layout.in_offsets[run[-1]] + layout.in_sizes[run[-1]]
            ):
                start = layout.in_offsets[run[0]]
                rects.append((start, start + sum(layout.in_sizes[c] for c in run), rows))
                run = []
            if a is not None:
                run.append(a)
    return sorted(rects)


def _merge(rects: list[tuple[int, int, tuple]]) -> list[list[tuple[int, int, tuple]]]:
    """Runs of rectangles that one grouped conv can compute: adjacent inputs, equal shapes."""
    runs: list[list[tuple[int, int, tuple]]] = []
    for start, stop, rows in rects:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None
            and prev[1] == start
            and prev[1] - prev[0] == stop - start
            and len(prev[2]) == len(rows)
        ):
            runs[-1].append((start, stop, rows))
        else:
            runs.append([(start, stop, rows)])
    return runs


def _pair_rectangles(layout: Layout, matrix: list[list[int]], dilation: int, shift: int) -> list:
    """One rectangle per class pair (b, a = b + shift) at `dilation`: the naive per-shift split."""
    t = len(layout.order)
    rects = []
    for a in layout.order:
        b = (a - shift) % t
        if matrix[b][a] == dilation and layout.in_sizes[a] and layout.out_sizes[b]:
            start, rows = (
                layout.in_offsets[a],
                range(layout.out_offsets[b], layout.out_offsets[b] + layout.out_sizes[b]),
            )
            rects.append((start, start + layout.in_sizes[a], tuple(rows)))
    return sorted(rects)


def _diagonal_entries(
    layout: Layout, matrix: list[list[int]], dilation: int, shift: int, member: int
) -> list:
    """Depthwise split of the class pairs (b, a = b + shift) at `dilation`: input member r of class a
    feeds output member (r - member) mod m of class b, as 1 x 1 rectangles (square class blocks)."""
    t = len(layout.order)
    rects = []
    for a in layout.order:
        b = (a - shift) % t
        if matrix[b][a] == dilation and layout.in_sizes[a]:
            m = layout.in_sizes[a]
            for r in range(m):
                start = layout.in_offsets[a] + r
                rects.append((start, start + 1, (layout.out_offsets[b] + (r - member) % m,)))
    return sorted(rects)


IMPLS = ("grouped", "shifts", "depthwise")


def build_terms(layout: Layout, matrix: list[list[int]], impl: str) -> tuple[ConvTerm, ...]:
    """The convolutions ("terms") with which `impl` computes Eq. (3) in `layout`.

    "grouped": same-dilation rectangles merged into grouped convs (fewest convs); "shifts": one
    grouped conv per (dilation, cyclic shift) of class pairs, i.e. convs with per-group width C/t
    (depthwise-like for tiny groups, which CPU kernels run faster than 2-channel groups); "depthwise":
    "shifts" with every class-pair block split further into its m cyclic diagonals, so every conv is
    depthwise (t * m convs for classes of m channels; needs equal class sizes, else it is "shifts").
    """
    t = len(layout.order)
    dilations = list(dict.fromkeys(d for row in matrix for d in row))
    m = layout.in_sizes[0]
    square = layout.in_sizes == layout.out_sizes and all(size == m for size in layout.in_sizes)
    if impl == "depthwise" and square:
        parts = [
            (d, _diagonal_entries(layout, matrix, d, s, b))
            for d in dilations
            for s in range(t)
            for b in range(m)
        ]
    elif impl in ("shifts", "depthwise"):
        parts = [(d, _pair_rectangles(layout, matrix, d, s)) for d in dilations for s in range(t)]
    else:
        parts = [(d, _rectangles(layout, matrix, d)) for d in dilations]
    terms = [
        ConvTerm(d, run[0][0], run[-1][1], len(run), tuple(r for _, _, rows in run for r in rows))
        for d, rects in parts
        for run in _merge(rects)
    ]
    # the term that writes every output channel in order (if any) goes first: it seeds the sum
    identity = tuple(range(sum(layout.out_sizes)))
    terms.sort(key=lambda term: term.rows != identity)
    return tuple(terms)


def global_rows(term: ConvTerm, groups: int, out_per_group: int) -> list[int]:
    """The module output channel of every output channel of the term's conv (all groups)."""
    return [g * out_per_group + r for g in range(groups) for r in term.rows]


def tiling(row_lists: list[list[int]], channels: int) -> tuple[list[list[int]], list[tuple[int, int]]] | None:
    """How to build `channels` outputs as ONE torch.cat of pieces of the given outputs, if possible.

    row_lists[i][j] is the destination channel of channel j of output i. Returns the split sizes of
    every output (its runs of consecutive destinations) and the (output, piece) order of the cat,
    or None when the outputs do not cover every channel exactly once.
    """
    sizes: list[list[int]] = []
    pieces = []  # (destination start, output index, piece index)
    for i, rows in enumerate(row_lists):
        sizes.append([])
        for j, r in enumerate(rows):
            if j and r == rows[j - 1] + 1:
                sizes[i][-1] += 1
            else:
                pieces.append((r, i, len(sizes[i])))
                sizes[i].append(1)
    pieces.sort()
    expected = 0
    for start, i, j in pieces:
        if start != expected:
            return None
        expected += sizes[i][j]
    return (sizes, [(i, j) for _, i, j in pieces]) if expected == channels else None


def block_permutation(rows: tuple[int, ...], channels: int) -> tuple[int, list[int]] | None:
    """rows as a permutation of equal blocks: (block size, perm) with rows[j*b + r] == perm[j]*b + r.

    The largest such block size is taken, so the output permutation moves as few, as large pieces as
    possible; None if rows is not a permutation of range(channels).
    """
    if sorted(rows) != list(range(channels)):
        return None
    size = 0
    for i, r in enumerate(rows):  # every run of consecutive destinations starts a block
        if i == 0 or r != rows[i - 1] + 1:
            size = math.gcd(size, i, r)
    size = math.gcd(size, len(rows))
    return size, [rows[j * size] // size for j in range(len(rows) // size)]
