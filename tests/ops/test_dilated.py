"""The CPU fast backward of dilated depthwise convs (ops/_dilated.py) gives autograd's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polyscale.ops import PSConv2d, _dilated


def _grads(conv, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gy_seed: int = 1):
    out = conv(x, w, b)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=out.dtype)
    if x.is_contiguous(memory_format=torch.channels_last):
        gy = gy.contiguous(memory_format=torch.channels_last)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, inputs, gy)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("size", "dilation", "padding", "multiplier", "kernel"),
    [
        (12, 2, 2, 1, 3),  # "same" padding, size divisible by d: the one-copy phase split
        (12, 4, 4, 1, 3),
        (13, 2, 2, 1, 3),  # odd size: pad-then-split
        (14, 4, 4, 2, 3),  # 14 % 4 != 0, channel multiplier 2
        (11, 3, 0, 1, 3),  # no padding (smaller output)
        (10, 2, 3, 1, 3),  # more than "same" padding
        (15, 2, 4, 1, 5),  # 5x5 kernel
    ],
)
def test_fast_backward_matches_autograd(
    channels_last: bool, size: int, dilation: int, padding: int, multiplier: int, kernel: int
) -> None:
    channels = 6
    x = torch.randn(3, channels, size, size + 1, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(channels * multiplier, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels * multiplier, dtype=torch.float64, requires_grad=True)
    args = ((1, 1), (padding, padding), dilation, channels)
    out, got = _grads(lambda x, w, b: _dilated.conv2d(x, w, b, *args), x, w, b)
    assert out.grad_fn is not None and "DilatedDepthwise" in type(out.grad_fn).__name__  # the fast path ran
    ref_out, expected = _grads(lambda x, w, b: F.conv2d(x, w, b, 1, padding, dilation, channels), x, w, b)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_only_the_requested_gradients_and_no_grad_mode() -> None:
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    args = ((1, 1), (2, 2), 2, 4)
    out, (gw,) = _grads(lambda x, w, b: _dilated.conv2d(x, w, b, *args), x, w, None)
    _, (expected,) = _grads(lambda x, w, b: F.conv2d(x, w, b, 1, 2, 2, 4), x, w, None)
    torch.testing.assert_close(gw, expected, rtol=0, atol=1e-10)
    with torch.no_grad():  # no graph: the plain conv
        torch.testing.assert_close(_dilated.conv2d(x, w, None, *args), F.conv2d(x, w, None, 1, 2, 2, 4))


@pytest.mark.parametrize(
    ("stride", "dilation", "in_per_group"),
    [((2, 2), 2, 1), ((1, 1), 1, 1), ((1, 1), 2, 2)],
)
def test_other_convs_use_plain_autograd(stride, dilation, in_per_group) -> None:
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, in_per_group, 3, 3, requires_grad=True)
    out = _dilated.conv2d(x, w, None, stride, (dilation, dilation), dilation, 4 // in_per_group)
    assert "DilatedDepthwise" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, F.conv2d(x, w, None, stride, dilation, dilation, 4 // in_per_group))


def test_bf16_autocast_casts_like_autocast() -> None:
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _dilated.conv2d(x, w, None, (1, 1), (2, 2), 2, 4)
        ref = F.conv2d(x, w, None, 1, 2, 2, 4)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    ex, ew = torch.autograd.grad(ref.float().sum(), (x, w))
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, ex, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, ew, rtol=2e-2, atol=2e-1)


def test_resnext_psconv_takes_the_fast_path_for_its_dilated_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    # ResNeXt-50 layer1 shape (4 channels per group, t = 4): the d=2 and d=4 terms are depthwise
    conv = PSConv2d(16, 16, 3, groups=4, dilation_pattern=(1, 2, 1, 4))
    seen = []
    original = _dilated._DilatedDepthwiseConv.apply

    def spy(*args):
        seen.append(args[-1])  # dilation
        return original(*args)

    monkeypatch.setattr(_dilated._DilatedDepthwiseConv, "apply", spy)
    conv(torch.randn(1, 16, 8, 8, requires_grad=True)).sum().backward()
    assert sorted(seen) == [2, 4]
