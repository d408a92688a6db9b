"""polyscale.models.scales: the share of kernel weight per dilation rate / PyConv level, worked out by hand
for one PSConv2d and one PyConv2d, and their sums per stage and over a network."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from torch import nn

from polyscale.models import scales
from polyscale.models.scales import aggregate, layer_kind, scale_shares, scales_of, stage_of
from polyscale.ops import PSConv2d, PyConv2d

TAPS = 9  # 3 x 3


def hand_set_psconv(pattern: tuple[int, ...] = (1, 2, 1, 4)) -> PSConv2d:
    """A 4 -> 4 PSConv2d whose kernels at rate 1 are all 1, at rate 2 all -2 (|w| counts, not w), and at
    rate 4 zero but for a centre tap of 3 (sums run over the taps; count still counts the zeros)."""
    conv = PSConv2d(4, 4, 3, dilation_pattern=pattern)
    d = conv.dilation_matrix()  # (C_out, C_in), the operator's contract
    weight = torch.zeros(4, 4, 3, 3)
    weight[d == 1] = 1.0
    weight[d == 2] = -2.0
    weight[(d == 4).nonzero(as_tuple=True) + (1, 1)] = 3.0
    conv.load_dense_weight(weight)
    return conv


def hand_set_pyconv() -> PyConv2d:
    """8 -> 8 as 4 + 4: level k=3 (groups 1: 4*8*9 = 288 weights of 1), k=5 (groups 2: 4*4*25 = 400
    of 0.5)."""
    conv = PyConv2d(8, 8, kernel_sizes=(3, 5), pyramid_groups=(1, 2))
    with torch.no_grad():
        conv.levels[0].weight.fill_(1.0)
        conv.levels[1].weight.fill_(0.5)
    return conv


def test_psconv_shares_by_hand() -> None:
    (layer,) = scale_shares(nn.Sequential(hand_set_psconv()))
    assert (layer.name, layer.stage, layer.type, layer.scale, layer.values) == (
        "0",
        "0",
        "psconv",
        "dilation",
        [1, 2, 4],
    )
    # {1,2,1,4} on 4 x 4 kernels: 8 at rate 1, 4 at rate 2, 4 at rate 4
    assert layer.sums["count"] == [8 * TAPS, 4 * TAPS, 4 * TAPS] and layer.shares("count") == [
        0.5,
        0.25,
        0.25,
    ]
    # L1: 8*9*1 = 72, 4*9*2 = 72, 4*3 = 12 (of 156); L2: 72, 4*9*4 = 144, 4*9 = 36 (of 252)
    assert layer.sums["l1"] == [72.0, 72.0, 12.0]
    assert layer.shares("l1") == pytest.approx([6 / 13, 6 / 13, 1 / 13])
    assert layer.shares("l2") == pytest.approx([2 / 7, 4 / 7, 1 / 7])
    assert layer.labels == ["d=1", "d=2", "d=4"] and layer.large_fraction is None
    record = layer.to_json()
    assert record["rates"] == [1, 2, 4] and record["params"] == 16 * TAPS
    assert record["shares"]["l1"] == [round(6 / 13, 6), round(6 / 13, 6), round(1 / 13, 6)]
    assert (record["class"], record["pattern"], record["axes"]) == ("PSConv2d", [1, 2, 1, 4], "both")


def test_pyconv_shares_by_hand() -> None:
    (layer,) = scale_shares(nn.Sequential(hand_set_pyconv()))  # its levels (plain convs) are not layers
    assert (layer.type, layer.scale, layer.values, layer.labels) == (
        "pyconv",
        "kernel_size",
        [3, 5],
        ["k=3", "k=5"],
    )
    assert layer.sums == {"l1": [288.0, 200.0], "l2": [288.0, 100.0], "count": [288.0, 400.0]}
    assert layer.shares("l1") == pytest.approx([288 / 488, 200 / 488])
    record = layer.to_json()
    assert record["levels"] == [3, 5] and "rates" not in record and scales_of(record) == [3, 5]
    assert (record["pyramid_groups"], record["out_splits"], record["params"]) == ([1, 2], [4, 4], 688)


def test_network_stages_and_total() -> None:
    model = nn.Module()
    model.stem = nn.Conv2d(3, 4, 3)
    model.layer1 = nn.Sequential(hand_set_psconv(), hand_set_pyconv())
    model.layer2 = nn.Sequential(nn.Sequential(hand_set_psconv((1, 2, 1, 1))))
    with torch.no_grad():
        model.layer2[0][0].weight.fill_(1.0)  # {1,2,1,1}: 12 kernels at rate 1, 4 at rate 2, all |w| = 1
    layers = scale_shares(model)
    assert [(x.name, x.stage, x.values) for x in layers] == [
        ("layer1.0", "layer1", [1, 2, 4]),
        ("layer1.1", "layer1", [3, 5]),
        ("layer2.0.0", "layer2", [1, 2]),
    ]
    stages = aggregate(layers)
    assert [(s["stage"], s["scale"], s["layers"], scales_of(s)) for s in stages] == [
        ("layer1", "dilation", 1, [1, 2, 4]),
        ("layer1", "kernel_size", 1, [3, 5]),
        ("layer2", "dilation", 1, [1, 2]),
    ]
    assert stages[0]["shares"]["l1"] == [round(6 / 13, 6), round(6 / 13, 6), round(1 / 13, 6)]
    assert stages[2]["shares"] == {"l1": [0.75, 0.25], "l2": [0.75, 0.25], "count": [0.75, 0.25]}
    # over the network, on the union of rates: count 72+108, 36+36, 36+0 (of 288); L1 72+108, 72+36, 12+0
    dilation, kernel = aggregate(layers, by_stage=False)
    assert (dilation["stage"], dilation["layers"], dilation["rates"]) == ("all", 2, [1, 2, 4])
    assert dilation["shares"]["count"] == [0.625, 0.25, 0.125]
    assert dilation["shares"]["l1"] == [0.6, 0.36, 0.04] and dilation["types"] == ["psconv"]
    assert (kernel["stage"], kernel["levels"], kernel["layers"]) == ("all", [3, 5], 1)


def test_dynamic_fraction_is_weighted_by_layer_size() -> None:
    """Two dynamic look-alikes in one stage: the stage's large fraction is over all their kernels."""

    class Dynamic(nn.Module):
        def __init__(self, channels: int, large: int) -> None:
            super().__init__()
            self.rates = (1, 3)
            self.weight = nn.Parameter(torch.ones(channels, channels, 3, 3))
            self.register_buffer("mask", torch.arange(channels * channels).view(channels, channels) < large)

        def large_rate_mask(self) -> torch.Tensor:
            return self.mask

        def large_fraction(self) -> float:
            return float(self.mask.float().mean())

    layers = scale_shares(nn.Sequential(nn.Sequential(Dynamic(2, 2), Dynamic(4, 4))))
    assert [(x.type, x.values, x.large_fraction) for x in layers] == [
        ("dynamic_psconv", [1, 3], 0.5),
        ("dynamic_psconv", [1, 3], 0.25),
    ]
    (stage,) = aggregate(layers)
    assert stage["large_fraction"] == pytest.approx(6 / 20) and stage["shares"]["count"] == [0.7, 0.3]


def test_stage_names_and_kinds() -> None:
    assert stage_of("backbone.body.layer3.1.conv2") == "layer3"
    assert stage_of("stages.2.blocks.0.conv") == "stages.2" and stage_of("head.conv") == "head"
    assert layer_kind(nn.Conv2d(4, 4, 3)) is None and layer_kind(PSConv2d(4, 4, 3)) == "psconv"
    assert layer_kind(PyConv2d(8, 8, (3, 5), (1, 2))) == "pyconv"


def test_reads_modules_without_the_layers_above() -> None:
    """Model code never sees the config: the module imports no engine, task, config or Hydra code."""
    tree = ast.parse(inspect.getsource(scales))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    banned = (
        "polyscale.engine",
        "polyscale.tasks",
        "polyscale.config",
        "polyscale.cli",
        "hydra",
        "omegaconf",
    )
    assert not [name for name in imported if name.startswith(banned)]
