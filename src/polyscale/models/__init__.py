"""Model zoo: one ResNet family with injectable spatial convs, its registry and checkpoint loaders.

`create_model(name, ...)` builds a registered network; `list_models()` lists the names. Importing this
package also registers the names timm lacks (PS / PyConv / CIFAR nets) in timm's registry.
"""

from polyscale.models.checkpoint_io import LoadReport, load_model_weights, read_state_dict
from polyscale.models.registry import build_model_from_config, create_model, get_model_spec, list_models
from polyscale.models.resnet import BasicBlock, Bottleneck, ResNet
from polyscale.models.timm_models import register_timm_models

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "LoadReport",
    "ResNet",
    "build_model_from_config",
    "create_model",
    "get_model_spec",
    "list_models",
    "load_model_weights",
    "read_state_dict",
]

register_timm_models()
