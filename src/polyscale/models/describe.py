"""Human-readable guesses of what a model / state dict is, for checkpoint error messages.

"built model=ps_resnet50 (conv psconv), num_classes=1000; the checkpoint looks like pyconvresnet50
(the PyConv authors' layout), 1000 classes" tells the user which `model=` to build.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["describe_model", "describe_state_dict"]

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")


def describe_model(model: nn.Module) -> str:
    """`model=NAME (conv TYPE), num_classes=N` for registry-built models, else the class name."""
    name = getattr(model, "polyscale_name", None)
    conv = getattr(model, "polyscale_conv", None)
    text = f"model={name}" + (f" (conv {conv})" if conv else "") if name else type(model).__name__
    classes = getattr(model, "num_classes", None)
    return text + (f", num_classes={classes}" if classes is not None else "")


def _conv_kind(sd: Mapping[str, Tensor], block: str) -> tuple[str, int]:
    """(conv type of `block`'s middle conv, its groups) from the state-dict keys."""
    keys = [k[len(block) + 6 :] for k in sd if k.startswith(block + "conv2.")]
    if any(k.startswith("gwconv.") for k in keys):
        conv = sd[block + "conv2.conv.weight"]
        return "psconv_original", sd[block + "conv1.weight"].shape[0] // conv.shape[1]
    if any(k.startswith("conv2_") for k in keys):
        return "pyconv_original", 1
    if any(k.startswith("levels.") for k in keys):
        return "pyconv", 1
    if "gate_logits" in keys:  # DynamicPSConv2d: nn.Conv2d's weight (and bias) plus the mask's gates
        w = sd[block + "conv2.weight"]
        return "dynamic_psconv", sd[block + "conv1.weight"].shape[0] // w.shape[1]
    if keys == ["weight"]:
        w = sd[block + "conv2.weight"]
        return "standard", sd[block + "conv1.weight"].shape[0] // w.shape[1]
    return "psconv", 0  # our PSConv's internal tensors; groups not readable without the op


def describe_state_dict(sd: Mapping[str, Tensor]) -> str:
    """Best guess of the registered name (+ layout, classes) a ResNet-style state dict belongs to."""
    blocks: dict[int, int] = {}
    for key in sd:
        m = _BLOCK.match(key)
        if m:
            stage, idx = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), idx + 1)
    if not blocks or "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd:
        head = ", ".join(list(sd)[:3])
        return f"not a ResNet-style network ({len(sd)} tensors, first keys: {head})"
    counts = [blocks[s] for s in sorted(blocks)]
    bottleneck = "layer1.0.conv3.weight" in sd
    depth = (3 if bottleneck else 2) * sum(counts) + 2
    conv, groups = _conv_kind(sd, "layer1.0.")
    width = sd["layer1.0.conv1.weight"].shape[0]
    cifar = sd["conv1.weight"].shape[-1] == 3
    pyconv_trunk = "layer1.0.downsample.2.weight" in sd and "layer1.0.downsample.0.weight" not in sd
    if pyconv_trunk:
        name = f"pyconv{'hg' if width == 128 else ''}resnet{depth}"
    elif cifar and bottleneck:
        name = f"resnext29_{width // 64}x64d" if depth == 29 else f"cifar resnext{depth}"
    elif cifar:
        name = f"resnet{depth}"
    elif width > 64:
        name = f"resnext{depth}_32x{width // 32}d"
    else:
        name = f"{'se' if any('.se.' in k for k in sd) else ''}resnet{depth}"
    if conv.startswith("psconv") and not name.startswith("pyconv"):
        name = "ps_" + name
    elif conv in ("pyconv", "dynamic_psconv") and not name.startswith("pyconv"):
        name += f" with model/conv={conv}"  # a standard trunk whose middle convs are this conv type
    notes = {
        "psconv_original": " (the PSConv authors' layout)",
        "pyconv_original": " (the PyConv authors' layout)",
    }
    text = f"{name}{notes.get(conv, '')}, blocks {counts}"
    if groups > 1:
        text += f", {groups}-group middle convs"
    fc = sd.get("fc.weight")
    return text + (f", {fc.shape[0]} classes" if fc is not None else ", no classifier (fc)")
