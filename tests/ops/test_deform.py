"""The CPU DCNv1 (ops/_deform.py: grid_sample taps + one contraction) against torchvision's kernel."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from polyscale.ops._deform import deform_conv2d, sampled_deform_conv2d


@pytest.mark.parametrize(
    ("size", "stride", "padding", "dilation", "kernel"),
    [
        ((7, 9), 1, 1, 1, 3),
        ((7, 9), 2, 1, 1, 3),
        ((6, 5), 1, 2, 2, 3),
        ((8, 8), 2, 0, 1, 3),
        ((1, 1), 1, 1, 1, 3),  # P7 of a small image: every tap but the centre falls outside
        ((5, 6), 1, 1, 1, 1),
        ((9, 7), (2, 1), (1, 0), (1, 2), 3),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_equal_torchvision(size, stride, padding, dilation, kernel, with_bias) -> None:
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True) if with_bias else None
    out_h = (size[0] + 2 * padding[0] - dilation[0] * (kernel - 1) - 1) // stride[0] + 1
    out_w = (size[1] + 2 * padding[1] - dilation[1] * (kernel - 1) - 1) // stride[1] + 1
    # offsets of a few pixels, so that taps land between pixels and outside the map
    offset = (3 * torch.randn(2, 2 * kernel * kernel, out_h, out_w, dtype=torch.float64)).requires_grad_()
    args = (stride, padding, dilation)
    expected = torchvision_deform_conv2d(x, offset, weight, bias, *args)
    ours = sampled_deform_conv2d(x, offset, weight, bias, *args)
    assert ours.shape == expected.shape and torch.allclose(ours, expected, atol=1e-10)
    inputs = [t for t in (x, weight, offset, bias) if t is not None]
    grads = torch.autograd.grad((expected * expected.detach().cos()).sum(), inputs)
    ours_grads = torch.autograd.grad((ours * expected.detach().cos()).sum(), inputs)
    for name, a, b in zip(("input", "weight", "offset", "bias"), grads, ours_grads):
        assert torch.allclose(a, b, atol=1e-9), name


def test_cpu_tensors_take_the_sampled_path(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(
        "polyscale.ops._deform.sampled_deform_conv2d", lambda *a: calls.append(a) or torch.zeros(())
    )
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    deform_conv2d(x, torch.zeros(1, 18, 4, 4), w, None, (1, 1), (1, 1), (1, 1))
    assert len(calls) == 1
