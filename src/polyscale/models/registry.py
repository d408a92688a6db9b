"""Registry of model names: `create_model`, `list_models`, `get_model_spec`.

Each name is a trunk plus its natural spatial conv (`ps_` names: PSConv, `pyconv` names: PyConv, others:
standard). The `conv` argument always wins over that default, so `create_model("resnet50",
conv="psconv")` and `create_model("ps_resnet50")` are the same network, and `ps_resnet50` with
`conv={"name": "standard"}` is `resnet50`. Model code never sees a config: the engine turns the config
into these plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from polyscale.errors import ConfigError
from polyscale.models.checkpoint_io import load_model_weights
from polyscale.models.cifar import cifar_resnet, resnext29
from polyscale.models.features import feature_extractor, load_backbone_weights
from polyscale.models.pyconv_resnet import pyconv_resnet
from polyscale.models.resnet import imagenet_resnet
from polyscale.ops import stage_conv_layers
from polyscale.ops.pyconv import PYCONV_HG_GROUPS

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models", "resolve_conv"]

log = logging.getLogger(__name__)

# Extra keyword arguments create_model passes to every builder (timm-style); the rest define the trunk.
_BUILDER_OPTIONS = frozenset({"in_chans", "norm_layer"})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered network: builder(conv_layers=..., **kwargs) -> nn.Module and its natural conv."""

    name: str
    builder: Callable[..., nn.Module]
    conv: str  # standard | psconv | pyconv
    num_stages: int
    dataset: str  # imagenet | cifar: native input resolution 224 / 32 (profiling, timm cfg)
    description: str
    conv_defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # per conv type

    @property
    def input_size(self) -> int:
        return 224 if self.dataset == "imagenet" else 32

    @property
    def paper_classes(self) -> int:
        """Class count of the data set the papers use it on: ImageNet 1000, CIFAR-100 for ResNeXt-29."""
        if self.dataset == "imagenet":
            return 1000
        return 100 if "resnext29" in self.name else 10


_REGISTRY: dict[str, ModelSpec] = {}


def _register_builtin() -> None:
    """The papers' networks (PSConv Table 1 and sec. 4.2, PyConv README) plus small CIFAR ResNets."""
    trunks: dict[str, tuple[Callable[..., nn.Module], int, str, str]] = {}  # builder, stages, dataset, title
    for d in (50, 101, 152):
        trunks[f"resnet{d}"] = (partial(imagenet_resnet, d), 4, "imagenet", f"ResNet-{d}")
    for d in (50, 101):
        resnext = partial(imagenet_resnet, d, cardinality=32, base_width=4)
        trunks[f"resnext{d}_32x4d"] = (resnext, 4, "imagenet", f"ResNeXt-{d} (32x4d)")
        trunks[f"seresnet{d}"] = (partial(imagenet_resnet, d, se=True), 4, "imagenet", f"SE-ResNet-{d}")
    for c in (8, 16):
        trunks[f"resnext29_{c}x64d"] = (partial(resnext29, c), 3, "cifar", f"ResNeXt-29 {c}x64d")
    for d in (20, 56):
        trunks[f"resnet{d}"] = (partial(cifar_resnet, d), 3, "cifar", f"ResNet-{d} (CIFAR)")
    for name, (builder, stages, dataset, title) in trunks.items():
        _REGISTRY[name] = ModelSpec(name, builder, "standard", stages, dataset, title)
        _REGISTRY["ps_" + name] = ModelSpec("ps_" + name, builder, "psconv", stages, dataset, "PS-" + title)
    hg_defaults = {"pyconv": {"pyramid_groups": PYCONV_HG_GROUPS}}
    for d in (50, 101, 152):
        for hg, title in ((False, "PyConvResNet"), (True, "PyConvHGResNet")):
            name = f"pyconv{'hg' if hg else ''}resnet{d}"
            builder = partial(pyconv_resnet, d, hg=hg)
            _REGISTRY[name] = ModelSpec(
                name, builder, "pyconv", 4, "imagenet", f"{title}-{d}", hg_defaults if hg else {}
            )


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern (e.g. "ps_*")."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry of `name`; unknown names raise ConfigError listing close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown model {name!r}.{hint} Set `name` to one of: {', '.join(list_models())} "
            "(polyscale.list_models())."
        )
    return _REGISTRY[name]


