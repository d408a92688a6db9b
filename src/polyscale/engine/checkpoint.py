"""Our checkpoint container: a plain dict that loads with `torch.load(weights_only=True)`.

Layout (version 1): `{"format": "polyscale", "version": 1, "model": state dict (unwrapped), "ema": state
dict | None, "optimizer", "scheduler", "scaler", "epoch", "global_step", "step_in_epoch", "rng": [one
entry per rank], "config": plain resolved config, "metrics": {...}, "checksum": {"algorithm": "sha256",
"value": hex}}`. `epoch` counts finished epochs and `step_in_epoch` the optimizer steps already done in
epoch `epoch`, so a resume continues mid-epoch. RNG states are stored as tensors, lists and numbers only,
because weights_only refuses numpy objects.

This module is the one reader and writer of the container: others ask `model_state`, `trained_as` and
`stored_config` instead of indexing its keys. The checksum covers every value of the container; files
written before it existed (no "checksum" key) still load.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyscale.errors import CheckpointError, one_line

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "WEIGHT_LIMIT",
    "check_finite",
    "is_polyscale_checkpoint",
    "load_checkpoint",
    "model_state",
    "payload_checksum",
    "remove_stale_temp_files",
    "save_checkpoint",
    "stored_config",
    "trained_as",
    "unwrap_model",
    "weights_problem",
]

CHECKPOINT_FORMAT = "polyscale"
CHECKPOINT_VERSION = 1
_CHECKSUM = "sha256"  # hashlib's sha256 runs at ~1 GB/s with the SHA extensions of current CPUs

# Healthy weights and BatchNorm statistics stay within about 1e4 in magnitude; 1e10 is six orders above
# that, so only a diverged run reaches it. It is also the last size from which a run can still be told
# apart from an overflow: the square of such a value (weight decay, gradient-norm clipping, BN variance)
# is 1e20, and products with activations of the same size summed over a layer's fan-in reach fp32's
# 3.4e38 within two or three layers, after which everything downstream is inf or NaN.
WEIGHT_LIMIT = 1e10

# `.NAME.<8 random characters>.tmp`: ours (secrets.token_hex(4)) and those of older versions (mkstemp).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-z_]{8}\.tmp$")
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers.

    Saving the unwrapped module keeps `module.` and `_orig_mod.` prefixes out of the state dict.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# --- checksum -------------------------------------------------------------------------------------------


def _feed(hasher: Any, obj: Any) -> None:
    """Hash `obj` by structure: tensors by dtype, shape and bytes; dicts in sorted key order; other
    values by type and repr (exact for ints, floats and strings). Lists and tuples hash alike, so the
    digest does not depend on how a container type survives the round trip through pickle."""
    if isinstance(obj, Tensor):
        tensor = obj.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.is_quantized:
            tensor = tensor.int_repr()
        hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.numel():
            data = tensor.resolve_conj().resolve_neg().cpu().reshape(-1).view(torch.uint8)
            hasher.update(memoryview(data.numpy()))
    elif isinstance(obj, Mapping):
        hasher.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(hasher, key)
            _feed(hasher, obj[key])
    elif isinstance(obj, list | tuple):
        hasher.update(f"L{len(obj)};".encode())
        for item in obj:
            _feed(hasher, item)
    else:
        text = repr(obj)
        hasher.update(f"S{type(obj).__name__}:{len(text)};{text}".encode())


def payload_checksum(container: Mapping[str, Any]) -> str:
    """Hex sha256 of everything in `container` except its "checksum" entry."""
    hasher = hashlib.sha256()
    _feed(hasher, {k: v for k, v in container.items() if k != "checksum"})
    return hasher.hexdigest()


def _verify_checksum(obj: dict[str, Any], path: Path) -> None:
    stored = obj.get("checksum")
    if stored is None:
        return  # written before checksums existed
    if not (isinstance(stored, Mapping) and stored.get("algorithm") == _CHECKSUM):
        raise CheckpointError(
            f"Checkpoint {path} carries a checksum this polyscale cannot check ({stored!r}); it was written "
            "by another version. Upgrade polyscale, or use a checkpoint written by this version."
        )
    actual = payload_checksum(obj)
    if actual != stored.get("value"):
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: its contents changed after it was written (a disk or copy error; "
            f"stored sha256 {str(stored.get('value'))[:16]}..., computed {actual[:16]}...), so its weights "
            f"cannot be trusted. {_alternatives(path)}"
        )


def _alternatives(path: Path) -> str:
    """What to use instead of a broken checkpoint: its best.pt sibling when that is another file."""
    best = path.with_name("best.pt")
    if path.name != "best.pt" and best.is_file():
        return (
            f"Use {best} (trainer.resume={best} or checkpoint={best}) or an earlier copy of {path.name}, "
            "or copy the file again from where it came from."
        )
    return "Use an earlier copy of it (or best.pt of the same run), or copy the file again from its source."


# --- weight checks --------------------------------------------------------------------------------------


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """(dotted key, tensor) of every tensor in nested dicts / lists, in their order."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}.{i}" if prefix else str(i))


