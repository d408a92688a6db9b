"""PSConv2d computes Eq. (3) exactly, in every impl: outputs and gradients vs the references."""

from __future__ import annotations

import pytest
import torch
from psconv_reference import blocks_reference, loop_reference, masked_reference, reference_of
from torch import nn

from polyscale.ops import PSConv2d, psconv_impls
from polyscale.ops.psconv_terms import IMPLS

AXES = ("both", "input", "output")
PATTERNS = {1: (2,), 2: (1, 2), 4: (1, 2, 1, 4), 8: (1, 2, 1, 4, 1, 2, 1, 3)}


def _check_against(module: PSConv2d, x: torch.Tensor, reference, atol: float = 1e-10) -> None:
    """Forward and input / weight / bias gradients of `module` equal those of `reference` (float64)."""
    x = x.detach().requires_grad_()
    out = module(x)
    grad = torch.randn_like(out)
    params = [p for p in (module.weight, module.bias) if p is not None]
    got = torch.autograd.grad(out, [x, *params], grad)
    expected_out = reference_of(module, x, reference)
    assert out.shape == expected_out.shape
    torch.testing.assert_close(out, expected_out, rtol=0, atol=atol)
    expected = torch.autograd.grad(expected_out, [x, *params], grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "pattern", "stride"),
    [
        (8, 8, 1, PATTERNS[4], 1),
        (8, 6, 1, PATTERNS[8], 2),  # C_out not divisible by t
        (6, 4, 2, (1, 3), 1),
        (7, 5, 1, PATTERNS[4], 2),  # C_in not divisible by t: uneven classes
        (4, 4, 1, PATTERNS[1], 1),
    ],
)
def test_matches_loop_reference(impl, axes, c_in, c_out, groups, pattern, stride) -> None:
    """Tiny shapes against explicit loops over (c, k, i, j), which share no code with the module."""
    module = PSConv2d(
        c_in, c_out, 3, stride, groups=groups, bias=True, dilation_pattern=pattern, axes=axes, impl=impl
    )
    module.double()
    _check_against(module, torch.randn(2, c_in, 9, 8, dtype=torch.float64), loop_reference)


