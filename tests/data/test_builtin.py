"""The built-in data set: deterministic, balanced, split-disjoint, no colour shortcut, own RNG only."""

from __future__ import annotations

import pytest
import torch

from polyscale.data.builtin import FAMILIES, BuiltinDataset
from polyscale.errors import ConfigError


def test_same_arguments_give_the_same_images_and_another_seed_or_split_does_not() -> None:
    a = BuiltinDataset("train", num_samples=60, image_size=24, seed=3)
    b = BuiltinDataset("train", num_samples=60, image_size=24, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    for other in (
        BuiltinDataset("train", num_samples=60, image_size=24, seed=4),
        BuiltinDataset("val", num_samples=60, image_size=24, seed=3),
    ):
        assert not torch.equal(a.images, other.images)


def test_items_are_uint8_chw_images_with_balanced_labels() -> None:
    ds = BuiltinDataset("val", num_samples=103, image_size=16, num_classes=7)
    image, label = ds[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and isinstance(label, int)
    assert len(ds) == 103 and ds.num_classes == 7 and ds.classes == [name for name, _ in FAMILIES[:7]]
    counts = torch.bincount(ds.targets, minlength=7)
    assert counts.max() - counts.min() <= 1 and int(ds.targets.max()) == 6
    assert ds.images.float().std() > 30  # drawn shapes, not blank images


def test_generation_does_not_touch_the_global_rng() -> None:
    state = torch.get_rng_state()
    BuiltinDataset("train", num_samples=20, image_size=16)
    assert torch.equal(torch.get_rng_state(), state)


def test_mean_colour_is_nearly_useless_for_the_class() -> None:
    """Nearest class-mean colour classifies barely above chance (10%): a network must use shapes."""
    train = BuiltinDataset("train", num_samples=1000, image_size=16)
    val = BuiltinDataset("val", num_samples=500, image_size=16)
    colour = lambda ds: ds.images.float().mean(dim=(2, 3))  # noqa: E731  (N, 3)
    centroids = torch.stack([colour(train)[train.targets == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(colour(val), centroids).argmin(1) == val.targets).float().mean()
    assert accuracy < 0.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 11}, "has 10 classes"),
        ({"num_samples": 0}, "at least one sample"),
        ({"image_size": 4}, "at least 8x8"),
    ],
)
def test_bad_sizes_are_config_errors(kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BuiltinDataset("train", **{"num_samples": 10, **kwargs})
