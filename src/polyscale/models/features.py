"""Detection backbones: feature maps in timm's `features_only` convention, backbone weights, freezing.

Every registered network keeps timm's `feature_info` (one dict per feature map: `num_chs`, `reduction`,
`module`), so timm's wrappers turn it into a backbone that returns a list of maps:

    m = polyscale.create_model("ps_resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    m.feature_info.channels(), m.feature_info.reduction()   # [256, 512, 1024, 2048], [4, 8, 16, 32]

Index 0 is the stem after its ReLU (before the ImageNet max-pool), index k the output of `layer{k}`, as in
timm's ResNet. `timm.create_model` gives the same for our names, which is what mmdetection's and other
timm wrappers call. `load_backbone_weights` fills a backbone from a classification checkpoint (ours or
the authors'), dropping what lies outside it; `freeze_backbone` freezes leading stages and BN the way
torchvision's detection models do for fine-tuning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models._features import FeatureDictNet, FeatureHookNet, FeatureListNet
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from polyscale.errors import CheckpointError, ConfigError
from polyscale.models.checkpoint_io import LoadReport, load_model_weights, read_state_dict

__all__ = [
    "FEATURE_CLASSES",
    "feature_extractor",
    "freeze_backbone",
    "freeze_batch_norm",
    "load_backbone_weights",
    "resolve_out_indices",
]

# timm's names for its wrappers (build_model_with_cfg's `feature_cls`). "fx" and "getter" are left out:
# they need a traceable graph / `forward_intermediates`, which the PSConv / PyConv trunks do not offer.
FEATURE_CLASSES: dict[str, type[nn.Module]] = {
    "list": FeatureListNet,
    "dict": FeatureDictNet,
    "hook": FeatureHookNet,
}
_STAGE = re.compile(r"layer(\d+)$")


def _describe_indices(info: Sequence[Mapping[str, Any]]) -> str:
    """'0 (stem relu, reduction 2), 1 (layer1, reduction 4), ...' for error messages."""
    return ", ".join(
        f"{i} ({'' if _STAGE.match(f['module']) else 'stem '}{f['module']}, reduction {f['reduction']})"
        for i, f in enumerate(info)
    )


def resolve_out_indices(
    info: Sequence[Mapping[str, Any]], out_indices: int | Sequence[int] | None
) -> tuple[int, ...]:
    """Feature indices as increasing non-negative ints, from timm's forms of `out_indices`.

    None means all maps; an int n the last n (timm); negative indices count from the end. The wrappers
    return maps in network order while `feature_info` follows `out_indices`, so unordered or repeated
    indices would pair maps with the wrong channels: they are rejected rather than reordered.
    """
    n = len(info)
    valid = f"valid indices for this network: {_describe_indices(info)}; negative ones count from the end"
    if out_indices is None:
        return tuple(range(n))
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        if not 1 <= out_indices <= n:
            raise ConfigError(
                f"`out_indices`={out_indices} asks for the last {out_indices} of {n} maps; {valid}."
            )
        return tuple(range(n - out_indices, n))
    indices = list(out_indices)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConfigError(f"`out_indices`={out_indices!r} must be a non-empty list of ints; {valid}.")
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ConfigError(f"`out_indices`={tuple(indices)} has invalid {bad}; {valid}.")
    resolved = tuple(i % n for i in indices)
    if any(a >= b for a, b in zip(resolved, resolved[1:])):
        raise ConfigError(
            f"`out_indices`={tuple(indices)} must be increasing without repeats (the maps come out in "
            f"network order); {valid}."
        )
    return resolved


def feature_extractor(
    model: nn.Module,
    out_indices: int | Sequence[int] | None = None,
    feature_cls: str | type[nn.Module] = "list",
) -> nn.Module:
    """Wrap a network with `feature_info` into one of timm's feature extractors.

    `feature_cls`: "list" (default; forward returns a list of maps), "dict" (an ordered dict keyed by
    index) or "hook" (forward hooks on the unmodified network), or such a class. The wrapper keeps the
    trunk's module names, so its state-dict keys are the classifier's without `fc.*` (and without the
    stages after the last requested map).
    """
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        raise TypeError(
            f"{type(model).__name__} has no feature_info list; build it with polyscale.create_model"
        )
    indices = resolve_out_indices(info, out_indices)
    cls: Any = feature_cls
    if isinstance(feature_cls, str):
        cls = FEATURE_CLASSES.get(feature_cls.lower())
    if not (isinstance(cls, type) and issubclass(cls, FeatureDictNet | FeatureHookNet)):
        raise ConfigError(
            f"`feature_cls`={feature_cls!r} is not supported; use one of {', '.join(FEATURE_CLASSES)} "
            "or a subclass of timm's FeatureDictNet / FeatureHookNet."
        )
    return cls(model, out_indices=indices)


def _trunk(model: nn.Module) -> nn.Module:
    """The module holding the network's children: timm's FeatureHookNet without rewriting keeps the
    whole network under `body`; every other wrapper (and the bare network) holds them itself."""
    if isinstance(model, FeatureHookNet) and "body" in model:
        return model["body"]
    return model


def load_backbone_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    *,
    psconv_dilation: int = 2,
    name: str | None = None,
    fix: str | None = None,
) -> LoadReport:
    """Fill a backbone (a feature extractor, or a network with `num_classes=0`) from a checkpoint.

    `source` is anything `load_model_weights` reads: our checkpoints, bare / wrapped state dicts, the
    PyConv and PSConv authors' files. File tensors of modules the backbone does not hold (the classifier
    `fc`, stages after the last requested map) are dropped and listed in `LoadReport.dropped_keys`; the
    rest loads strictly, so a file of another architecture raises CheckpointError.
    """
    trunk = _trunk(model)
    sd, _, label = read_state_dict(source, name=name)
    own = trunk.state_dict()
    held = {k.split(".", 1)[0] for k in own}

    def outside(key: str) -> bool:
        # FrozenBatchNorm2d keeps no batch counter, so a frozen backbone lacks the file's counters
        untracked = key.endswith(".num_batches_tracked") and key not in own
        return key.split(".", 1)[0] not in held or untracked

    kept = {k: v for k, v in sd.items() if not outside(k)}
    if not kept:
        raise CheckpointError(
            f"{label} holds none of the backbone's modules ({', '.join(sorted(held))}); its keys start with "
            f"{', '.join(list(sd)[:3])}. Point `checkpoint_path` at weights of this network."
        )
    fix = fix or (
        "Fix: build the backbone of the network the checkpoint was made for (`name`, `conv`), or point "
        "`checkpoint_path` at a file of this network."
    )
    report = load_model_weights(
        trunk, kept, strict=True, psconv_dilation=psconv_dilation, name=label, fix=fix
    )
    report.dropped_keys = [k for k in sd if outside(k)]
    return report


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (and SyncBatchNorm) in `module` by torchvision's FrozenBatchNorm2d.

    The frozen layer holds the running statistics and affine values as buffers, so neither trains and
    batch statistics are never used: with detection's small per-GPU batches they would be noise. Returns
    `module`, or its replacement when `module` itself is a BN.
    """
    if isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                "cannot freeze a BatchNorm without running statistics (track_running_stats=False)"
            )
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        stats = module.running_mean
        # assigning to a buffer name replaces the buffer, keeping the BN's device and dtype (meta too)
        frozen.running_mean = stats.detach().clone()
        frozen.running_var = module.running_var.detach().clone()
        frozen.weight = module.weight.detach().clone() if module.affine else torch.ones_like(stats)
        frozen.bias = module.bias.detach().clone() if module.affine else torch.zeros_like(stats)
        return frozen
    for child_name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, child_name, new)
    return module


