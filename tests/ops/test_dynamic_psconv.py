"""DynamicPSConv2d (PSConv section 4.2): the Kronecker-factored binary mask, its STE, Eq. (3) with the
mask's dilations, the init options, the exact static form and the whole-network helpers."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from psconv_reference import loop_reference, masked_reference
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polyscale.ops import PSConv2d
from polyscale.ops.dynamic_psconv import (
    DynamicPSConv2d,
    TwoRateConv2d,
    convert_to_static,
    factor_shapes,
    large_fraction_penalty,
    mean_large_fraction,
)

# (c_in, c_out, groups): powers of two, non-powers of two on either side, odd channels per group
SHAPES = [(8, 8, 1), (6, 12, 3), (5, 7, 1), (16, 8, 4), (12, 20, 2), (3, 6, 3), (1, 1, 1), (24, 24, 8)]


def _random_gates(module: DynamicPSConv2d, seed: int = 0) -> DynamicPSConv2d:
    """Gates set at random (a mixed mask), |logit| >= 0.5 so that no gate sits on its threshold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        signs = torch.randint(0, 2, module.gate_logits.shape, generator=g) * 2 - 1
        module.gate_logits.copy_(signs * (0.5 + torch.rand(module.gate_logits.shape, generator=g)))
    return module


def _macs(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


# ---- the mask ----


@pytest.mark.parametrize(("c_in", "c_out", "groups"), SHAPES)
def test_mask_is_binary_and_the_cropped_kronecker_product_of_the_factors(c_in, c_out, groups) -> None:
    """M == crop(torch.kron of the binarised factors): row (g, c) of the padded product is g * 2^a + c
    (a = binary digits of C_out/groups), columns the first C_in/groups; a few gates, no dense mask."""
    module = _random_gates(DynamicPSConv2d(c_in, c_out, groups=groups, init="small"), seed=c_in + c_out)
    factors = module.factors()
    assert [tuple(f.shape) for f in factors] == list(module.factor_shapes)
    assert all(set(f.unique().tolist()) <= {0.0, 1.0} for f in factors)
    full = functools.reduce(torch.kron, factors)
    out_pg, in_pg = c_out // groups, c_in // groups
    rows_per_group = 1 << (out_pg - 1).bit_length()
    assert full.shape == ((1 << (groups - 1).bit_length()) * rows_per_group, 1 << (in_pg - 1).bit_length())
    rows = [g * rows_per_group + c for g in range(groups) for c in range(out_pg)]
    expected = full[rows][:, :in_pg] > 0
    mask = module.large_rate_mask()
    assert mask.dtype == torch.bool and mask.shape == (c_out, in_pg)
    assert torch.equal(mask, expected)
    assert torch.equal(module.mask(), mask.float())  # the STE mask's value is exactly the binary mask
    # group digits never mix with input digits: one (2, 1) factor per binary digit of the group index
    a, n, b = ((v - 1).bit_length() for v in (out_pg, in_pg, groups))
    shapes = factor_shapes(out_pg, in_pg, groups)
    assert shapes[:b] == ((2, 1),) * b
    assert module.gate_logits.numel() == sum(p * q for p, q in shapes) <= 4 * max(a, n, 1) + 2 * b


def test_resnet50_sized_layer_has_a_handful_of_gates() -> None:
    assert DynamicPSConv2d(512, 512).gate_logits.numel() == 4 * 9  # nine 2 x 2 factors for 512 x 512
    assert DynamicPSConv2d(256, 256, groups=32).gate_logits.numel() == 4 * 3 + 2 * 5  # ResNeXt 32x8d


@pytest.mark.parametrize("init", ["small", "large", "static"])
def test_gradients_reach_every_gate_through_the_straight_through_estimator(init) -> None:
    """Forward with the binary mask; backward: d loss / d M at the binary mask, through the soft mask."""
    module = DynamicPSConv2d(6, 12, groups=3, bias=True, init=init).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    target = torch.randn(2, 12, 9, 9, dtype=torch.float64)
    F.mse_loss(module(x), target).backward()
    grad = module.gate_logits.grad
    assert grad is not None and bool((grad != 0).all()), grad
    # the same gradient from first principles: a leaf M equal to the binary mask, then the soft mask's
    leaf = module.large_rate_mask().double().requires_grad_()
    w, (r0, r1) = module.weight.detach(), module.rates
    m = leaf[:, :, None, None]
    out = F.conv2d(x, w * m, module.bias.detach(), 1, r1, r1, 3) + F.conv2d(
        x, w * (1 - m), None, 1, r0, r0, 3
    )
    (grad_mask,) = torch.autograd.grad(F.mse_loss(out, target), leaf)
    (expected,) = torch.autograd.grad(module.soft_mask(), module.gate_logits, grad_mask)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_gates_are_trainable_away_from_an_all_small_start() -> None:
    """From init="small" (one factor all zeros) a few SGD steps towards an all-large target flip gates."""
    torch.manual_seed(0)
    module = DynamicPSConv2d(8, 8, init="small")
    optimizer = torch.optim.SGD(module.parameters(), lr=5.0)
    for _ in range(20):
        optimizer.zero_grad()
        large_fraction_penalty(module, 1.0).backward()
        optimizer.step()
    assert module.large_fraction() == 1.0


# ---- Eq. (3) with D = rates[M] ----


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "stride", "padding", "rates", "kernel"),
    [
        (8, 8, 1, 1, None, (1, 2), 3),
        (6, 12, 3, 2, None, (1, 2), 3),
        (5, 7, 1, 1, 0, (1, 3), 3),
        (4, 6, 2, 2, 2, (2, 4), 5),
        (3, 6, 3, 1, None, (1, 2), 1),
    ],
)
def test_forward_and_gradients_match_the_per_kernel_reference(
    c_in, c_out, groups, stride, padding, rates, kernel
) -> None:
    """float64, against explicit loops over every kernel (c, k) and tap with D = dilation_matrix()."""
    module = DynamicPSConv2d(c_in, c_out, kernel, stride, padding, groups, True, rates=rates).double()
    _random_gates(module, seed=c_out)
    assert set(module.dilation_matrix().unique().tolist()) <= set(rates)
    x = torch.randn(2, c_in, 9, 8, dtype=torch.float64, requires_grad=True)
    out = module(x)
    p = kernel // 2 if padding is None else padding
    args = (module.dilation_matrix(), stride, p, groups, module.bias)
    expected = loop_reference(x, module.dense_weight(), *args)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, module.weight, module.bias], grad)
    for g, e in zip(got, torch.autograd.grad(expected, [x, module.weight, module.bias], grad)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_training_costs_two_convolutions() -> None:
    """Two full convs (complementary masked weights) per forward: exactly twice nn.Conv2d's multiply-adds."""
    x = torch.randn(1, 16, 8, 8)
    conv = nn.Conv2d(16, 32, 3, padding=1, groups=2, bias=False)
    assert _macs(DynamicPSConv2d(16, 32, groups=2), x) == 2 * _macs(conv, x)


# ---- init options ----


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups"), [(8, 8, 1), (16, 12, 2), (12, 20, 2), (8, 6, 1), (32, 32, 8)]
)
def test_static_init_is_psconvs_default_pattern_with_the_large_rate_where_it_dilates(
    c_in, c_out, groups
) -> None:
    """init="static" == PSConv2d's {1, 2, 1, 4} (both axes, the paper's interleaved order) with its rates
    > 1 mapped to rates[1]."""
    ps = PSConv2d(c_in, c_out, groups=groups)
    out_index, in_index = ps.paper_order()
    paper = ps.dilation_matrix()[out_index][:, in_index]  # (C_out, C_in/groups), interleaved order
    module = DynamicPSConv2d(c_in, c_out, groups=groups, rates=(2, 3), init="static")
    assert torch.equal(module.large_rate_mask(), paper > 1)
    assert torch.equal(module.dilation_matrix(), torch.where(paper > 1, 3, 2))