def weights_problem(state_dict: Mapping[str, Any], limit: float = WEIGHT_LIMIT) -> str | None:
    """The first floating-point tensor of `state_dict` (nested containers allowed) that holds NaN, inf
    or a value with |x| > `limit`, described in a few words; None when all are fine.

    The training loop asks this before it writes a checkpoint, so that last.pt is always a state worth
    continuing from (weights of 1e26 pass a finite check and are just as dead).
    """
    for key, tensor in _tensors(state_dict):
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue  # integer buffers (num_batches_tracked) cannot diverge
        tensor = tensor.detach()
        if tensor.is_complex():
            largest = float(tensor.abs().amax())
        else:
            low, high = torch.aminmax(tensor)  # NaN propagates; no |x| copy of the tensor
            largest = max(-float(low), float(high))
        if math.isnan(largest):
            count = int(torch.isnan(tensor).sum())
            return f"{key} holds NaN ({count} of {tensor.numel()} values)"
        if math.isinf(largest):
            count = int(torch.isinf(tensor).sum())
            return f"{key} holds inf ({count} of {tensor.numel()} values)"
        if largest > limit:
            return f"{key} has |x| up to {largest:.3g}, above {limit:.0e}: the run diverged"
    return None


def check_finite(state_dict: Mapping[str, Any], source: str | Path) -> None:
    """CheckpointError naming `source` and the first tensor with NaN or inf values.

    For weights that carry no checksum (bare state dicts, other people's files), the one corruption that
    matters and can still be seen.
    """
    problem = weights_problem(state_dict, limit=math.inf)
    if problem is not None:
        raise CheckpointError(
            f"{source} holds unusable weights: {problem}. The file is damaged, or was saved from a run that "
            "had already diverged; use an earlier checkpoint."
        )


# --- reading the container ------------------------------------------------------------------------------