def resolve_conv(spec: ModelSpec, conv: str | Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Conv type name and its options, with the model's defaults filling unset (None) ones.

    Options that the chosen type does not read are dropped by `stage_conv_layers`, which also rejects
    unknown types and misspelt options with a ConfigError.
    """
    if conv is None or isinstance(conv, str):
        name, opts = conv or spec.conv, {}
    elif isinstance(conv, Mapping):
        opts = {k: v for k, v in conv.items() if k != "name"}
        name = conv.get("name") or spec.conv
    else:
        raise ConfigError(f"`conv` must be a conv type name or a mapping, got {type(conv).__name__}")
    for key, value in spec.conv_defaults.get(name, {}).items():
        if opts.get(key) is None:
            opts[key] = value
    return name, opts


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    conv: str | Mapping[str, Any] | None = None,
    drop_rate: float = 0.0,
    zero_init_last: bool = False,
    checkpoint_path: str | Path | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    feature_cls: str | type[nn.Module] = "list",
    **kwargs: Any,
) -> nn.Module:
    """Build the registered network `name`, or with `features_only=True` its backbone.

    Args:
        num_classes: classifier outputs (0: no classifier, `forward` returns pooled features).
        conv: None (the name's natural conv), a conv name ("standard" | "psconv" | "pyconv") or a mapping
            like `model.conv` in the config ({"name": "psconv", "dilation_pattern": [1, 2, 1, 4],
            "axes": "both", "kernel_sizes": None, "pyramid_groups": None}); None values mean defaults and
            options the chosen type does not read are ignored.
        drop_rate: dropout before the classifier.
        zero_init_last: zero-init the last BN of every residual branch.
        checkpoint_path: weights to load (ours, a bare state dict, or the PyConv / PSConv authors' files;
            see `polyscale.models.load_model_weights`), strictly except for the classifier: with another
            `num_classes` (fine-tuning) or a backbone file without fc, fc keeps its init (with a warning).
        features_only: return timm's feature extractor over the trunk instead (no pool / classifier;
            `num_classes` and `drop_rate` are then unused): forward gives a list of maps, `.feature_info`
            their channels / reductions / module names. `checkpoint_path` then loads the trunk strictly and
            drops the file's classifier (see `polyscale.models.features`).
        out_indices: which maps (0 = stem, k = layer k; None = all; an int n = the last n).
        feature_cls: timm's wrapper, "list" | "dict" | "hook" or a class.
        kwargs: `in_chans` (input channels, default 3) and `norm_layer` (default nn.BatchNorm2d).

    The LoadReport of `checkpoint_path` is logged and kept as the model's `load_report` attribute.
    """
    spec = get_model_spec(name)
    unknown = sorted(set(kwargs) - _BUILDER_OPTIONS)
    if unknown:
        accepted = ", ".join(sorted(_BUILDER_OPTIONS))
        raise ConfigError(f"create_model({name!r}) got unknown argument(s) {unknown}; accepted: {accepted}.")
    if not features_only and (out_indices is not None or feature_cls != "list"):
        raise ConfigError(
            f"create_model({name!r}): `out_indices` and `feature_cls` choose feature maps; they need "
            "`features_only`=True."
        )
    conv_name, conv_opts = resolve_conv(spec, conv)
    try:
        conv_layers = stage_conv_layers(conv_name, spec.num_stages, **conv_opts)
        model = spec.builder(
            conv_layers=conv_layers,
            num_classes=0 if features_only else num_classes,  # a backbone needs no classifier
            drop_rate=drop_rate,
            zero_init_last=zero_init_last,
            **kwargs,
        )
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(
            f"Cannot build model {name!r} with `conv` {conv_name} {conv_opts}: {err}. Change the conv "
            "options or pick another conv type."
        ) from err
    if features_only:
        model = feature_extractor(model, out_indices=out_indices, feature_cls=feature_cls)
    model.polyscale_name, model.polyscale_conv = name, conv_name  # for checkpoint error messages
    if checkpoint_path is not None:
        fix = (
            "Fix: build the network the checkpoint was made for (`name`, `conv`, `num_classes`), or point "
            "`checkpoint_path` at a file of this network."
        )
        if features_only:
            report = load_backbone_weights(model, checkpoint_path, fix=fix.replace(", `num_classes`", ""))
        else:
            report = load_model_weights(model, checkpoint_path, new_classifier_ok=True, fix=fix)
        log.info("%s: %s", name, report.summary())
        model.load_report = report
    return model


_register_builtin()