@pytest.mark.parametrize(("c_in", "c_out", "groups"), SHAPES)
def test_init_options_give_their_masks(c_in, c_out, groups) -> None:
    def mask(init: str) -> torch.Tensor:
        return DynamicPSConv2d(c_in, c_out, groups=groups, init=init).large_rate_mask()

    assert bool(mask("large").all()) and not bool(mask("small").any())
    out_pg = c_out // groups
    c = torch.arange(c_out)[:, None] % out_pg  # output channel within its group
    k = torch.arange(c_in // groups)[None, :]
    assert torch.equal(mask("static"), (c + k) % 2 == 1)  # (k - c) mod 4 odd: where {1, 2, 1, 4} is > 1
    module = DynamicPSConv2d(c_in, c_out, groups=groups, init="large")
    module.reset_gates("static")
    assert torch.equal(module.large_rate_mask(), mask("static"))


def test_analysis_api() -> None:
    module = DynamicPSConv2d(8, 16)
    assert module.large_fraction() == 0.5 and isinstance(module.large_fraction(), float)
    assert module.large_rate_mask().dtype == torch.bool and module.large_rate_mask().shape == (16, 8)
    _random_gates(module, seed=3)
    assert module.large_fraction() == pytest.approx(module.large_rate_mask().float().mean().item())


# ---- to_static ----


@pytest.mark.parametrize(("c_in", "c_out", "groups"), SHAPES)
@pytest.mark.parametrize("gates", ["random", "static", "small", "large"])
def test_to_static_is_exact_and_parameter_and_multiply_add_neutral(c_in, c_out, groups, gates) -> None:
    init = "small" if gates == "random" else gates
    module = DynamicPSConv2d(c_in, c_out, 3, 2, None, groups, True, init=init).double()
    if gates == "random":
        _random_gates(module, seed=c_in * c_out)
    module.eval()
    static = module.to_static()
    assert isinstance(static, TwoRateConv2d) and not static.training
    x = torch.randn(2, c_in, 9, 10, dtype=torch.float64, requires_grad=True)
    out, expected = static(x), module(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, static.weight, static.bias], grad)
    for g, e in zip(got, torch.autograd.grad(expected, [x, module.weight, module.bias], grad)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    conv = nn.Conv2d(c_in, c_out, 3, 2, 1, groups=groups, bias=True).double()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(static) == count(conv)
    assert _macs(static, x) == _macs(conv, x)
    assert torch.equal(static.dilation_matrix(), module.dilation_matrix())
    assert torch.equal(static.large_rate_mask(), module.large_rate_mask())
    assert static.large_fraction() == module.large_fraction()


def test_static_pattern_runs_as_one_grouped_conv_per_rate() -> None:
    """The checkerboard is a channel relabelling away from two grouped convs (groups=2 per rate), whose
    outputs share one channel order: one gather back to the natural order, no scatter."""
    plan = DynamicPSConv2d(16, 16).to_static()._plan
    assert [(t.rate, t.groups) for t in plan.terms] == [(0, 2), (1, 2)]
    assert plan.align is None and plan.order is not None and plan.pad == (0, 0)
    plain = DynamicPSConv2d(16, 16, init="small").to_static()._plan
    assert [(t.rate, t.groups, t.weight, t.inputs) for t in plain.terms] == [(0, 1, None, None)]
    assert plain.order is None  # all small: nn.Conv2d itself


def test_static_inference_reuses_its_gathered_weights_until_they_change() -> None:
    static = _random_gates(DynamicPSConv2d(8, 8), seed=2).to_static().eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        first = static(x)
        cached = static._cached
        assert cached is not None and torch.equal(static(x), first) and static._cached is cached
        static.weight.mul_(2)  # in place: a new version of the weight
        torch.testing.assert_close(static(x), 2 * first)
    static(x).sum().backward()  # with autograd: gathered afresh, nothing kept
    assert static._cached is None and static.weight.grad is not None


def test_static_state_dict_carries_the_mask() -> None:
    source = _random_gates(DynamicPSConv2d(6, 10, bias=True), seed=1).to_static()
    target = TwoRateConv2d(6, 10, bias=True)  # all small
    target.load_state_dict(source.state_dict())
    x = torch.randn(1, 6, 7, 7)
    assert torch.equal(target.large_rate_mask(), source.large_rate_mask())
    torch.testing.assert_close(target(x), source(x))
    assert set(source.state_dict()) == {"weight", "bias", "large_mask"}


def test_convert_to_static_replaces_every_dynamic_layer() -> None:
    model = nn.Sequential(
        DynamicPSConv2d(4, 8), nn.ReLU(), nn.Sequential(DynamicPSConv2d(8, 8, init="large"))
    )
    _random_gates(model[0])
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    expected = model(x)
    assert mean_large_fraction(model) == pytest.approx((model[0].large_fraction() + 1.0) / 2)
    convert_to_static(model)
    assert isinstance(model[0], TwoRateConv2d) and isinstance(model[2][0], TwoRateConv2d)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert mean_large_fraction(model) is None  # only dynamic layers count


# ---- the regulariser and the model contract ----


def test_large_fraction_penalty_is_the_mean_squared_distance_of_the_hard_shares() -> None:
    model = nn.Sequential(DynamicPSConv2d(8, 8), DynamicPSConv2d(8, 8, init="large"))  # shares 0.5 and 1
    penalty = large_fraction_penalty(model, 0.25)
    assert penalty.item() == pytest.approx(((0.5 - 0.25) ** 2 + (1 - 0.25) ** 2) / 2)
    penalty.backward()  # both shares are above the target: descent lowers every gate
    assert all(bool((m.gate_logits.grad > 0).all()) for m in model)
    assert large_fraction_penalty(nn.Linear(2, 2), 0.5).item() == 0.0


def test_dense_weight_contract_and_state_dict() -> None:
    module = DynamicPSConv2d(8, 4, groups=2, bias=True)
    weight = torch.randn(4, 4, 3, 3)
    module.load_dense_weight(weight)
    assert torch.equal(module.dense_weight(), weight) and module.dense_weight().requires_grad
    assert set(module.state_dict()) == {"weight", "bias", "gate_logits"}
    clone = DynamicPSConv2d(8, 4, groups=2, bias=True, init="small")
    clone.load_state_dict(module.state_dict())
    assert torch.equal(clone.large_rate_mask(), module.large_rate_mask())
    with torch.device("meta"):  # shapes only (the engine's fast config check)
        assert DynamicPSConv2d(64, 64).large_rate_mask().is_meta


def test_bf16_autocast_channels_last_trains() -> None:
    module = DynamicPSConv2d(8, 8, groups=2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(module.weight.grad).all()
    assert torch.isfinite(module.gate_logits.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rates": (1,)}, r"`rates` must be two positive integers, small then large"),
        ({"rates": (2, 1)}, r"`rates` must be two positive integers, small then large .* got \(2, 1\)"),
        ({"rates": (0, 1)}, r"`rates`"),
        ({"rates": (1.0, 2.0)}, r"`rates`"),
        ({"rates": "12"}, r"`rates`"),
        ({"init": "medium"}, r"`init` must be one of \('small', 'large', 'static'\), got 'medium'"),
        ({"groups": 3}, r"groups=3 must divide in_channels=8"),
        ({"kernel_size": 2}, r"kernel_size must be odd"),
    ],
)
def test_bad_arguments(kwargs, message) -> None:
    args = {"in_channels": 8, "out_channels": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        DynamicPSConv2d(**args)


def test_bad_arguments_of_the_helpers() -> None:
    with pytest.raises(ValueError, match=r"`weight` must have shape \(8, 8, 3, 3\)"):
        DynamicPSConv2d(8, 8).load_dense_weight(torch.zeros(8, 8, 1, 1))
    with pytest.raises(ValueError, match=r"`large_mask` must have shape \(8, 4\)"):
        TwoRateConv2d(8, 8, groups=2, large_mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`large_fraction_target` must lie in \[0, 1\], got 1.5"):
        large_fraction_penalty(DynamicPSConv2d(4, 4), 1.5)
    with pytest.raises(ValueError, match=r"`init` must be one of"):
        DynamicPSConv2d(4, 4).reset_gates("dense")
    with pytest.raises(ValueError, match=r"expected input \(N, 4, H, W\)"):
        DynamicPSConv2d(4, 4)(torch.zeros(1, 3, 5, 5))


def test_masked_reference_agrees_on_a_larger_layer() -> None:
    """64 -> 64 channels with groups=4 (the loop reference is too slow there): the masked-conv sum."""
    module = _random_gates(DynamicPSConv2d(64, 64, groups=4), seed=7).double()
    x = torch.randn(1, 64, 12, 12, dtype=torch.float64)
    expected = masked_reference(x, module.weight, module.dilation_matrix(), 1, 1, 4, None)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(module.to_static()(x), expected, rtol=0, atol=1e-10)