def is_polyscale_checkpoint(obj: Any) -> bool:
    """True for our container, False for a bare state dict or a foreign file."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def model_state(
    ckpt: Mapping[str, Any], use_ema: bool = False, *, source: str | Path | None = None
) -> dict[str, Tensor]:
    """The model (or, with `use_ema`, the EMA) state dict of our container.

    `source` (the file's path) names the file in the CheckpointError raised when the run that wrote it
    kept no EMA weights, or when `ckpt` is not our container.
    """
    name = str(source) if source is not None else "This checkpoint"
    if not is_polyscale_checkpoint(ckpt):
        raise CheckpointError(
            f"{name} is not a polyscale training checkpoint (a bare state dict or another format), so it "
            "holds no separate model / EMA weights."
        )
    key = "ema" if use_ema else "model"
    weights = ckpt.get(key)
    if weights is None:
        if use_ema:
            raise CheckpointError(
                f"{name} has no EMA weights: the run that wrote it trained with trainer.ema=false. Use its "
                "main weights (eval.use_ema=false)."
            )
        raise CheckpointError(f"{name} holds no model weights; it was not written by a training run.")
    return weights


def stored_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config (plain data) stored in our container; {} for other files."""
    config = ckpt.get("config") if is_polyscale_checkpoint(ckpt) else None
    return dict(config) if isinstance(config, Mapping) else {}


def trained_as(ckpt: Mapping[str, Any]) -> str | None:
    """What our container's stored config says it trained, as "model=NAME model/conv=TYPE"; None when it
    does not say (or for other files)."""
    model = stored_config(ckpt).get("model") or {}
    if not isinstance(model, Mapping) or not model.get("name"):
        return None
    conv = (model.get("conv") or {}).get("name") if isinstance(model.get("conv"), Mapping) else None
    return f"model={model['name']}" + (f" model/conv={conv}" if conv else "")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Read a checkpoint file (ours or a bare state dict) with `weights_only=True`.

    With `verify` (the default) our container's checksum is checked and its model / EMA weights, or every
    tensor of another file, must be finite. Raises CheckpointError naming the file when it is missing,
    empty, unreadable, corrupt or from a newer polyscale.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Check the path (absolute, or relative to {Path.cwd()})."
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"Checkpoint {path} is empty (0 bytes): its writing or copying was cut off, or the disk was "
            f"full. {_alternatives(path)}"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types (pickle, zip, weights_only UnpicklingError, EOF)
        raise CheckpointError(
            f"Cannot read checkpoint {path} ({size} bytes): {type(err).__name__}: {one_line(err)} The file "
            "is truncated (an interrupted copy or a full disk), not a PyTorch checkpoint, or holds objects "
            "other than tensors and plain data (re-save those as a state dict: "
            f"torch.save(model.state_dict(), path)). {_alternatives(path)}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(obj).__name__}, not a dict (state dict or ours)."
        )
    if is_polyscale_checkpoint(obj):
        if obj.get("version", 0) > CHECKPOINT_VERSION:
            raise CheckpointError(
                f"Checkpoint {path} has format version {obj['version']}, newer than this polyscale "
                f"(reads up to {CHECKPOINT_VERSION}). Upgrade polyscale."
            )
        if verify:
            _verify_checksum(obj, path)
            check_finite({k: obj[k] for k in ("model", "ema") if obj.get(k) is not None}, path)
    elif verify:
        check_finite(obj, path)
    return obj


# --- writing --------------------------------------------------------------------------------------------


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty `.NAME.<random>.tmp` beside `path`, opened for writing.

    Created with mode 0o666 so that the umask decides its permissions like any other file's (mkstemp's
    0600 kept checkpoints from teammates on shared clusters).
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _storage_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages in `obj`: about the size torch.save writes."""
    seen: dict[tuple[str, int], int] = {}
    for _, tensor in _tensors(obj):
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`: torch.save reports a failed write as RuntimeError("unexpected pos ...")
    whose context is the real error (ENOSPC, EFBIG, EIO)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        todo += [current.__cause__, current.__context__]
    return None


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def _write_failure(path: Path, err: OSError, needed: int, existed: bool) -> str:
    """One paragraph: what failed, the space needed and free, what survived and what to do."""
    reason = err.strerror or one_line(err)
    code = f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else ""
    kept = (
        f"The previous {path.name} is intact" if existed else f"No earlier {path.name} existed"
    ) + " and the partial file was removed."
    if err.errno in _NO_ROOM:
        try:
            free = _size(shutil.disk_usage(path.parent).free)
        except OSError:
            free = "an unknown amount"
        return (
            f"Cannot write checkpoint {path}: {reason}{code}. It needs about {_size(needed)}; {free} is free "
            f"on the file system of {path.parent}. {kept} Free space there (or raise the disk quota / the "
            "file-size limit, ulimit -f), then continue with trainer.resume=auto, or choose a run directory "
            "on a disk with room (hydra.run.dir=PATH)."
        )
    return (
        f"Cannot write checkpoint {path}: {reason}{code}. {kept} Check that {path.parent} is writable and "
        "its disk is healthy, then continue with trainer.resume=auto."
    )


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` as our container with its checksum, atomically: a temp file in the same folder,
    flush + fsync, rename, fsync the folder.

    A crash, a kill or a full disk while saving leaves the previous file intact, never a truncated one.
    A failed write (disk full, quota, file-size limit, I/O error) raises CheckpointError with one
    paragraph; other errors propagate unchanged. Temp files of writes cut off by SIGKILL are removed by
    `remove_stale_temp_files`.
    """
    path = Path(path)
    container = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    container.pop("checksum", None)  # a re-saved container gets a new one
    container["checksum"] = {"algorithm": _CHECKSUM, "value": payload_checksum(container)}
    existed = path.is_file()
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as handle:
            torch.save(container, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        os_error = _os_error(err)
        if os_error is None or not isinstance(err, Exception):
            raise  # programming errors keep their traceback; KeyboardInterrupt stays one
        raise CheckpointError(_write_failure(path, os_error, _storage_bytes(container), existed)) from err
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the `.NAME.<random>.tmp` files that interrupted `save_checkpoint` calls left in `folder`.

    Only safe while no other process writes there: the training loop calls it at start, holding the run
    directory's lock. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if _TEMP_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
