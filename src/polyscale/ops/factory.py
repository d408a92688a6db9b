"""From a conv type name plus options to the `conv_layer` callable that model blocks take.

Blocks build their spatial convolution as `conv_layer(in_channels, out_channels, kernel_size=3,
stride=1, padding=None, groups=1, bias=False)` (nn.Conv2d's convention), so one block serves every
operator. The callables are `functools.partial`s of module-level functions and classes: picklable (DDP spawn)
and printable. Plain keyword arguments in, ValueError naming the bad one out: the caller decides how
an option was spelled by its user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import nn

from polyscale.ops.dynamic_psconv import DynamicPSConv2d
from polyscale.ops.psconv import PSConv2d
from polyscale.ops.pyconv import PYCONV_GROUPS, PYCONV_KERNELS, PyConv2d

CONV_TYPES = ("standard", "psconv", "pyconv", "dynamic_psconv")
# Options of each type. Any of them may be passed to any type, so that one set of options can serve
# whichever type is named; those of other types are ignored, as are None values ("use the default").
OPTIONS = {
    "standard": (),
    "psconv": ("dilation_pattern", "axes", "impl"),
    "pyconv": ("kernel_sizes", "pyramid_groups"),
    "dynamic_psconv": ("rates", "init"),
}
# Options that belong to a conv type's training, not to its layers (dynamic_psconv's regulariser on the
# share of large-rate kernels, read by the classification task): accepted alongside and dropped here.
TRAINING_OPTIONS = ("large_fraction_target", "large_fraction_weight")

ConvLayer = Callable[..., nn.Module]


def standard_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    bias: bool = False,
) -> nn.Conv2d:
    """nn.Conv2d with "same" padding (k // 2) unless given."""
    padding = kernel_size // 2 if padding is None else padding
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)


def pyconv(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    bias: bool = False,
    *,
    kernel_sizes: Sequence[int] = PYCONV_KERNELS[0],
    pyramid_groups: Sequence[int] = PYCONV_GROUPS[0],
) -> PyConv2d:
    """PyConv2d; the block's kernel_size / padding / groups are ignored (the pyramid defines them)."""
    if bias:
        raise ValueError("bias=True is not supported by pyconv (PyConv levels have no bias); use bias=False")
    return PyConv2d(in_channels, out_channels, kernel_sizes, pyramid_groups, stride)


def _options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate the name and keep the non-None options that belong to it."""
    if name not in CONV_TYPES:
        raise ValueError(f"unknown conv type {name!r}; choose one of {CONV_TYPES}")
    known = {key for keys in OPTIONS.values() for key in keys} | set(TRAINING_OPTIONS)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown conv option(s) {unknown} for {name!r}; known options: {sorted(known)}")
    return {k: v for k, v in kwargs.items() if k in OPTIONS[name] and v is not None}


def make_conv_layer(name: str, **options: Any) -> ConvLayer:
    """The conv_layer callable for one conv type: "standard", "psconv", "pyconv" or "dynamic_psconv".

    psconv takes dilation_pattern, axes and impl; pyconv takes kernel_sizes and pyramid_groups (one
    list each: the pyramid of every layer built with this callable); dynamic_psconv takes rates and init.
    """
    options = _options(name, options)
    if name == "standard":
        return standard_conv
    if name == "psconv":
        if "dilation_pattern" in options:
            options["dilation_pattern"] = tuple(options["dilation_pattern"])
        return partial(PSConv2d, **options)  # nn.Conv2d's signature
    if name == "dynamic_psconv":
        if isinstance(options.get("rates"), list):
            options["rates"] = tuple(options["rates"])
        return partial(DynamicPSConv2d, **options)
    return partial(pyconv, **{k: tuple(v) for k, v in options.items()})


def _per_stage(name: str, value: Any, default: tuple[tuple[int, ...], ...], num_stages: int) -> list:
    """One level list per stage from None (default), one flat list (every stage) or a list of lists."""
    if value is None:
        if num_stages > len(default):
            raise ValueError(
                f"pyconv has defaults for at most {len(default)} stages, got num_stages={num_stages}; "
                f"pass {name} as one list per stage"
            )
        return list(default[:num_stages])
    if isinstance(value, Sequence) and value and all(isinstance(v, int) for v in value):
        return [tuple(value)] * num_stages
    if not isinstance(value, Sequence) or len(value) != num_stages:
        raise ValueError(
            f"{name} must be None, one list of ints, or one list per stage ({num_stages} lists), "
            f"got {value!r}"
        )
    return [tuple(v) for v in value]


def stage_conv_layers(name: str, num_stages: int = 4, **options: Any) -> list[ConvLayer]:
    """One conv_layer per network stage (models call this).

    For pyconv, kernel_sizes / pyramid_groups may be one list per stage or one list for every stage;
    None gives PyConvResNet's per-stage pyramids (ops.pyconv.PYCONV_KERNELS / PYCONV_GROUPS; with
    fewer stages, the first ones). For the other types every stage gets the same callable.
    """
    options = _options(name, options)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if name != "pyconv":
        return [make_conv_layer(name, **options)] * num_stages
    kernels = _per_stage("kernel_sizes", options.get("kernel_sizes"), PYCONV_KERNELS, num_stages)
    groups = _per_stage("pyramid_groups", options.get("pyramid_groups"), PYCONV_GROUPS, num_stages)
    for stage, (k, g) in enumerate(zip(kernels, groups)):
        if len(k) != len(g):
            raise ValueError(
                f"stage {stage}: kernel_sizes {list(k)} and pyramid_groups {list(g)} differ in length; "
                "give one group count per pyramid level"
            )
    return [make_conv_layer("pyconv", kernel_sizes=k, pyramid_groups=g) for k, g in zip(kernels, groups)]
