"""Config sections -> the plain keyword arguments of the model and data code, and their errors back.

The library code below (models, data, ops) names its arguments in its messages (`root`,
`dilation_pattern`, ...); `config_keys` re-renders such an error with the keys a user types on the
command line (data.root, model.conv.dilation_pattern, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from omegaconf import OmegaConf

from polyscale.config import ConvConfig
from polyscale.errors import ConfigError, PolyscaleError

__all__ = [
    "MODEL_KEYS",
    "build_split_loaders",
    "config_keys",
    "data_arguments",
    "loader_arguments",
    "model_arguments",
    "plain",
    "val_loader",
]

_CONV_FIELDS = {f.name for f in dataclasses.fields(ConvConfig)}


def plain(node: Any) -> dict[str, Any]:
    """A config node (DictConfig, dataclass or mapping) as a plain, resolved dict."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    return dict(node)


def MODEL_KEYS(name: str) -> str:  # noqa: N802 (a table, written as a function)
    """The config key of a create_model / conv argument name."""
    if name == "name":
        return "model"
    if name == "conv":
        return "model/conv"
    return f"model.conv.{name}" if name in _CONV_FIELDS - {"name"} else f"model.{name}"


@contextlib.contextmanager
def config_keys(keys: str | Mapping[str, str] | Callable[[str], str]) -> Iterator[None]:
    """Re-raise user errors of the code inside with argument names shown as config keys."""
    try:
        yield
    except PolyscaleError as err:
        raise err.with_keys(keys) from err


def model_arguments(cfg_model: Any, num_classes: int | None) -> dict[str, Any]:
    """create_model's keyword arguments from the `model` section; `num_classes` fills a null one."""
    c = plain(cfg_model)
    conv = dict(c.get("conv") or {})
    if conv.pop("groups", None) is not None:
        raise ConfigError(
            "model.conv.groups was renamed to model.conv.pyramid_groups (the per-level group counts of "
            "PyConv's pyramid, not the groups of a conv): write model.conv.pyramid_groups=... instead."
        )
    n = c.get("num_classes") if c.get("num_classes") is not None else num_classes
    if n is None:
        raise ConfigError(
            "model.num_classes is null and the data set gives no class count; set model.num_classes."
        )
    return {
        "name": c["name"],
        "num_classes": n,
        "conv": conv or None,
        "drop_rate": c.get("drop_rate", 0.0),
        "zero_init_last": c.get("zero_init_last", False),
        "checkpoint_path": c.get("checkpoint_path"),
    }


def data_arguments(cfg_data: Any, **replace: Any) -> dict[str, Any]:
    """The data section as keyword arguments of polyscale.data (with some values replaced)."""
    return {**plain(cfg_data), **replace}


def loader_arguments(cfg_data: Any, world_size: int, *, val: bool) -> dict[str, Any]:
    """The per-rank batch and worker options of a loader from the data section (its batch sizes are
    global: data.batch_size, data.val_batch_size (null: batch_size))."""
    global_batch = (cfg_data.val_batch_size or cfg_data.batch_size) if val else cfg_data.batch_size
    return {
        "batch_size": max(1, global_batch // world_size),
        "num_workers": cfg_data.num_workers,
        "pin_memory": cfg_data.pin_memory,
        "persistent_workers": cfg_data.persistent_workers,
    }


def build_split_loaders(
    cfg: Any, runtime: Any, micro_batch: int, data: dict[str, Any], build_set: Callable, loaders: tuple
) -> tuple[Any, Any, Any, Any]:
    """(train set, val set, train loader, val loader) of the data section: `build_set(split, **data)` and
    the library's (train, val) loader builders, with this rank's batches; errors name data.* keys."""
    build_train, build_val = loaders
    where = {"rank": runtime.rank, "world_size": runtime.world_size, "device": runtime.device}
    with config_keys("data."):
        train_set, val_set = build_set("train", **data), build_set("val", **data)
        train_args = loader_arguments(cfg.data, runtime.world_size, val=False) | {"batch_size": micro_batch}
        train_loader = build_train(train_set, seed=cfg.seed, **where, **train_args)
    return train_set, val_set, train_loader, val_loader(build_val, val_set, cfg.data, runtime)


def val_loader(build_val: Callable, dataset: Any, cfg_data: Any, runtime: Any) -> Any:
    """This rank's exact evaluation shard of `dataset` through the library's `build_val`."""
    where = {"rank": runtime.rank, "world_size": runtime.world_size, "device": runtime.device}
    with config_keys("data."):
        return build_val(dataset, **where, **loader_arguments(cfg_data, runtime.world_size, val=True))
