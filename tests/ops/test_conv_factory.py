"""The conv factory: names to conv_layer callables with nn.Conv2d's calling convention."""

from __future__ import annotations

import pickle
from dataclasses import asdict

import pytest
import torch
from torch import nn

from polyscale.config.model import ConvConfig
from polyscale.ops import CONV_TYPES, PSConv2d, PyConv2d, make_conv_layer, stage_conv_layers


def test_standard_is_a_same_padded_conv() -> None:
    conv = make_conv_layer("standard")(16, 32, 3, stride=2)
    assert type(conv) is nn.Conv2d and conv.padding == (1, 1) and conv.bias is None
    assert conv(torch.randn(1, 16, 9, 9)).shape == (1, 32, 5, 5)
    assert make_conv_layer("standard")(8, 8, 5, groups=2, bias=True).padding == (2, 2)


def test_psconv_binds_its_options_and_ignores_none() -> None:
    layer = make_conv_layer("psconv", dilation_pattern=[1, 2], axes="input", impl=None)
    conv = layer(16, 32, 3, 2, groups=2)
    assert isinstance(conv, PSConv2d)
    assert (conv.dilation_pattern, conv.axes, conv.groups, conv.stride, conv.impl) == (
        (1, 2),
        "input",
        2,
        (2, 2),
        None,
    )
    assert make_conv_layer("psconv", dilation_pattern=None)(8, 8).dilation_pattern == (1, 2, 1, 4)


def test_pyconv_levels_come_from_the_bound_pyramid() -> None:
    """The block's kernel_size / groups arguments do not apply to a pyramid; bias is refused."""
    layer = make_conv_layer("pyconv", kernel_sizes=[3, 5], groups=[1, 4])
    conv = layer(32, 64, 3, 2, groups=8)
    assert isinstance(conv, PyConv2d) and conv.kernel_sizes == (3, 5) and conv.groups == (1, 4)
    assert conv(torch.randn(1, 32, 8, 8)).shape == (1, 64, 4, 4)
    with pytest.raises(ValueError, match="bias=True is not supported by pyconv"):
        layer(32, 64, bias=True)


def test_unknown_name_and_option_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown conv type 'deform'.*\('standard', 'psconv', 'pyconv'\)"):
        make_conv_layer("deform")
    with pytest.raises(ValueError, match=r"unknown conv option\(s\) \['dilation'\]"):
        make_conv_layer("psconv", dilation=2)
    with pytest.raises(ValueError, match="unknown conv type"):
        stage_conv_layers("Standard")


def test_pyconv_stage_defaults_follow_pyconvresnet() -> None:
    layers = stage_conv_layers("pyconv")
    convs = [layer(64, 64) for layer in layers]
    assert [c.kernel_sizes for c in convs] == [(3, 5, 7, 9), (3, 5, 7), (3, 5), (3,)]
    assert [c.groups for c in convs] == [(1, 4, 8, 16), (1, 4, 8), (1, 4), (1,)]
    assert [
        c.kernel_sizes
        for c in (
            layer(16, 16)
            for layer in stage_conv_layers("pyconv", 3, groups=[[1, 1, 1, 1], [1, 1, 1], [1, 1]])
        )
    ] == [
        (3, 5, 7, 9),
        (3, 5, 7),
        (3, 5),
    ]


def test_pyconv_per_stage_lists() -> None:
    """PyConvHGResNet-style per-stage groups; a flat list means the same pyramid in every stage."""
    groups = [[32, 32, 32, 32], [32, 64, 64], [32, 64], [32]]
    convs = [layer(256, 256) for layer in stage_conv_layers("pyconv", groups=groups)]
    assert [c.groups for c in convs] == [tuple(g) for g in groups]
    flat = stage_conv_layers("pyconv", 2, kernel_sizes=[3, 5], groups=[1, 2])
    assert [layer(8, 8).kernel_sizes for layer in flat] == [(3, 5), (3, 5)]
    with pytest.raises(ValueError, match=r"stage 1: kernel_sizes \[3, 5\] and groups \[1, 4, 8\] differ"):
        stage_conv_layers("pyconv", kernel_sizes=[[3, 5, 7, 9], [3, 5], [3, 5], [3]])
    with pytest.raises(ValueError, match=r"one list per stage \(4 lists\)"):
        stage_conv_layers("pyconv", kernel_sizes=[[3], [3]])
    with pytest.raises(ValueError, match="defaults for at most 4 stages"):
        stage_conv_layers("pyconv", 5)


@pytest.mark.parametrize("name", CONV_TYPES)
def test_every_stage_layer_from_a_whole_config_is_picklable(name) -> None:
    """A whole ConvConfig can be splatted (other types' fields ignored); callables pickle (DDP, Hydra)."""
    options = {k: v for k, v in asdict(ConvConfig(name=name)).items() if k != "name"}
    layers = stage_conv_layers(name, 4, **options)
    assert len(layers) == 4
    for layer in layers:
        clone = pickle.loads(pickle.dumps(layer))
        assert type(clone(64, 64)) is type(layer(64, 64))
    expected = {"standard": nn.Conv2d, "psconv": PSConv2d, "pyconv": PyConv2d}[name]
    assert type(layers[0](64, 64)) is expected
