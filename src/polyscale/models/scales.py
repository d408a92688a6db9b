"""Where a network puts its kernel weight: the share of each scale, per multi-scale layer and per stage.

For every PSConv layer, the share of the kernel weight (L1: sum |w|, L2: sum w^2) held by the kernels of
each dilation rate; for dynamic PSConv layers also the learned fraction of large-rate kernels; for PyConv
layers the share of each pyramid level (kernel size). `count` is the share of the weights themselves
(PSConv: of the kernels), the value L1 and L2 would take if every weight had the same magnitude: the
fixed pattern ({1,2,1,4}: 1/4 at rate 2) that training moves away from.

Layers are recognised by their interfaces (PSConv2d's `dilation_matrix()` / `dense_weight()`, PyConv2d's
`levels` / `kernel_sizes`, DynamicPSConv2d's `large_rate_mask()`), so look-alikes are read too.

    layers = scale_shares(model)              # one LayerScales per multi-scale layer, module order
    stages = aggregate(layers)                # per stage: {"stage", "scale", "rates" | "levels", "shares"}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "METRICS",
    "LayerScales",
    "aggregate",
    "analyze_layer",
    "layer_kind",
    "scale_label",
    "scale_shares",
    "scales_of",
    "stage_of",
]

METRICS = ("l1", "l2", "count")
# layer1..layer4 (ResNet family, CIFAR nets, detection backbones under backbone.body.), stageN, stages.N
_STAGE = re.compile(r"(?:^|\.)(layer\d+|stage\d+|stages\.\d+|layers\.\d+)(?:\.|$)")


@dataclass
class LayerScales:
    """One multi-scale layer: its scales (dilation rates or kernel sizes) and the weight totals at each."""

    name: str
    stage: str
    type: str  # psconv | dynamic_psconv | pyconv
    scale: str  # dilation | kernel_size
    values: list[int]  # the rates (dilation) or the levels' kernel sizes (kernel_size), stacking order
    sums: dict[str, list[float]]  # l1 / l2 / count totals, one per value
    large_fraction: float | None = None  # dynamic PSConv: the learned share of large-rate kernels
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [scale_label(self.scale, v) for v in self.values]

    def shares(self, metric: str) -> list[float]:
        total = sum(self.sums[metric])
        return [s / total if total > 0 else 0.0 for s in self.sums[metric]]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "stage": self.stage, "type": self.type, "scale": self.scale}
        out["rates" if self.scale == "dilation" else "levels"] = self.values
        out["shares"] = {m: [round(s, 6) for s in self.shares(m)] for m in METRICS}
        out["params"] = int(sum(self.sums["count"]))
        if self.large_fraction is not None:
            out["large_fraction"] = round(self.large_fraction, 6)
        return out | self.details


def scale_label(scale: str, value: int) -> str:
    return f"d={value}" if scale == "dilation" else f"k={value}"


def scales_of(entry: dict[str, Any]) -> list[int]:
    """The rates or levels of a layer / stage entry (`LayerScales.to_json()`, `aggregate()`)."""
    return entry["rates"] if entry["scale"] == "dilation" else entry["levels"]


def stage_of(name: str) -> str:
    """The stage a module belongs to, from its name: layer1 of `backbone.body.layer1.0.conv2`."""
    match = _STAGE.search(name)
    return match.group(1) if match else name.split(".")[0]


def _kernel_sums(rates: Tensor, weight: Tensor, values: Sequence[int]) -> dict[str, list[float]]:
    """Totals of the kernels (c, k) of each rate; rates (C_out, C_in/g), weight (C_out, C_in/g, kh, kw)."""
    if tuple(rates.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"dilation map {tuple(rates.shape)} does not match the weight {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float64)
    l1, l2 = w.abs().sum((2, 3)), w.pow(2).sum((2, 3))  # (C_out, C_in/g) per kernel
    rates, size = rates.to("cpu"), weight.shape[2] * weight.shape[3]
    return {
        "l1": [float(l1[rates == v].sum()) for v in values],
        "l2": [float(l2[rates == v].sum()) for v in values],
        "count": [float((rates == v).sum()) * size for v in values],
    }


def _weight(module: nn.Module) -> Tensor:
    return module.dense_weight() if hasattr(module, "dense_weight") else module.weight


def layer_kind(module: nn.Module) -> str | None:
    """psconv | dynamic_psconv | pyconv for the layers this module reads (by their interfaces), else None."""
    if all(hasattr(module, a) for a in ("large_fraction", "large_rate_mask", "rates")):
        return "dynamic_psconv"  # polyscale.ops.dynamic_psconv.DynamicPSConv2d and look-alikes
    if hasattr(module, "dilation_matrix") and hasattr(module, "dense_weight"):
        return "psconv"
    if isinstance(getattr(module, "levels", None), nn.ModuleList) and hasattr(module, "kernel_sizes"):
        return "pyconv"
    return None


@torch.no_grad()
def analyze_layer(name: str, module: nn.Module, kind: str) -> LayerScales:
    """The weight totals of one layer at each of its scales (`kind` from `layer_kind`)."""
    stage, details = stage_of(name), {"class": type(module).__name__}
    if kind == "pyconv":
        sums: dict[str, list[float]] = {m: [] for m in METRICS}
        for level in module.levels:
            w = level.weight.detach().to("cpu", torch.float64)
            sums["l1"].append(float(w.abs().sum()))
            sums["l2"].append(float(w.pow(2).sum()))
            sums["count"].append(float(w.numel()))
        details |= {"pyramid_groups": list(module.pyramid_groups), "out_splits": list(module.out_splits)}
        return LayerScales(name, stage, kind, "kernel_size", list(module.kernel_sizes), sums, None, details)
    if kind == "dynamic_psconv":
        small, large = (int(r) for r in module.rates)
        rates = torch.where(module.large_rate_mask().bool(), large, small)  # (C_out, C_in/g)
        sums = _kernel_sums(rates, _weight(module), [small, large])
        fraction = float(module.large_fraction())
        return LayerScales(name, stage, kind, "dilation", [small, large], sums, fraction, details)
    rates = module.dilation_matrix()  # (C_out, C_in/g)
    pattern = tuple(getattr(module, "dilation_pattern", ()))
    values = sorted({int(r) for r in (*rates.unique().tolist(), *pattern)})
    if pattern:
        details |= {"pattern": list(pattern), "axes": getattr(module, "axes", None)}
    sums = _kernel_sums(rates, _weight(module), values)
    return LayerScales(name, stage, kind, "dilation", values, sums, None, details)


def scale_shares(model: nn.Module) -> list[LayerScales]:
    """Every PSConv / dynamic PSConv / PyConv layer of `model`, in module order (a layer inside one that
    is already read, such as a PyConv level, is not read again)."""
    layers: list[LayerScales] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in taken):
            continue
        kind = layer_kind(module)
        if kind is not None:
            layers.append(analyze_layer(name, module, kind))
            taken.append(f"{name}.")
    return layers


def aggregate(layers: Sequence[LayerScales], by_stage: bool = True) -> list[dict[str, Any]]:
    """Per stage (or over the whole network): totals of the layers of each scale kind, as shares."""
    groups: dict[tuple[str, str], list[LayerScales]] = {}
    for layer in layers:
        groups.setdefault((layer.stage if by_stage else "all", layer.scale), []).append(layer)
    out = []
    for (stage, scale), members in groups.items():
        values = sorted({v for layer in members for v in layer.values})
        sums = {m: [0.0] * len(values) for m in METRICS}
        for layer, m in ((layer, m) for layer in members for m in METRICS):
            for v, total in zip(layer.values, layer.sums[m]):
                sums[m][values.index(v)] += total
        entry: dict[str, Any] = {"stage": stage, "scale": scale, "layers": len(members)}
        entry["types"] = sorted({layer.type for layer in members})
        entry["rates" if scale == "dilation" else "levels"] = values
        entry["shares"] = {
            m: [round(s / sum(sums[m]), 6) if sum(sums[m]) > 0 else 0.0 for s in sums[m]] for m in METRICS
        }
        dynamic = [layer for layer in members if layer.large_fraction is not None]
        if dynamic:  # the fraction of all the stage's dynamic kernels (weighted by the layers' sizes)
            kernels = [sum(layer.sums["count"]) for layer in dynamic]
            entry["large_fraction"] = round(
                sum(layer.large_fraction * k for layer, k in zip(dynamic, kernels)) / sum(kernels), 6
            )
        out.append(entry)
    return out
