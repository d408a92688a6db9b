"""Converting the PSConv authors' layer: the converted network computes the same function.

The original layer is rebuilt in the test from NOTES.md (psconv_original_ref.OriginalPSConv: three convs,
masked dense conv), dropped into a standard ResNet / ResNeXt, randomised, converted with
load_model_weights, and compared with our PS network on the same input.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from psconv_original_ref import OriginalPSConv, randomize, to_original

from polyscale.models import create_model, load_model_weights
from polyscale.models.convert import match_dilation_layout, original_psconv_dense


def test_original_dilation_layout_is_the_one_in_the_notes() -> None:
    """d=2, 4 parts: output part o sees o=0: [2,1,4,1], o=1: [1,2,1,4], o=2: [4,1,2,1], o=3: [1,4,1,2]."""
    w = torch.zeros(8, 2, 3, 3)  # 8 channels, 2 per part
    _, d, mask = original_psconv_dense(w, w, torch.zeros(8, 8, 3, 3), groups=1, dilation=2)
    blocks = d[::2, ::2]
    assert blocks.tolist() == [[2, 1, 4, 1], [1, 2, 1, 4], [4, 1, 2, 1], [1, 4, 1, 2]]
    assert torch.equal(mask, d > 1)
    _, d1, _ = original_psconv_dense(w, w, torch.zeros(8, 8, 3, 3), groups=1, dilation=1)
    assert d1[::2, ::2][0].tolist() == [1, 1, 2, 1]  # the default d=1 realises only {1,1,2,1}


def test_original_dense_kernel_matches_the_three_convs() -> None:
    torch.manual_seed(0)
    layer = OriginalPSConv(16, 8, groups=2).eval()
    randomize(layer)
    weight, d, _ = original_psconv_dense(
        layer.gwconv.weight, layer.gwconv_shift.weight, layer.conv.weight, groups=2, dilation=2
    )
    x = torch.randn(1, 16, 12, 12)
    ref = sum(  # Eq. (3) with the layer's D, one dilation class at a time
        torch.nn.functional.conv2d(x, weight * (d == r)[..., None, None], padding=r, dilation=r, groups=2)
        for r in (1, 2, 4)
    )
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_match_dilation_layout_recovers_a_relabelling() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([1, 2, 1, 4])
    dst = base[(torch.arange(12)[:, None] + torch.arange(8)[None, :]) % 4]  # interleaved, (12, 8)
    rows, cols = torch.randperm(12, generator=g), torch.randperm(8, generator=g)
    src = torch.empty_like(dst)
    src[rows[:, None], cols[None, :]] = dst  # src is dst with channels relabelled
    r, c = match_dilation_layout(src, dst)
    assert torch.equal(src[r][:, c], dst)
    with pytest.raises(ValueError, match="relabelling"):
        match_dilation_layout(src, torch.where(dst == 4, 8, dst))  # other rates
    with pytest.raises(ValueError, match="relabelling"):
        match_dilation_layout(src, base[torch.arange(8)[None, :].expand(12, 8) % 4])  # input axis only
    with pytest.raises(ValueError, match="shape"):
        match_dilation_layout(src, dst[:4])


@pytest.mark.parametrize(
    ("std_name", "ps_name"), [("resnet50", "ps_resnet50"), ("resnext50_32x4d", "ps_resnext50_32x4d")]
)
def test_converted_network_computes_the_same_function(std_name: str, ps_name: str) -> None:
    torch.manual_seed(0)
    original = to_original(create_model(std_name)).eval()
    randomize(original)
    ours = create_model(ps_name).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a correctly masked file converts without loss
        report = load_model_weights(ours, original.state_dict())
    assert report.complete and len(report.converted_layers) == 16 and not report.unrepresentable
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = original(x), ours(x)
        fresh = create_model(ps_name).eval()(x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)
    assert (fresh - ref).abs().max() > 0.1 * scale  # the comparison can fail


def test_masked_block_leftovers_are_reported_with_their_magnitude() -> None:
    """Weights left in masked blocks (re-init after masking; the grouped version's partial masking)."""
    torch.manual_seed(0)
    original = to_original(create_model("resnext50_32x4d"), masked_groups=range(4)).eval()
    randomize(original)
    sd = original.state_dict()
    ideal = OriginalPSConv(256, 256, groups=32).mask  # where a correct layer would be masked
    leftover = sd["layer2.1.conv2.conv.weight"][ideal]
    ours = create_model("ps_resnext50_32x4d").eval()
    with pytest.warns(UserWarning, match="approximates the original"):
        report = load_model_weights(ours, sd)
    assert len(report.unrepresentable) == 16
    item = next(u for u in report.unrepresentable if u.layer == "layer2.1.conv2")
    assert item.max_abs == pytest.approx(leftover.abs().max().item())
    assert item.fraction_nonzero == pytest.approx(28 / 32)  # 4 of 32 groups were masked
    assert 0.3 < item.rel_norm < 1.5
    assert "masked-block weights in 16 layers" in report.summary()
