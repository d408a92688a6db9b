"""PSConv's impls: the class layout, each impl's conv terms, the block-permuted add, defaults per device."""

from __future__ import annotations

import pytest
import torch
from psconv_reference import constant_blocks

from polyscale.ops import PSConv2d
from polyscale.ops._permute import permuted_add_
from polyscale.ops.psconv_impls import default_impl
from polyscale.ops.psconv_terms import block_permutation, class_order


@pytest.mark.parametrize("t", [1, 2, 4, 6, 8, 12])
def test_class_order_keeps_residue_classes_contiguous(t) -> None:
    """Digit reversal: for each leading product q of t's prime factors, classes mod q form runs."""
    order = class_order(t)
    assert sorted(order) == list(range(t))
    q, factors = 1, []
    n, p = t, 2
    while n > 1:  # smallest prime factors first, as class_order uses them
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    for factor in factors:
        q *= factor
        runs = [order[i : i + t // q] for i in range(0, t, t // q)]
        assert all(len({c % q for c in run}) == 1 for run in runs)
    if t == 4:
        assert order == [0, 2, 1, 3]


def test_paper_setting_runs_three_convs_on_the_whole_input() -> None:
    """{1, 2, 1, 4} on both axes: d=1 as groups=2, d=2 and d=4 as groups=4; no input slicing."""
    for groups in (1, 32):
        module = PSConv2d(128, 128, groups=groups)
        grouped = module._impls["grouped"]
        assert [(t.dilation, t.groups) for t in grouped.terms] == [(1, 2), (2, 4), (4, 4)]
        assert all((t.in_start, t.in_stop) == (0, 128 // groups) for t in grouped.terms)
        assert grouped.places[0] == "add"  # the d=1 term seeds the sum in order
    # the naive split (tests' blocks_reference) runs one conv per constant t x t cell of D instead
    assert len(constant_blocks(PSConv2d(64, 64).dilation_matrix(), 1)) == 16


def test_block_permutation() -> None:
    assert block_permutation((12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), 16) == (4, [3, 0, 1, 2])
    assert block_permutation((2, 3, 0, 1, 6, 7, 4, 5), 8) == (2, [1, 0, 3, 2])
    assert block_permutation((0, 1, 2), 3) == (3, [0])
    assert block_permutation((0, 1), 4) is None  # covers only part of the channels
    assert block_permutation((0, 0, 1), 3) is None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("groups", "perm", "size"), [(1, [3, 2, 0, 1], 4), (8, [1, 2, 0], 1), (2, [1, 0], 3)]
)
def test_permuted_add_forward_and_backward(channels_last, groups, perm, size) -> None:
    """out[:, g, perm[j]] += y[:, g, j]; gradients: grad passes to out, y gets grad gathered back."""
    channels = groups * len(perm) * size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.randn(2, channels, 5, 4, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y = torch.randn(2, channels, 5, 4, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    rows = torch.tensor(
        [
            g * len(perm) * size + perm[j] * size + r
            for g in range(groups)
            for j in range(len(perm))
            for r in range(size)
        ]
    )
    expected = out.detach().clone().index_add_(1, rows, y.detach())
    result = permuted_add_(out.clone(), y, (groups, len(perm), size), tuple(perm))
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    grad = torch.randn_like(result)
    grad_out, grad_y = torch.autograd.grad(result, [out, y], grad)
    torch.testing.assert_close(grad_out, grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_y, grad[:, rows], rtol=0, atol=0)


def test_default_impl_per_device() -> None:
    """CPU: "grouped", except classes of 1-2 channels per group (ResNeXt-50 layers 1-2), where the
    all-depthwise split is faster (for 1-channel classes it is exactly the "shifts" terms)."""
    assert default_impl(PSConv2d(64, 64), "cpu") == "grouped"
    assert default_impl(PSConv2d(512, 512, groups=32), "cpu") == "grouped"  # 4 channels per class
    assert default_impl(PSConv2d(256, 256, groups=32), "cpu") == "depthwise"  # 2 channels per class
    assert default_impl(PSConv2d(128, 128, groups=32), "cpu") == "depthwise"  # 1 channel per class
    impls = PSConv2d(128, 128, groups=32)._impls
    assert impls["depthwise"].terms == impls["shifts"].terms
    assert all(term.in_per_group == 1 for term in PSConv2d(256, 256, groups=32)._impls["depthwise"].terms)
    assert default_impl(PSConv2d(128, 128, groups=32), "cuda") == "grouped"
    explicit = PSConv2d(128, 128, groups=32, impl="shifts")
    assert explicit.impl == "shifts" and list(explicit._impls) == ["shifts"]  # only the chosen one is built
