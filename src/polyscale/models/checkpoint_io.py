"""Load weights into a model from state dicts and the original authors' files.

Recognised sources (a path or an already loaded mapping):
- bare state dicts and `{"state_dict": ...}` / `{"model": ...}` wrappers (torchvision's references and
  our training checkpoints hold the weights under "model"; the engine owns the rest of our container),
  with or without the `module.` (DataParallel / DDP) or `_orig_mod.` (torch.compile) prefix;
- the PyConv authors' released files (`conv2.conv2_{i}` keys) and the PSConv authors' backbones
  (`conv2.{gwconv,gwconv_shift,conv}` keys), converted by `polyscale.models.convert`.
A mismatch raises CheckpointError naming the missing / unexpected / wrong-shape keys and the fix.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from polyscale.errors import CheckpointError, one_line
from polyscale.models.convert import UnrepresentableWeights, convert_psconv_original, rename_pyconv_original
from polyscale.models.describe import describe_model, describe_state_dict

__all__ = ["CheckpointWeights", "LoadReport", "load_model_weights", "read_state_dict"]

_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER = "fc."


@dataclass
class LoadReport:
    """What `load_model_weights` did; `summary()` is one human-readable line."""

    source: str
    format: str  # state_dict | pyconv_original | psconv_original
    loaded: int = 0  # tensors copied into the model (a converted PSConv kernel counts once)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    converted_layers: list[str] = field(default_factory=list)
    unrepresentable: list[UnrepresentableWeights] = field(default_factory=list)
    # file tensors of modules the model does not hold, left out on purpose (a backbone drops fc)
    dropped_keys: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every model tensor came from the file and every file tensor not dropped on purpose was used."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.format})"]
        if self.dropped_keys:
            parts.append(f"dropped {len(self.dropped_keys)} outside the backbone ({_few(self.dropped_keys)})")
        if self.converted_layers:
            parts.append(f"converted {len(self.converted_layers)} original PSConv layers")
        for what, keys in (("missing", self.missing_keys), ("unexpected", self.unexpected_keys)):
            if keys:
                parts.append(f"{len(keys)} {what} ({_few(keys)})")
        if self.mismatched_keys:
            parts.append(
                f"{len(self.mismatched_keys)} wrong shape ({_few([k for k, _, _ in self.mismatched_keys])})"
            )
        if self.unrepresentable:
            worst = max(self.unrepresentable, key=lambda u: u.rel_norm)
            parts.append(
                f"dropped non-zero masked-block weights in {len(self.unrepresentable)} layers "
                f"(worst {worst.layer}: max |w| {worst.max_abs:.3g}, {100 * worst.rel_norm:.2f}% of its norm)"
            )
        return "; ".join(parts)


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def _read(source: str | Path) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint file {path} does not exist; check model.checkpoint_path / the path given."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain containers, so it is not loaded "
            "(unsafe unpickling). If you trust it, load it with torch.load(path, weights_only=False) and "
            f"pass the resulting state dict instead. ({one_line(err)})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"Cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: {one_line(err)}): the file "
            "is empty, truncated or not a PyTorch file. Use another copy or re-save it with torch.save."
        ) from err


class CheckpointWeights(NamedTuple):
    state_dict: dict[str, Tensor]  # without wrapper prefixes
    format: str  # state_dict | pyconv_original | psconv_original
    source: str  # the path, or the name the caller gave a mapping


def read_state_dict(source: str | Path | Mapping[str, Any], *, name: str | None = None) -> CheckpointWeights:
    """The state dict in a checkpoint file or mapping and its format; `name` labels a mapping in messages."""
    name = name or (str(source) if isinstance(source, str | Path) else "the given state dict")
    raw = _read(source) if isinstance(source, str | Path) else source
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{name} holds a {type(raw).__name__}, not a state dict or checkpoint dict.")
    for wrapper in ("state_dict", "model"):
        if isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    sd = {k: v for k, v in raw.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"{name} contains no tensors; expected a state dict or a polyscale checkpoint.")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    fmt = "state_dict"
    if any(k.endswith("conv2.gwconv.weight") for k in sd):
        fmt = "psconv_original"
    elif any(".conv2.conv2_" in k for k in sd):
        fmt = "pyconv_original"
    return CheckpointWeights(sd, fmt, name)


_DEFAULT_FIX = (
    "Fix: build the network the checkpoint was made for (`name`, `conv`, `num_classes`), or load only the "
    "matching tensors with strict=False (e.g. fine-tuning a new classifier)."
)


def load_model_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    *,
    strict: bool = True,
    new_classifier_ok: bool = False,
    psconv_dilation: int = 2,
    name: str | None = None,
    trained_as: str | None = None,
    fix: str = _DEFAULT_FIX,
) -> LoadReport:
    """Copy the weights of `source` into `model` and report what happened.

    Args:
        strict: every model tensor must come from the file and every file tensor must fit; otherwise
            raise CheckpointError. With strict=False the fitting tensors are loaded and the rest listed
            in the report (fine-tuning with a new classifier, backbone files without fc).
        new_classifier_ok: strict about everything except the classifier (`fc.*`): a classifier the file
            lacks or that has another class count keeps its initialisation, with a warning (timm's
            pretrained loading with a new `num_classes`; what `create_model(checkpoint_path=...)` does).
        psconv_dilation: base dilation d of original PSConv files (2 in the released backbones).
        name: how messages name a mapping source (its file, say); a path names itself.
        trained_as: what the source was trained as (e.g. "model=resnet50"), for mismatch messages.
        fix: the last sentence of a mismatch message: how to fix it, in the caller's terms.
    """
    sd, fmt, name = read_state_dict(source, name=name)
    as_read = sd  # before renaming / conversion: what error messages describe
    report = LoadReport(source=name, format=fmt)
    model_sd = model.state_dict()
    dense: dict[str, Tensor] = {}
    if fmt == "pyconv_original":
        sd = rename_pyconv_original(sd, set(model_sd))
    elif fmt == "psconv_original":
        try:
            conv = convert_psconv_original(sd, model, dilation=psconv_dilation)
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"Cannot convert the original PSConv file {name} into {describe_model(model)}: {err}. "
                f"The file looks like {describe_state_dict(as_read)}."
            ) from err
        sd, dense = conv.state_dict, conv.dense
        report.converted_layers, report.unrepresentable = conv.converted, conv.unrepresentable
    covered = tuple(f"{m}." for m in dense)  # our PSConv tensors, set through load_dense_weight
    report.missing_keys = [k for k in model_sd if k not in sd and not k.startswith(covered)]
    report.unexpected_keys = [k for k in sd if k not in model_sd]
    report.mismatched_keys = [
        (k, tuple(v.shape), tuple(model_sd[k].shape))
        for k, v in sd.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    problems = [*report.missing_keys, *report.unexpected_keys, *(k for k, _, _ in report.mismatched_keys)]
    if new_classifier_ok and problems and all(k.startswith(_CLASSIFIER) for k in problems):
        problems = []
        warnings.warn(
            f"{name}: classifier not loaded ({report.summary()}); it keeps its initialisation "
            "(fine-tuning on a new label set).",
            stacklevel=2,
        )
    if strict and problems:
        raise CheckpointError(_mismatch_message(model, as_read, report, trained_as, fix))
    bad = {k for k, _, _ in report.mismatched_keys}
    fitting = {k: v for k, v in sd.items() if k in model_sd and k not in bad}
    model.load_state_dict(fitting, strict=False)
    with torch.no_grad():
        for module_name, weight in dense.items():
            module = model.get_submodule(module_name)
            module.load_dense_weight(weight.to(module.dense_weight().dtype))
    report.loaded = len(fitting) + len(dense)
    if report.unrepresentable:
        warnings.warn(
            f"{name}: {report.summary()}. Our PSConv holds one dilation per kernel; the original layers "
            "also kept weights in their masked blocks, so the converted network approximates the original.",
            stacklevel=2,
        )
    return report


def _mismatch_message(
    model: nn.Module, sd: Mapping[str, Tensor], report: LoadReport, trained_as: str | None, fix: str
) -> str:
    looks = describe_state_dict(sd)
    looks = f"{trained_as} ({looks})" if trained_as else looks
    lines = [
        f"Checkpoint {report.source} does not fit the model: built {describe_model(model)}; "
        f"the checkpoint looks like {looks}."
    ]
    if report.missing_keys:
        lines.append(
            f"{len(report.missing_keys)} model keys are missing from it: {_few(report.missing_keys)}."
        )
    if report.unexpected_keys:
        lines.append(
            f"{len(report.unexpected_keys)} of its keys are unexpected: {_few(report.unexpected_keys)}."
        )
    if report.mismatched_keys:
        shown = [f"{k} {list(a)} in file vs {list(b)} in model" for k, a, b in report.mismatched_keys[:4]]
        more = len(report.mismatched_keys) - len(shown)
        tail = f" (+{more} more)" if more > 0 else ""
        lines.append(f"{len(report.mismatched_keys)} have the wrong shape: {'; '.join(shown)}{tail}.")
    lines.append(fix)
    return " ".join(lines)