def test_references_agree() -> None:
    """The masked-conv and naive per-block references (used on larger shapes) equal the loop
    reference, kernel 5 too."""
    for k, stride, padding in [(3, 1, 1), (5, 2, 2), (3, 2, 0)]:
        x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
        weight = torch.randn(6, 4, k, k, dtype=torch.float64)
        dilation = torch.randint(1, 4, (6, 4))
        args = (x, weight, dilation, stride, padding, 2, None)
        expected = loop_reference(*args)
        torch.testing.assert_close(masked_reference(*args), expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(blocks_reference(*args), expected, rtol=0, atol=1e-10)


GRID = [  # (c_in, c_out, groups): ResNeXt-like group counts and channel counts not divisible by t
    (16, 16, 1),
    (24, 20, 2),
    (64, 32, 4),
    (64, 64, 8),
    (128, 128, 32),  # 4 channels per group: the d=2 / d=4 parts are depthwise convs
    (18, 22, 1),
]


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize(("c_in", "c_out", "groups"), GRID)
def test_matches_masked_reference(axes, c_in, c_out, groups) -> None:
    """Every impl, pattern length (1, 2, 4, 8) and stride against the masked-conv reference."""
    x = torch.randn(2, c_in, 8, 8, dtype=torch.float64)
    for length, pattern in PATTERNS.items():
        if length > c_in // groups:
            continue
        for stride in (1, 2):
            for impl in IMPLS:
                module = PSConv2d(
                    c_in, c_out, 3, stride, groups=groups, dilation_pattern=pattern, axes=axes, impl=impl
                )
                _check_against(module.double(), x, masked_reference)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_single_rate_is_a_dilated_conv(kernel_size, stride) -> None:
    """A one-element pattern (d) is exactly nn.Conv2d(dilation=d) with "same" padding."""
    for d in (1, 2, 3):
        ps = PSConv2d(12, 10, kernel_size, stride, groups=2, bias=True, dilation_pattern=(d,)).double()
        conv = nn.Conv2d(12, 10, kernel_size, stride, d * (kernel_size - 1) // 2, d, groups=2).double()
        conv.load_state_dict(ps.state_dict())
        x = torch.randn(2, 12, 13, 11, dtype=torch.float64)
        torch.testing.assert_close(ps(x), conv(x), rtol=0, atol=1e-12)


def test_constant_pattern_is_a_plain_conv() -> None:
    """A pattern repeating one rate runs as ONE dense conv equal to nn.Conv2d."""
    ps = PSConv2d(16, 8, dilation_pattern=(1, 1, 1, 1)).double()
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False).double()
    conv.weight.data.copy_(ps.weight.data)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(ps(x), conv(x), rtol=0, atol=1e-12)
    assert len(ps._impls["grouped"].terms) == 1


@pytest.mark.parametrize("padding", [0, 2])
def test_explicit_padding_shifts_every_rate_alike(padding) -> None:
    """padding p is the dilation-1 padding; output size follows nn.Conv2d(k, stride, p) at every rate."""
    module = PSConv2d(8, 8, 3, 2, padding, dilation_pattern=(1, 2, 1, 4)).double()
    x = torch.randn(1, 8, 12, 9, dtype=torch.float64)
    expected = nn.Conv2d(8, 8, 3, 2, padding)(x.float()).shape
    assert module(x).shape == expected
    _check_against(module, x, loop_reference)


def test_same_output_size_as_conv_for_every_rate_and_stride() -> None:
    for size in (7, 8, 15, 56):
        for stride in (1, 2, 3):
            x = torch.randn(1, 8, size, size + 1)
            expected = nn.Conv2d(8, 8, 3, stride, 1)(x).shape
            assert PSConv2d(8, 8, 3, stride, dilation_pattern=(1, 2, 4, 8))(x).shape == expected


def test_impls_agree_in_float32() -> None:
    """All impls and the naive per-block split give the same values on the benchmark's channel count
    (fp32 tolerance)."""
    x = torch.randn(2, 64, 14, 14)
    module = PSConv2d(64, 64)
    outputs = {}
    for impl in IMPLS:
        module.impl = impl
        outputs[impl] = module(x)
    outputs["blocks"] = reference_of(module, x, blocks_reference)
    for impl, out in outputs.items():
        torch.testing.assert_close(out, outputs["grouped"], rtol=1e-5, atol=1e-5, msg=impl)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_batch_chunking_changes_nothing(
    impl: str, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU big batches run a few samples at a time (psconv_impls.CPU_CHUNK_BYTES): same values."""
    module = PSConv2d(16, 12, 3, groups=4, bias=True, impl=impl).double()
    x = torch.randn(5, 16, 9, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    per_sample = x[0].numel() * x.element_size()

    def run(chunk_bytes: int) -> tuple[torch.Tensor, ...]:
        monkeypatch.setattr(psconv_impls, "CPU_CHUNK_BYTES", chunk_bytes)
        xg = x.clone().requires_grad_()
        out = module(xg)
        grads = torch.autograd.grad(out, [xg, module.weight, module.bias], torch.ones_like(out) * 0.5)
        return (out, *grads)

    assert psconv_impls.cpu_chunk_size(x) == 5  # the default budget holds this whole batch
    whole = run(0)
    monkeypatch.setattr(psconv_impls, "CPU_CHUNK_BYTES", 2 * per_sample)
    assert psconv_impls.cpu_chunk_size(x) == 2  # chunks of 2, 2, 1
    chunked = run(2 * per_sample)
    assert chunked[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_autotune_keeps_the_fastest_impl_per_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """impl=None + cudnn.benchmark on a tuned device: each impl timed once, the fastest kept."""
    monkeypatch.setattr(psconv_impls, "AUTOTUNE_DEVICES", frozenset({"cpu"}))  # CUDA's logic, on the CPU
    monkeypatch.setattr(psconv_impls, "_TUNED", {})
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    fake = dict.fromkeys(IMPLS, 3.0) | {"shifts": 1.0, "depthwise": 2.0}  # seconds per call, by impl
    ran: list[str] = []
    real_run = psconv_impls.PSConvImpl.run

    def spy_run(self: psconv_impls.PSConvImpl, *args: object) -> torch.Tensor:
        ran.append(self.name)
        return real_run(self, *args)

    monkeypatch.setattr(psconv_impls.PSConvImpl, "run", spy_run)
    monkeypatch.setattr(psconv_impls, "_seconds", lambda fn, device: (fn(), fake[ran[-1]])[1])
    module = PSConv2d(8, 8, 3).double()
    reference = PSConv2d(8, 8, 3, impl="grouped").double()
    reference.load_state_dict(module.state_dict())
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    calls: list[torch.Tensor] = []
    module.register_forward_hook(lambda mod, args, out: calls.append(out))

    out = module(x)
    assert sorted(set(ran)) == sorted(IMPLS) and ran[-1] == "shifts"  # timed all, then ran the fastest
    assert list(psconv_impls.autotuned().values()) == ["shifts"]
    assert module.weight.grad is None  # timing the backward leaves no gradient behind
    assert len(calls) == 1  # the timing runs bypass hooks
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-12)

    ran.clear()
    module(x)
    assert ran == ["shifts"]  # same signature: no new timing
    with torch.no_grad():
        module(x)  # another signature (no grad): timed again, forward only
    assert len(psconv_impls.autotuned()) == 2

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    ran.clear()
    module(torch.randn(3, 8, 6, 6, dtype=torch.float64))
    assert ran == [psconv_impls.default_impl(module, "cpu")] and len(psconv_impls.autotuned()) == 2


@pytest.mark.parametrize("impl", ["grouped", "shifts", "depthwise"])
def test_captured_graphs_compute_the_eager_values_for_any_batch(impl: str) -> None:
    """Under torch.jit.trace and torch.export PSConv swaps its in-place block add for a gather and stops
    chunking the batch (ops/_permute.py): the graph gives eager PyTorch's values at other batch sizes,
    and eager PyTorch keeps its own forms."""
    torch.manual_seed(0)
    conv = PSConv2d(16, 16, 3, dilation_pattern=(1, 2, 1, 4), impl=impl).eval()
    x2, x5 = torch.randn(2, 16, 9, 9), torch.randn(5, 16, 9, 9)
    with torch.no_grad():
        traced = torch.jit.trace(conv, x2, check_trace=False)
        exported = torch.export.export(conv, (x2,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        expected = conv(x5)
        assert torch.allclose(traced(x5), expected, atol=1e-5)
        assert torch.allclose(exported.module()(x5), expected, atol=1e-5)
    assert "PythonOp" not in str(traced.graph)  # the autograd Function would not be savable
