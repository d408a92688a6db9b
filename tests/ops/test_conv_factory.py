"""The conv factory: names to conv_layer callables with nn.Conv2d's calling convention."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import polyscale
from polyscale.ops import CONV_TYPES, PSConv2d, PyConv2d, make_conv_layer, stage_conv_layers
from polyscale.ops.dynamic_psconv import DynamicPSConv2d
from polyscale.ops.factory import OPTIONS, TRAINING_OPTIONS
from polyscale.ops.pyconv import PYCONV_GROUPS, PYCONV_KERNELS


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
    layer = make_conv_layer("pyconv", kernel_sizes=[3, 5], pyramid_groups=[1, 4])
    conv = layer(32, 64, 3, 2, groups=8)
    assert isinstance(conv, PyConv2d) and conv.kernel_sizes == (3, 5) and conv.pyramid_groups == (1, 4)
    assert conv(torch.randn(1, 32, 8, 8)).shape == (1, 64, 4, 4)
    with pytest.raises(ValueError, match="bias=True is not supported by pyconv"):
        layer(32, 64, bias=True)


def test_dynamic_psconv_binds_rates_and_init() -> None:
    layer = make_conv_layer("dynamic_psconv", rates=[1, 3], init="large", dilation_pattern=[1, 2])
    conv = layer(16, 32, 3, 2, groups=2)
    assert isinstance(conv, DynamicPSConv2d)
    assert (conv.rates, conv.init, conv.groups, conv.stride) == ((1, 3), "large", 2, (2, 2))
    assert bool(conv.large_rate_mask().all())
    assert conv(torch.randn(1, 16, 9, 9)).shape == (1, 32, 5, 5)
    default = make_conv_layer("dynamic_psconv", rates=None, init=None)(8, 8)
    assert (default.rates, default.init) == ((1, 2), "static")
    with pytest.raises(ValueError, match=r"`rates` must be two positive integers"):
        make_conv_layer("dynamic_psconv", rates=[2])(8, 8)


def test_training_options_are_accepted_and_dropped_by_every_type() -> None:
    """dynamic_psconv's regulariser settings sit in model.conv but are the task's, not a layer's."""
    values = {"large_fraction_target": 0.3, "large_fraction_weight": 0.1}
    assert set(values) == set(TRAINING_OPTIONS)
    for name in CONV_TYPES:
        assert type(make_conv_layer(name, **values)(64, 64)) is type(make_conv_layer(name)(64, 64))


def test_unknown_name_and_option_raise() -> None:
    with pytest.raises(
        ValueError, match=r"unknown conv type 'deform'.*\('standard', 'psconv', 'pyconv', 'dynamic_psconv'\)"
    ):
        make_conv_layer("deform")
    with pytest.raises(ValueError, match=r"unknown conv option\(s\) \['dilation'\]"):
        make_conv_layer("psconv", dilation=2)
    with pytest.raises(ValueError, match="unknown conv type"):
        stage_conv_layers("Standard")
    # the pyramid's per-level groups are `pyramid_groups`, never a conv's `groups`
    with pytest.raises(ValueError, match=r"unknown conv option\(s\) \['groups'\].*'pyramid_groups'"):
        stage_conv_layers("pyconv", groups=[[1], [1], [1], [1]])
    with pytest.raises(ValueError, match="num_stages must be a positive integer, got 0"):
        stage_conv_layers("psconv", 0)


def test_messages_do_not_speak_config() -> None:
    """The factory takes plain arguments: plain ValueErrors, no config keys or Hydra overrides."""
    with pytest.raises(ValueError) as info:
        make_conv_layer("deform")
    assert type(info.value) is ValueError and "model" not in str(info.value)


