"""Model zoo: one ResNet family with injectable spatial convs, its registry and checkpoint loaders.

`create_model(name, ...)` builds a registered network (`features_only=True`: its detection backbone);
`list_models()` lists the names. Importing this package also registers the names timm lacks (PS / PyConv
/ CIFAR nets) in timm's registry.
"""

from polyscale.models.checkpoint_io import LoadReport, load_model_weights, read_state_dict
from polyscale.models.features import (
    feature_extractor,
    freeze_backbone,
    freeze_batch_norm,
    load_backbone_weights,
)
from polyscale.models.registry import create_model, get_model_spec, list_models
from polyscale.models.resnet import BasicBlock, Bottleneck, ResNet
from polyscale.models.timm_models import register_timm_models

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "LoadReport",
    "ResNet",
    "create_model",
    "feature_extractor",
    "freeze_backbone",
    "freeze_batch_norm",
    "get_model_spec",
    "list_models",
    "load_backbone_weights",
    "load_model_weights",
    "read_state_dict",
]

register_timm_models()