def freeze_backbone(model: nn.Module, trainable_stages: int, *, frozen_bn: bool = True) -> nn.Module:
    """Freeze all but the last `trainable_stages` stages of a backbone, in place; returns `model`.

    Stages are the stem (everything before `layer1`) and `layer1`..`layerN` the module holds, counted from
    the last: torchvision's `trainable_backbone_layers`, so for a 4-stage net 5 trains everything, 3
    freezes the stem and layer1, 0 freezes all. Frozen parameters get requires_grad=False; anything after
    the last stage (a classifier) is left alone. `frozen_bn=True` also turns every BatchNorm2d of the
    backbone, trainable stages included, into FrozenBatchNorm2d, as torchvision's detectors do over
    pretrained backbones; with False the BN statistics of frozen stages keep updating in train mode
    (torchvision's behaviour too), so call `.eval()` on them if that is not wanted.
    """
    trunk = _trunk(model)
    stages: list[list[str]] = [[]]  # child names per stage; stage 0 is the stem
    for child_name, _ in trunk.named_children():
        if _STAGE.match(child_name):
            stages.append([child_name])
        elif len(stages) == 1:
            stages[0].append(child_name)
        # other children after layer1 (pool, dropout, fc) are no part of the backbone
    if len(stages) == 1:
        raise TypeError(f"{type(trunk).__name__} has no layer1..layerN stages to freeze")
    if isinstance(trainable_stages, bool) or not 0 <= trainable_stages <= len(stages):
        raise ConfigError(
            f"`trainable_stages`={trainable_stages} is out of range for this backbone: 0..{len(stages)} "
            f"({len(stages)} = train the stem and layer1..layer{len(stages) - 1}, 0 = freeze all)."
        )
    for stage in stages[: len(stages) - trainable_stages]:
        for child_name in stage:
            getattr(trunk, child_name).requires_grad_(False)
    if frozen_bn:
        for child_name in (c for stage in stages for c in stage):
            child = getattr(trunk, child_name)
            new = freeze_batch_norm(child)
            if new is not child:  # a BN held by the trunk itself (the stem's bn1)
                setattr(trunk, child_name, new)
    return model
