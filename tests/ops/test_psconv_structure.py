"""PSConv2d's contract beyond exactness: the structure of D, parameter and multiply-add counts,
weight / state-dict round trips, memory formats, autocast, compile, copies, and argument errors."""

from __future__ import annotations

import copy
import math
import pickle
from collections import Counter

import pytest
import torch
from psconv_reference import loop_reference, masked_reference, reference_of
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polyscale.ops import PSConv2d, psconv_impls
from polyscale.ops.psconv_terms import IMPLS

PATTERN = (1, 2, 1, 4)


def _paper_matrix(module: PSConv2d) -> torch.Tensor:
    """D relabelled into the paper's interleaved channel order with the module's own paper_order()."""
    out_index, in_index = module.paper_order()
    assert sorted(out_index.tolist()) == list(range(module.out_channels))  # permutations
    assert sorted(in_index.tolist()) == list(range(module.in_channels // module.groups))
    return module.dilation_matrix()[out_index][:, in_index]


@pytest.mark.parametrize("groups", [1, 2])
def test_dilation_matrix_both_axes(groups) -> None:
    """The paper's layout: rows cycle through the pattern, each filter the previous shifted by one."""
    module = PSConv2d(16 * groups, 12 * groups, groups=groups, dilation_pattern=PATTERN)
    d = module.dilation_matrix()
    assert d.dtype == torch.long and d.shape == (12 * groups, 16)
    expected = torch.tensor([[PATTERN[(k - c) % 4] for k in range(16)] for c in range(12)])
    paper = _paper_matrix(module)
    for g in range(groups):  # the same pattern inside every group
        assert torch.equal(paper[12 * g : 12 * (g + 1)], expected)
    assert torch.equal(paper[1:, 1:], paper[:-1, :-1])  # row shift property
    for row in d:  # multi-scale along every filter and for every input channel, in any order
        assert Counter(row.tolist()) == {1: 8, 2: 4, 4: 4}
    for column in d.T:
        assert Counter(column.tolist()) == {1: 6 * groups, 2: 3 * groups, 4: 3 * groups}


def test_module_order_is_class_contiguous() -> None:
    """In the module's own order D is made of constant (C/t x C/t) blocks: same-rate channels adjacent."""
    d = PSConv2d(64, 64, dilation_pattern=PATTERN).dilation_matrix()
    blocks = d.view(4, 16, 4, 16)
    assert torch.equal(blocks, blocks[:, :1, :, :1].expand_as(blocks))


def test_dilation_matrix_single_axis() -> None:
    """Table 5: axes="input" varies only along input channels, axes="output" only across filters."""
    paper_in = _paper_matrix(PSConv2d(8, 6, dilation_pattern=PATTERN, axes="input"))
    assert torch.equal(paper_in, torch.tensor([[PATTERN[k % 4] for k in range(8)]] * 6))
    paper_out = _paper_matrix(PSConv2d(8, 6, dilation_pattern=PATTERN, axes="output"))
    assert torch.equal(paper_out, torch.tensor([[PATTERN[c % 4]] * 8 for c in range(6)]))


@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(8, 8, 1), (10, 6, 2)])
def test_paper_order_relabels_to_the_interleaved_operator(c_in, c_out, groups) -> None:
    """Eq. (3) with the paper's interleaved D and relabelled weights gives the relabelled output."""
    module = PSConv2d(c_in, c_out, groups=groups, dilation_pattern=PATTERN).double()
    out_index, in_local = module.paper_order()
    per_group = c_in // groups
    in_index = torch.cat([g * per_group + in_local for g in range(groups)])
    x_paper = torch.randn(2, c_in, 7, 6, dtype=torch.float64)
    x_module = torch.empty_like(x_paper)
    x_module[:, in_index] = x_paper
    weight_paper = module.weight.detach()[out_index][:, in_local]
    d_paper = torch.tensor([[PATTERN[(k - c) % 4] for k in range(per_group)] for c in range(c_out // groups)])
    expected = loop_reference(x_paper, weight_paper, d_paper.repeat(groups, 1), 1, 1, groups, None)
    torch.testing.assert_close(module(x_module)[:, out_index], expected, rtol=0, atol=1e-10)


def test_original_authors_layout_converts_through_paper_order() -> None:
    """docs/operators.md's recipe: the original contiguous-parts layer (D_orig[o, j] =
    p[(j - o + 1) mod 4] over parts of C/4) maps onto the module exactly via paper_order()."""
    channels, part = 8, 2
    module = PSConv2d(channels, channels, dilation_pattern=PATTERN).double()
    d_orig = torch.tensor(
        [[PATTERN[(j // part - o // part + 1) % 4] for j in range(channels)] for o in range(channels)]
    )
    w_orig = torch.randn(channels, channels, 3, 3, dtype=torch.float64)
    out_index, in_index = module.paper_order()
    src_in, src_out = torch.empty(channels, dtype=torch.long), torch.empty(channels, dtype=torch.long)
    for block in range(4):
        for r in range(part):
            src_in[in_index[r * 4 + block]] = block * part + r
            src_out[out_index[r * 4 + (block - 1) % 4]] = block * part + r
    module.load_dense_weight(w_orig[src_out][:, src_in])
    assert torch.equal(module.dilation_matrix(), d_orig[src_out][:, src_in])
    x = torch.randn(2, channels, 7, 7, dtype=torch.float64)
    expected = loop_reference(x, w_orig, d_orig, 1, 1, 1, None)[:, src_out]
    torch.testing.assert_close(module(x[:, src_in]), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "groups", "bias"), [(64, 64, 3, 1, False), (30, 20, 5, 2, True)]
)
def test_parameter_neutral(c_in, c_out, k, groups, bias) -> None:
    """Exactly nn.Conv2d's parameters, stored as nn.Conv2d's state dict: no masks or dead weights."""
    ps = PSConv2d(c_in, c_out, k, groups=groups, bias=bias)
    conv = nn.Conv2d(c_in, c_out, k, groups=groups, bias=bias)
    assert sum(p.numel() for p in ps.parameters()) == sum(p.numel() for p in conv.parameters())
    assert {k: v.shape for k, v in ps.state_dict().items()} == {
        k: v.shape for k, v in conv.state_dict().items()
    }
    assert ps.dense_weight().shape == (c_out, c_in // groups, k, k)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """grad_input and grad_weight each take the forward's multiply-adds (torch's own formula ignores
    groups for grad_weight, which would overcount every grouped conv)."""
    output_mask = args[7]
    return (
        2 * math.prod(grad_out_shape) * math.prod(w_shape[1:]) * (int(output_mask[0]) + int(output_mask[1]))
    )


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("c_in", "groups", "axes"), [(64, 1, "both"), (128, 32, "both"), (18, 1, "input")])
def test_multiply_adds_equal_conv(impl, c_in, groups, axes) -> None:
    """FlopCounterMode: forward and forward+backward multiply-adds equal nn.Conv2d's (none wasted)."""

    def flops(module: nn.Module, backward: bool) -> int:
        x = torch.randn(2, c_in, 16, 16, requires_grad=backward)
        mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            out = module(x)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    ps = PSConv2d(c_in, c_in, groups=groups, axes=axes, impl=impl)
    conv = nn.Conv2d(c_in, c_in, 3, padding=1, groups=groups, bias=False)
    assert flops(ps, backward=False) == flops(conv, backward=False) > 0
    assert flops(ps, backward=True) == flops(conv, backward=True) == 3 * flops(conv, backward=False)


def test_load_dense_weight_round_trip() -> None:
    module = PSConv2d(16, 8, groups=2)
    weight = torch.randn(8, 8, 3, 3)
    module.load_dense_weight(weight)
    assert torch.equal(module.dense_weight(), weight)
    assert module.dense_weight().requires_grad  # still the trainable parameter
    with pytest.raises(ValueError, match=r"`weight` must have shape \(8, 8, 3, 3\)"):
        module.load_dense_weight(torch.randn(8, 16, 3, 3))


def test_state_dict_round_trip_across_impls() -> None:
    """The state dict holds only nn.Conv2d's tensors, so it loads into any impl."""
    source = PSConv2d(32, 16, bias=True, impl="grouped")
    state = source.state_dict()
    assert set(state) == {"weight", "bias"}  # index buffers are not persistent
    target = PSConv2d(32, 16, bias=True, impl="shifts")
    target.load_state_dict(state)
    x = torch.randn(2, 32, 9, 9)
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(16, 12, 2), (64, 64, 2)])
def test_channels_last(impl, c_in, c_out, groups) -> None:
    """NHWC inputs give the same values, an NHWC output (like nn.Conv2d) and the same gradients."""
    module = PSConv2d(c_in, c_out, groups=groups, bias=True, impl=impl).double()
    x = torch.randn(2, c_in, 9, 9, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    out = module(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = reference_of(module, x, masked_reference)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, module.weight], grad)
    for g, e in zip(got, torch.autograd.grad(expected, [x, module.weight], grad)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    assert module(torch.randn(1, c_in, 5, 5, dtype=torch.float64)).is_contiguous()  # NCHW in, NCHW out


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bf16_autocast_close_to_fp32(impl) -> None:
    module = PSConv2d(32, 32, bias=True, impl=impl)
    x = torch.randn(2, 32, 12, 12)
    expected = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_module_copies_and_device_moves() -> None:
    """deepcopy (EMA), pickle (spawned workers) and .to() keep the module working; no device state."""
    module = PSConv2d(16, 16, axes="both")
    x = torch.randn(1, 16, 8, 8)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.testing.assert_close(clone(x), module(x))
    moved = copy.deepcopy(module).to("meta")
    assert all(t.device.type == "meta" for t in [*moved.parameters(), *moved.buffers()])
    assert moved(x.to("meta")).shape == (1, 16, 8, 8)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 8, "out_channels": 8, "bias": True, "impl": "grouped"},
        # one channel per class: dilated depthwise terms with their custom CPU backward (ops/_dilated.py)
        {"in_channels": 16, "out_channels": 16, "groups": 4, "impl": "shifts"},
    ],
)
def test_torch_compile_traces_one_graph(kwargs: dict, chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """fullgraph capture (dynamo + AOT autograd, eager kernels): same outputs and gradients, also with
    the CPU batch chunks (psconv_impls.CPU_CHUNK_BYTES) in the traced graph."""
    x = torch.randn(3, kwargs["in_channels"], 10, 10, requires_grad=True)
    if chunked:
        monkeypatch.setattr(psconv_impls, "CPU_CHUNK_BYTES", x[0].numel() * x.element_size())
    module = PSConv2d(**kwargs)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, module(x))
    grads = torch.autograd.grad(out.square().sum(), [x, module.weight])
    expected = torch.autograd.grad(module(x).square().sum(), [x, module.weight])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_ddp_gradients_match_single_process(tmp_path) -> None:
    """DistributedDataParallel (gloo, one process): buffers broadcast, gradients as without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    module = PSConv2d(16, 16, bias=True)
    reference = copy.deepcopy(module)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        x = torch.randn(2, 16, 8, 8)
        ddp(x).square().sum().backward()
        reference(x).square().sum().backward()
        torch.testing.assert_close(module.weight.grad, reference.weight.grad)
        torch.testing.assert_close(module.bias.grad, reference.bias.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_compile_inductor() -> None:
    """Inductor codegen on CPU (about a minute on 2 cores, hence slow)."""
    module = PSConv2d(8, 8, impl="grouped")
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(torch.compile(module)(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dilation_pattern": (1, 0)}, r"dilation_pattern\[1\] must be a positive integer"),
        ({"dilation_pattern": (1, -2)}, r"dilation_pattern\[1\] must be a positive integer"),
        ({"dilation_pattern": (1, 1.5)}, r"dilation_pattern\[1\] must be a positive integer"),
        ({"dilation_pattern": ()}, r"dilation_pattern must be a non-empty list"),
        ({"kernel_size": 4}, r"kernel_size must be odd"),
        ({"kernel_size": (3, 5)}, r"kernel_size must be an odd int k or a square pair"),
        ({"groups": 3}, r"groups=3 must divide in_channels=16"),
        ({"out_channels": 10, "groups": 4}, r"groups=4 must divide out_channels=10"),
        ({"groups": 8}, r"dilation_pattern has 4 rates but each group has only in_channels/groups=2"),
        ({"axes": "spatial"}, r"axes must be one of \('both', 'input', 'output'\)"),
        (
            {"impl": "triton"},
            r"impl must be None .* or one of \('grouped', 'shifts', 'depthwise'\)",
        ),
        ({"stride": 0}, r"stride must be an int >= 1"),
        ({"padding": -1}, r"padding must be an int >= 0"),
        ({"in_channels": 0}, r"in_channels must be a positive integer"),
    ],
)
def test_bad_arguments_raise(kwargs, message) -> None:
    args = {"in_channels": 16, "out_channels": 16} | kwargs
    with pytest.raises(ValueError, match=message):
        PSConv2d(**args)


def test_wrong_input_channels_raise() -> None:
    with pytest.raises(ValueError, match=r"expected input \(N, 16, H, W\)"):
        PSConv2d(16, 16)(torch.randn(1, 8, 5, 5))
