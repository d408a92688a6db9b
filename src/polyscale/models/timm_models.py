"""timm entry points for the names timm does not define itself (PS, PyConv, CIFAR nets).

After `import polyscale`, `timm.create_model("ps_resnet50", num_classes=100)` builds our network, and
`timm.create_model("ps_resnet50", features_only=True, out_indices=(1, 2, 3, 4))` its backbone.
timm's own names (resnet50, seresnet50, resnext50_32x4d, ...) are left untouched: for those, use
`polyscale.create_model`. timm registers an entry point under the function's `__name__` and lists it
under this module, so the functions are created here and set as module attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.models import is_model, register_model
from timm.models._builder import pretrained_cfg_for_features
from torch import nn

from polyscale.errors import ConfigError
from polyscale.models.registry import create_model, get_model_spec, list_models

__all__: list[str] = ["register_timm_models"]  # timm appends the registered names

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear"}
# timm reads pretrained configs (input size, crop, normalisation) from `default_cfgs` of this module.
default_cfgs: dict[str, dict[str, Any]] = {}
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        cfg = kwargs.pop("pretrained_cfg", None)
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        if pretrained:
            raise ConfigError(
                f"No hosted weights for {name}; instead of pretrained=True pass checkpoint_path=FILE "
                "(ours or the authors' released file) to polyscale.create_model."
            )
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        # features_only / out_indices / feature_cls (timm hands them to every entry point) go to create_model
        model = create_model(name, **kwargs)
        model_cfg = dict(getattr(cfg, "__dict__", None) or default_cfgs[name])
        if kwargs.get("features_only"):
            model_cfg = pretrained_cfg_for_features(model_cfg)  # what timm's own backbones carry
        model.pretrained_cfg = model.default_cfg = model_cfg
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{get_model_spec(name).description} (polyscale)."
    return entrypoint


def register_timm_models() -> list[str]:
    """Register every polyscale name timm lacks; returns the names registered by this call."""
    added = []
    for name in list_models():
        if name in globals() or is_model(name):
            continue  # ours already, or timm's own
        size = get_model_spec(name).input_size
        default_cfgs[name] = dict(
            url="",
            num_classes=1000,  # timm's convention; polyscale.create_model's default too
            input_size=(3, size, size),
            crop_pct=0.875 if size > 32 else 1.0,
            **_IMAGENET,
        )
        fn = _entrypoint(name)
        globals()[name] = fn
        register_model(fn)
        added.append(name)
    return added