def test_pyconv_stage_defaults_follow_pyconvresnet() -> None:
    layers = stage_conv_layers("pyconv")
    convs = [layer(64, 64) for layer in layers]
    assert [c.kernel_sizes for c in convs] == [(3, 5, 7, 9), (3, 5, 7), (3, 5), (3,)]
    assert [c.pyramid_groups for c in convs] == [(1, 4, 8, 16), (1, 4, 8), (1, 4), (1,)]
    assert [c.kernel_sizes for c in convs] == list(PYCONV_KERNELS)
    assert [c.pyramid_groups for c in convs] == list(PYCONV_GROUPS)
    three = stage_conv_layers("pyconv", 3, pyramid_groups=[[1, 1, 1, 1], [1, 1, 1], [1, 1]])
    assert [layer(16, 16).kernel_sizes for layer in three] == [(3, 5, 7, 9), (3, 5, 7), (3, 5)]


def test_pyconv_per_stage_lists() -> None:
    """PyConvHGResNet-style per-stage groups; a flat list means the same pyramid in every stage."""
    groups = [[32, 32, 32, 32], [32, 64, 64], [32, 64], [32]]
    convs = [layer(256, 256) for layer in stage_conv_layers("pyconv", pyramid_groups=groups)]
    assert [c.pyramid_groups for c in convs] == [tuple(g) for g in groups]
    flat = stage_conv_layers("pyconv", 2, kernel_sizes=[3, 5], pyramid_groups=[1, 2])
    assert [layer(8, 8).kernel_sizes for layer in flat] == [(3, 5), (3, 5)]
    with pytest.raises(
        ValueError, match=r"stage 1: kernel_sizes \[3, 5\] and pyramid_groups \[1, 4, 8\] differ"
    ):
        stage_conv_layers("pyconv", kernel_sizes=[[3, 5, 7, 9], [3, 5], [3, 5], [3]])
    with pytest.raises(ValueError, match=r"one list per stage \(4 lists\)"):
        stage_conv_layers("pyconv", kernel_sizes=[[3], [3]])
    with pytest.raises(ValueError, match="defaults for at most 4 stages"):
        stage_conv_layers("pyconv", 5)


@pytest.mark.parametrize("name", CONV_TYPES)
def test_every_stage_layer_with_all_options_is_picklable(name) -> None:
    """Every type's options may be passed to any type (the others' are ignored, as are None values), so
    one set of options serves whichever type is named; the callables pickle (DDP spawn)."""
    values = {"dilation_pattern": [1, 2, 1, 4], "axes": "both", "impl": None}
    values |= {"kernel_sizes": None, "pyramid_groups": None, "rates": [1, 2], "init": "static"}
    assert set(values) == {key for keys in OPTIONS.values() for key in keys}
    values |= {"large_fraction_target": 0.5, "large_fraction_weight": 0.0}
    layers = stage_conv_layers(name, 4, **values)
    assert len(layers) == 4
    for layer in layers:
        clone = pickle.loads(pickle.dumps(layer))
        assert type(clone(64, 64)) is type(layer(64, 64))
    expected = {"standard": nn.Conv2d, "psconv": PSConv2d, "pyconv": PyConv2d}.get(name, DynamicPSConv2d)
    assert type(layers[0](64, 64)) is expected


def test_ops_work_without_hydra_and_omegaconf() -> None:
    """polyscale.ops reads no config objects: it imports and runs with hydra and omegaconf unimportable."""
    code = (
        "import sys\n"
        "sys.modules['hydra'] = sys.modules['omegaconf'] = None  # import hydra -> ImportError\n"
        "import torch\n"
        "from polyscale.ops import PSConv2d, PyConv2d, stage_conv_layers\n"
        "x = torch.randn(1, 16, 8, 8)\n"
        "assert PSConv2d(16, 16)(x).shape == PyConv2d(16, 16, (3, 5), (1, 2))(x).shape == (1, 16, 8, 8)\n"
        "y = torch.randn(1, 64, 8, 8)\n"
        "assert [layer(64, 64)(y).shape[1] for layer in stage_conv_layers('pyconv')] == [64] * 4\n"
        "assert not any(m.split('.')[0] in ('hydra', 'omegaconf') for m, v in sys.modules.items() if v)\n"
    )
    src = str(Path(polyscale.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
