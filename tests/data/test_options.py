"""`polyscale.data` takes plain keyword arguments: it works without Hydra or OmegaConf installed, its
options are the data config's fields, and its errors name arguments, not config keys."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from polyscale.data import DataOptions, build_dataset
from polyscale.errors import ConfigError, DataError

SRC = Path(__file__).parents[2] / "src"


def test_data_package_works_without_hydra_and_omegaconf() -> None:
    """Import, build the built-in set and a train loader, draw a batch, with both packages blocked."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["hydra"] = None  # any import of them now raises ImportError
        sys.modules["omegaconf"] = None
        import torch
        import polyscale.data as data

        train = data.build_dataset(
            "train", name="builtin", num_train_samples=16, image_size=16, crop_ratio=1.0
        )
        loader = data.build_train_loader(
            train, rank=0, world_size=1, batch_size=8, seed=0, device="cpu", num_workers=0
        )
        loader.set_epoch(0)
        images, targets = next(iter(loader))
        assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32, images.shape
        assert targets.shape == (8,) and 0 <= int(targets.min()) and int(targets.max()) < 10
        print("batch", tuple(images.shape))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch (8, 3, 16, 16)" in done.stdout


def test_options_are_the_data_config_fields() -> None:
    """Same names, types and defaults as the `data` config schema, so the engine passes it on as is."""
    config = pytest.importorskip("polyscale.config")
    schema = config.DataConfig
    if schema is DataOptions or issubclass(schema, DataOptions):
        return  # the schema reuses the dataclass
    ours, theirs = dataclasses.fields(DataOptions), dataclasses.fields(schema)
    assert [f.name for f in ours] == [f.name for f in theirs]
    hints, their_hints = typing.get_type_hints(DataOptions), typing.get_type_hints(schema)
    assert hints == their_hints
    assert dataclasses.asdict(DataOptions()) == dataclasses.asdict(schema())


def test_options_take_list_like_values_and_reject_unknown_names() -> None:
    opts = DataOptions.from_kwargs({"mean": (0.5, 0.5, 0.5), "rrc_scale": range(1, 3)})
    assert opts.mean == [0.5, 0.5, 0.5] and opts.rrc_scale == [1, 2]
    with pytest.raises(
        ConfigError, match=r"Unknown data option\(s\) imagesize; the data options are name, root"
    ):
        DataOptions.from_kwargs({"imagesize": 32})


def test_errors_mark_argument_names_for_the_engine(tmp_path: Path) -> None:
    """str() shows `root=...`; the engine re-renders the same error with its config keys."""
    with pytest.raises(DataError) as info:
        build_dataset("train", name="imagefolder", root=None)
    plain = str(info.value)
    assert plain.startswith("No image-folder folder given: root is None.") and "set root=/path/to/it" in plain
    keyed = str(info.value.with_keys("data."))
    assert keyed == plain.replace("root is None", "data.root is None").replace("set root=", "set data.root=")
    with pytest.raises(DataError) as info:
        build_dataset("val", name="imagenet", root=str(tmp_path / "nowhere"))
    assert "fix data.root (or export IMAGENET_ROOT=/path/to/it)" in str(info.value.with_keys("data."))
