"""Convolution operators: PSConv (poly-scale dilations) and its learned variant, PyConv (pyramid kernels),
SEPC's pyramid convolution across FPN levels with integrated BN, and the conv-type factory.

Every per-map operator is a drop-in for nn.Conv2d in a block's spatial conv; models receive them as a
`conv_layer` callable from `make_conv_layer` / `stage_conv_layers`. PConv and IntegratedBN take and return
a list of FPN levels. Plain arguments only: nothing here reads a config object.
"""

from polyscale.ops.dynamic_psconv import DynamicPSConv2d
from polyscale.ops.factory import CONV_TYPES, make_conv_layer, stage_conv_layers, standard_conv
from polyscale.ops.pconv import DeformableConv2d, IntegratedBN, LevelConv, PConv
from polyscale.ops.psconv import PSConv2d
from polyscale.ops.pyconv import PyConv2d
from polyscale.ops.two_rate_conv import TwoRateConv2d

__all__ = ["CONV_TYPES", "DeformableConv2d", "DynamicPSConv2d", "IntegratedBN", "LevelConv", "PConv"]
__all__ += ["PSConv2d", "PyConv2d", "TwoRateConv2d", "make_conv_layer", "stage_conv_layers", "standard_conv"]
