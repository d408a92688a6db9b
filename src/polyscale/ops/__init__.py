"""Convolution operators: PSConv (poly-scale dilations), PyConv (pyramid kernels) and their factory.

Every operator is a drop-in for nn.Conv2d in a block's spatial conv; models receive them as a
`conv_layer` callable from `make_conv_layer` / `stage_conv_layers`. Plain arguments only: nothing
here reads a config object.
"""

from polyscale.ops.factory import CONV_TYPES, make_conv_layer, stage_conv_layers, standard_conv
from polyscale.ops.psconv import PSConv2d
from polyscale.ops.pyconv import PyConv2d

__all__ = ["CONV_TYPES", "PSConv2d", "PyConv2d", "make_conv_layer", "stage_conv_layers", "standard_conv"]
