"""PConv, IntegratedBN, LevelConv and DeformableConv2d (SEPC paper, Eq. 2 and section 4) against slow
references that go level by level with explicit convolutions and explicit bilinear-resize matrices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from polyscale.ops.pconv import DeformableConv2d, IntegratedBN, LevelConv, PConv

F64 = torch.float64


def _pyramid(sizes: list[tuple[int, int]], channels: int = 3, batch: int = 2) -> list[Tensor]:
    return [torch.randn(batch, channels, h, w, dtype=F64, requires_grad=True) for h, w in sizes]


def _halving(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    """Sizes of a stride-2 pyramid (what a 3x3 / stride-2 / padding-1 conv gives: ceil of half)."""
    sizes = [(h, w)]
    for _ in range(levels - 1):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


def _resize_matrix(n_out: int, n_in: int, align_corners: bool) -> Tensor:
    """(n_out, n_in) linear-interpolation weights of one axis, written from the definition."""
    m = torch.zeros(n_out, n_in, dtype=F64)
    for i in range(n_out):
        if align_corners:
            src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def _bilinear(x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    rows = _resize_matrix(size[0], x.shape[-2], align_corners)
    cols = _resize_matrix(size[1], x.shape[-1], align_corners)
    return torch.einsum("ih,nchw,jw->ncij", rows, x, cols)


def _conv(conv: nn.Conv2d, x: Tensor, deform: bool) -> Tensor:
    """The kernel `conv` on x: F.conv2d, or deform_conv2d with offsets from its own offset conv."""
    if not deform:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    off = conv.offset
    offset = F.conv2d(x, off.weight, off.bias, off.stride, off.padding)
    return deform_conv2d(x, offset, conv.weight, conv.bias, conv.stride, conv.padding)


def _reference(module: PConv, xs: list[Tensor]) -> list[Tensor]:
    """Eq. (2) level by level: Upsample(w_1 * x_{l+1}) + w_0 * x_l + w_-1 *_{s2} x_{l-1}."""
    out = []
    for level, x in enumerate(xs):
        size = tuple(x.shape[-2:])
        deform = module.deform and level >= module.start_level
        y = _conv(module.same, x, deform)
        if level > 0:
            down = _conv(module.down, xs[level - 1], deform)
            y = y + (down if tuple(down.shape[-2:]) == size else _bilinear(down, size, module.align_corners))
        if level < len(xs) - 1:
            y = y + _bilinear(_conv(module.up, xs[level + 1], deform), size, module.align_corners)
        out.append(y)
    return out


def _randomise(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Every parameter random (offset convs included), so that no term hides behind a zero init."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)
    return module


def _grads(outputs: list[Tensor], tensors: list[Tensor]) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    loss = sum((y * torch.randn(y.shape, generator=gen, dtype=F64)).sum() for y in outputs)
    return torch.autograd.grad(loss, tensors)


def _copy_kernels(src: PConv, dst: PConv) -> None:
    with torch.no_grad():
        for name in ("up", "same", "down"):
            getattr(dst, name).weight.copy_(getattr(src, name).weight)
            getattr(dst, name).bias.copy_(getattr(src, name).bias)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    "sizes",
    [
        _halving(8, 6, 2),
        _halving(13, 10, 3),  # odd sizes: 13x10, 7x5, 4x3
        _halving(11, 17, 4),
        _halving(9, 9, 5),  # down to 1x1
    ],
)
def test_pconv_matches_the_level_by_level_reference(sizes, align_corners) -> None:
    module = _randomise(PConv(3, 4, align_corners=align_corners)).double()
    xs = _pyramid(sizes)
    out = module(xs)
    expected = _reference(module, xs)
    assert [tuple(y.shape) for y in out] == [(2, 4, h, w) for h, w in sizes]
    for y, e in zip(out, expected):
        torch.testing.assert_close(y, e, rtol=0, atol=1e-12)
    tensors = [*xs, *module.parameters()]
    for g, e in zip(_grads(out, tensors), _grads(expected, tensors)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_down_term_is_resized_when_a_level_is_not_half_the_one_below() -> None:
    # 9x9 -> stride-2 conv gives 5x5, but level 1 is 4x6: the down term is bilinearly resized to 4x6
    module = _randomise(PConv(3, 3)).double()
    xs = _pyramid([(9, 9), (4, 6), (3, 2)])
    out = module(xs)
    assert [tuple(y.shape[-2:]) for y in out] == [(9, 9), (4, 6), (3, 2)]
    for y, e in zip(out, _reference(module, xs)):
        torch.testing.assert_close(y, e, rtol=0, atol=1e-12)


def test_end_levels_drop_their_missing_term() -> None:
    # bottom: up + same only; top: same + down only (Eq. 2, section 3)
    module = _randomise(PConv(3, 3)).double()
    xs = _pyramid(_halving(8, 8, 3))
    with torch.no_grad():
        out = module(xs)
        up = F.interpolate(module.up(xs[1]), size=(8, 8), mode="bilinear", align_corners=True)
        torch.testing.assert_close(out[0], module.same(xs[0]) + up, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[2], module.same(xs[2]) + module.down(xs[1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("init", "std"), [("he", (2 / (9 * 64)) ** 0.5), ("authors", 0.01)])
def test_pconv_and_level_conv_inits(init, std) -> None:
    torch.manual_seed(0)
    for module in (
        PConv(64, 32, init=init),
        PConv(64, 32, init=init, deform=True),
        LevelConv(64, 32, init=init),
    ):
        convs = [module.conv] if isinstance(module, LevelConv) else [module.up, module.same, module.down]
        for conv in convs:
            assert torch.count_nonzero(conv.bias) == 0
            assert conv.weight.std().item() == pytest.approx(std, rel=0.05)
            assert abs(conv.weight.mean().item()) < std / 10
    with pytest.raises(ValueError, match="`init`='kaiming': use one of 'he', 'authors'"):
        PConv(4, 4, init="kaiming")
    with pytest.raises(ValueError, match="`init`=None"):
        LevelConv(4, 4, init=None)


def test_pconv_kernels_are_shared_convs() -> None:
    module = PConv(64, 32)
    assert [name for name, _ in module.named_children()] == ["up", "same", "down"]
    for name in ("up", "same", "down"):
        conv = getattr(module, name)
        assert type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert conv.stride == ((2, 2) if name == "down" else (1, 1))
    assert sum(p.numel() for p in module.parameters()) == 3 * (9 * 64 * 32 + 32)
    sepc = PConv(64, 32, deform=True)
    assert all(isinstance(getattr(sepc, n), DeformableConv2d) for n in ("up", "same", "down"))
    assert sepc.down.offset.stride == (2, 2) and sepc.up.offset.out_channels == 18
    assert all(torch.count_nonzero(getattr(sepc, n).offset.weight) == 0 for n in ("up", "same", "down"))
    offsets = 3 * (9 * 64 * 18 + 18)
    assert sum(p.numel() for p in sepc.parameters()) == 3 * (9 * 64 * 32 + 32) + offsets


def test_sepc_with_zero_offsets_equals_pconv() -> None:
    plain = _randomise(PConv(3, 4)).double()
    sepc = PConv(3, 4, deform=True).double()  # offset convs zero-initialised
    _copy_kernels(plain, sepc)
    xs = _pyramid(_halving(11, 9, 4))
    for y, e in zip(sepc(xs), plain(xs)):
        torch.testing.assert_close(y, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("start_level", [1, 2])
def test_sepc_with_offsets_equals_deform_conv2d_per_level(start_level) -> None:
    module = _randomise(PConv(3, 4, deform=True, start_level=start_level), std=0.2).double()
    xs = _pyramid(_halving(11, 9, 4))
    out = module(xs)
    expected = _reference(module, xs)
    for y, e in zip(out, expected):
        torch.testing.assert_close(y, e, rtol=0, atol=1e-10)
    tensors = [*xs, *module.parameters()]
    for g, e in zip(_grads(out, tensors), _grads(expected, tensors)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-8)


@pytest.mark.parametrize("start_level", [1, 2])
def test_levels_below_start_level_are_never_deformed(start_level) -> None:
    # Random offsets change every level >= start_level but none below: there `up` and `same` (and `down`
    # for level 1) run plainly although their offset convs would move them.
    plain = _randomise(PConv(3, 4)).double()
    sepc = _randomise(PConv(3, 4, deform=True, start_level=start_level), std=0.5).double()
    _copy_kernels(plain, sepc)
    xs = [x.detach() for x in _pyramid(_halving(10, 12, 4))]
    with torch.no_grad():
        deformed, reference = sepc(xs), plain(xs)
    for level, (y, e) in enumerate(zip(deformed, reference)):
        if level < start_level:
            torch.testing.assert_close(y, e, rtol=0, atol=1e-12)
        else:
            assert (y - e).abs().max() > 1e-3, level
    # the offsets do reach level start_level through all three kernels
    grads = _grads(sepc(xs), [getattr(sepc, n).offset.weight for n in ("up", "same", "down")])
    assert all(g.abs().sum() > 0 for g in grads)


def test_integrated_bn_equals_batch_norm_over_the_concatenated_levels() -> None:
    ibn = IntegratedBN(3, momentum=0.1).double()
    with torch.no_grad():
        ibn.bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        ibn.bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    xs = [x.detach() * 3 + 1 for x in _pyramid(_halving(9, 7, 4))]
    pixels = torch.cat([x.permute(1, 0, 2, 3).reshape(3, -1) for x in xs], dim=1)  # (C, all pixels)
    mean, var = pixels.mean(1), pixels.var(1, unbiased=False)

    def affine(x: Tensor, m: Tensor, v: Tensor) -> Tensor:
        normed = (x - m[:, None, None]) / torch.sqrt(v[:, None, None] + ibn.bn.eps)
        return normed * ibn.bn.weight[:, None, None] + ibn.bn.bias[:, None, None]

    out = ibn.train()(xs)
    for y, x in zip(out, xs):
        assert y.shape == x.shape
        torch.testing.assert_close(y, affine(x, mean, var), rtol=0, atol=1e-10)
    torch.testing.assert_close(ibn.bn.running_mean, 0.1 * mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        ibn.bn.running_var, 0.9 + 0.1 * pixels.var(1, unbiased=True), rtol=0, atol=1e-12
    )

    # eval: the running statistics normalise every level alike
    new = [torch.randn_like(x) for x in xs]
    for y, x in zip(ibn.eval()(new), new):
        torch.testing.assert_close(y, affine(x, ibn.bn.running_mean, ibn.bn.running_var), rtol=0, atol=1e-10)

    # and it is not per-level BN with a shared affine (the paper's "single BN")
    per_level = F.batch_norm(xs[-1], None, None, ibn.bn.weight, ibn.bn.bias, training=True)
    assert (ibn.train()(xs)[-1] - per_level).abs().max() > 1e-2


def test_integrated_bn_sync_and_conversion() -> None:
    ibn = IntegratedBN(4, sync=True)
    assert isinstance(ibn.bn, nn.SyncBatchNorm) and ibn.bn.num_features == 4
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(IntegratedBN(4)))
    assert isinstance(converted[0].bn, nn.SyncBatchNorm)
    xs = [torch.randn(2, 4, 5, 5), torch.randn(2, 4, 3, 3)]
    for y, e in zip(ibn(xs), IntegratedBN(4)(xs)):  # one process: the same statistics as BatchNorm2d
        torch.testing.assert_close(y, e)
    assert sum(p.numel() for p in ibn.parameters()) == 2 * 4


@pytest.mark.parametrize("deform", [False, True])
def test_level_conv_is_one_conv_over_all_levels(deform) -> None:
    module = _randomise(LevelConv(3, 5, deform=deform), std=0.2).double()
    xs = _pyramid(_halving(9, 8, 3))
    for level, (y, x) in enumerate(zip(module(xs), xs)):
        expected = _conv(module.conv, x, deform and level >= 1)  # bottom level plain
        assert y.shape == (2, 5, *x.shape[-2:])
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    expected_params = 9 * 3 * 5 + 5 + (9 * 3 * 18 + 18 if deform else 0)
    assert sum(p.numel() for p in module.parameters()) == expected_params


def test_deformable_conv_from_conv_shares_the_weights() -> None:
    conv = nn.Conv2d(4, 6, 3, 2, 1)
    twin = DeformableConv2d.from_conv(conv)
    assert twin.weight is conv.weight and twin.bias is conv.bias
    x = torch.randn(1, 4, 9, 7)
    torch.testing.assert_close(twin(x), conv(x), rtol=1e-5, atol=1e-6)  # zero offsets
    torch.testing.assert_close(twin(x, deform=False), conv(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="`conv` must have groups=1"):
        DeformableConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`in_channels` must be a positive integer"):
        PConv(0, 4)
    with pytest.raises(ValueError, match="`start_level`=-1"):
        PConv(4, 4, start_level=-1)
    with pytest.raises(ValueError, match="`deform` must be True or False"):
        PConv(4, 4, deform="yes")
    with pytest.raises(ValueError, match="`align_corners` must be True or False"):
        PConv(4, 4, align_corners=None)
    with pytest.raises(ValueError, match="`num_features` must be a positive integer"):
        IntegratedBN(0)
    with pytest.raises(ValueError, match="`start_level`=1.5"):
        LevelConv(4, 4, start_level=1.5)
    module = PConv(4, 4)
    with pytest.raises(ValueError, match="`features` has 1 level"):
        module([torch.randn(1, 4, 8, 8)])
    with pytest.raises(ValueError, match="must be a list"):
        module(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"`features`\[1\] has shape \(1, 3, 4, 4\)"):
        module([torch.randn(1, 4, 8, 8), torch.randn(1, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"`features`\[1\] has shape \(2, 4, 4, 4\)"):
        IntegratedBN(4)([torch.randn(1, 4, 8, 8), torch.randn(2, 4, 4, 4)])
