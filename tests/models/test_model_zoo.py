"""Every registered model: exact size, forward/backward, channels_last, bf16 autocast; GMACs of ResNet-50."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyscale.models import create_model, get_model_spec, list_models
from polyscale.models.complexity import count_macs, count_params

# Exact parameter counts (issue 4 / NOTES.md), 1000 classes unless the name says CIFAR-100.
EXPECTED_PARAMS = {
    "resnet50": 25_557_032,
    "ps_resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "ps_resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "ps_resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "ps_resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
    "ps_resnext101_32x4d": 44_177_704,
    "seresnet50": 28_088_024,
    "ps_seresnet50": 28_088_024,
    "seresnet101": 49_326_872,  # no published size; equals timm's seresnet101
    "ps_seresnet101": 49_326_872,
    "pyconvresnet50": 24_847_720,
    "pyconvresnet101": 42_307_944,
    "pyconvresnet152": 56_640_872,
    "pyconvhgresnet50": 25_234_728,
    "pyconvhgresnet101": 44_627_240,
    "pyconvhgresnet152": 60_657_960,
    # CIFAR-100
    "resnext29_8x64d": 34_518_948,
    "ps_resnext29_8x64d": 34_518_948,
    "resnext29_16x64d": 68_247_460,
    "ps_resnext29_16x64d": 68_247_460,
    # CIFAR-10, 1x1-conv projection shortcuts (He et al.'s option A would have 2,752 fewer)
    "resnet20": 272_474,
    "ps_resnet20": 272_474,
    "resnet56": 855_770,
    "ps_resnet56": 855_770,
}
ALL_NAMES = [
    *(f"{p}resnet{d}" for p in ("", "ps_") for d in (50, 101, 152)),
    *(
        f"{p}{m}{d}{s}"
        for p in ("", "ps_")
        for m, s in (("resnext", "_32x4d"), ("seresnet", ""))
        for d in (50, 101)
    ),
    *(f"pyconv{hg}resnet{d}" for hg in ("", "hg") for d in (50, 101, 152)),
    *(f"{p}resnext29_{c}x64d" for p in ("", "ps_") for c in (8, 16)),
    *(f"{p}resnet{d}" for p in ("", "ps_") for d in (20, 56)),
]


def num_classes_of(name: str) -> int:
    if "resnext29" in name:
        return 100
    return 10 if get_model_spec(name).dataset == "cifar" else 1000


def test_registry_holds_every_paper_network() -> None:
    assert sorted(ALL_NAMES) == list_models()
    assert set(EXPECTED_PARAMS) == set(ALL_NAMES)


@pytest.fixture(scope="module", params=ALL_NAMES)
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """Each model built once for all tests of this module (pytest groups the tests by this param)."""
    torch.manual_seed(0)
    return request.param, create_model(request.param, num_classes=num_classes_of(request.param))


def _input(name: str, batch: int = 2) -> torch.Tensor:
    # Small inputs to fit the CPU test budget: ImageNet nets at 32x32 (stride 32: a 1x1 final map), the
    # ResNeXt-29s (5-11 GMACs at 32x32) at 8x8, the small CIFAR ResNets at their native 32x32.
    size = 32 if get_model_spec(name).dataset == "imagenet" else (8 if "resnext29" in name else 32)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_parameter_count(built: tuple[str, nn.Module]) -> None:
    name, model = built
    assert count_params(model) == EXPECTED_PARAMS[name]


def test_forward_backward_every_parameter_gets_a_gradient(built: tuple[str, nn.Module]) -> None:
    name, model = built
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(_input(name))
    assert out.shape == (2, num_classes_of(name))
    out.logsumexp(dim=1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_channels_last_and_bf16_autocast_forward(built: tuple[str, nn.Module]) -> None:
    name, model = built
    model.eval()
    x = _input(name, batch=1)
    ref = model(x)
    model.to(memory_format=torch.channels_last)
    try:
        out = model(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x.contiguous(memory_format=torch.channels_last))
    finally:
        model.to(memory_format=torch.contiguous_format)
    assert low.dtype == torch.bfloat16 and low.shape == ref.shape
    # bf16 has 8 mantissa bits: agree with fp32 to a few percent of the logit scale
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1, f"bf16 logits deviate by {err:.3f} of their scale"


@pytest.mark.parametrize("name", ["resnet50", "ps_resnet50"])
def test_gmacs_at_224(name: str) -> None:
    """PSConv Table 2: ResNet-50 and PS-ResNet-50 both 4.089 GMACs (conv + fc), counted on the meta device."""
    with torch.device("meta"):
        model = create_model(name)
    assert round(count_macs(model, 224) / 1e9, 3) == 4.089
