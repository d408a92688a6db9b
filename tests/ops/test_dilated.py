"""The CPU fast backward of dilated depthwise convs (ops/_dilated.py) gives autograd's gradients."""

from __future__ import annotations

import subprocess
import sys

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
    assert out.grad_fn is not None and "DilatedConv" in type(out.grad_fn).__name__  # the fast path ran
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
    assert "DilatedConv" not in type(out.grad_fn).__name__
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
    original = _dilated._DilatedConv.apply

    def spy(*args):
        seen.append(args[4])  # dilation
        return original(*args)

    monkeypatch.setattr(_dilated._DilatedConv, "apply", spy)
    conv(torch.randn(1, 16, 8, 8, requires_grad=True)).sum().backward()
    assert sorted(seen) == [2, 4]


@pytest.mark.parametrize(("groups", "dilation"), [(2, 2), (2, 4), (4, 4), (8, 4)])
def test_bf16_channels_last_grouped_convs_avoid_onednns_broken_weight_gradient(groups, dilation) -> None:
    """torch 2.14.1's oneDNN returns non-finite dilated weight gradients (or crashes) for bf16
    channels_last grouped convs; these take the polyphase weight gradient instead and match float64."""
    x64 = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    w64 = torch.randn(16, 16 // groups, 3, 3, dtype=torch.float64)
    x = x64.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = w64.to(torch.bfloat16).requires_grad_()
    out = _dilated.conv2d(x, w, None, (1, 1), (dilation, dilation), dilation, groups)
    assert "DilatedConv" in type(out.grad_fn).__name__
    gx, gw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, None, 1, dilation, dilation, groups)
    ex, ew = torch.autograd.grad(ref, (x64, w64), torch.ones_like(ref))
    for got, want in ((gx, ex), (gw, ew)):
        assert torch.isfinite(got.float()).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_fp32_grouped_convs_keep_onednns_backward() -> None:
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = _dilated.conv2d(x, torch.randn(16, 8, 3, 3), None, (1, 1), (4, 4), 4, 2)
    assert "DilatedConv" not in type(out.grad_fn).__name__


def test_ps_resnet20_trains_in_bf16_channels_last_on_the_cpu() -> None:
    """The model-level symptom of oneDNN's bug (segfault or NaN gradients), run in a subprocess so that a
    crash fails this test instead of killing the test session."""
    script = (
        "import torch\n"
        "from polyscale.models import create_model\n"
        "torch.manual_seed(0)\n"
        "m = create_model('ps_resnet20', num_classes=10).to(memory_format=torch.channels_last)\n"
        "x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)\n"
        "for _ in range(3):\n"
        "    with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "        loss = m(x).float().logsumexp(1).mean()\n"
        "    loss.backward()\n"
        "assert all(torch.isfinite(p.grad).all() for p in m.parameters()), 'non-finite gradient'\n"
        "print('finite')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "finite" in done.stdout, (done.returncode, done.stderr[-2000:])
