"""Detection data sets: COCO-format files (boxes, masks, crowds, degenerate boxes, bad images, category
ids, errors) and the built-in detection set (deterministic, exact boxes and masks, COCO ground truth)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from coco_helpers import LABEL_OF, smooth_jpeg, tight_xyxy, write_coco_set
from pycocotools import mask as mask_utils

from polyscale.data import BAD_IMAGE_ID, DetectionDataOptions, build_detection_dataset, count_bad_files
from polyscale.data.detection_targets import mask_boxes
from polyscale.errors import ConfigError, DataError

# pycocotools 2.0 under numpy 2 warns on every mask decode (its __array__ lacks `copy`); harmless.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("coco")
    return root, write_coco_set(root)


def _paths(root: Path) -> dict[str, str]:
    ann, images = str(root / "ann.json"), str(root / "images")
    return dict(train_ann=ann, train_images=images, val_ann=ann, val_images=images)


def _coco(root: Path, split: str = "val", **kw):
    return build_detection_dataset(split, name="coco", **_paths(root), **kw)


def _check_objects(target: dict, objects: list[dict], with_masks: bool) -> None:
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [o["box"] for o in objects]
    assert target["labels"].tolist() == [LABEL_OF[o["category"]] for o in objects]
    assert target["iscrowd"].tolist() == [0] * len(objects) and target["area"].shape == (len(objects),)
    if with_masks:
        assert target["masks"].dtype == torch.uint8
        for mask, o in zip(target["masks"], objects):
            np.testing.assert_array_equal(mask.numpy(), o["mask"])


def test_coco_items_hold_what_was_drawn(coco_set) -> None:
    root, expected = coco_set
    ds = _coco(root, with_masks=True)
    assert len(ds) == 7 and ds.image_ids.tolist() == [10, 20, 30, 40, 50, 60, 70]  # id order, all images
    assert ds.degenerate_boxes == 2  # zero width; wholly outside the image after clipping
    for index, image_id in enumerate(ds.image_ids.tolist()):
        image, target = ds[index]
        assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
        height, width = ds.image_sizes[index].tolist()
        assert image.shape == (3, height, width)
        if image_id in (50, 60):  # corrupt, missing: evaluation placeholder, skipped and counted
            assert target["image_id"] == BAD_IMAGE_ID and len(target["boxes"]) == 0
            assert target["masks"].shape == (0, height, width)
            continue
        assert target["image_id"] == image_id
        _check_objects(target, expected[image_id], with_masks=True)  # crowd regions never in targets
    assert count_bad_files(ds) == 2 and ds.bad_file_mask.tolist() == [0, 0, 0, 0, 1, 1, 0]
    _, again = ds[4]  # a known bad file is not read again
    assert again["image_id"] == BAD_IMAGE_ID


def test_coco_without_masks_skips_them(coco_set) -> None:
    root, expected = coco_set
    _, target = _coco(root)[0]
    assert "masks" not in target
    _check_objects(target, expected[10], with_masks=False)


def test_coco_ground_truth_keeps_crowd_regions(coco_set) -> None:
    root = coco_set[0]
    ds = _coco(root)
    crowd = ds.coco.loadAnns(ds.coco.getAnnIds(iscrowd=True))
    assert sorted(a["image_id"] for a in crowd) == [20, 70]
    assert sorted(ds.coco.getImgIds()) == [10, 20, 30, 40, 50, 60, 70]
    assert len(ds.coco.getAnnIds()) == len(json.loads((root / "ann.json").read_text())["annotations"])
    train = _coco(root, "train")  # the training split indexes the same ground truth, on first use
    assert train._coco is None and train.coco.getAnnIds() == ds.coco.getAnnIds()


def test_coco_set_pickles_for_spawned_workers(coco_set) -> None:
    ds = _coco(coco_set[0], with_masks=True)
    ds.coco  # noqa: B018 -- built, and left out of the pickle
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._coco is None
    (x, t), (y, u) = ds[0], copy[0]
    assert torch.equal(x, y) and torch.equal(t["masks"], u["masks"]) and torch.equal(t["boxes"], u["boxes"])


def test_category_ids_map_to_contiguous_labels(coco_set) -> None:
    ds = _coco(coco_set[0])
    assert ds.num_classes == 4  # category 9 has no annotation but is a class
    assert ds.label_to_category == {1: 3, 2: 5, 3: 7, 4: 9}
    assert ds.classes == ["three", "five", "seven", "nine"]
    with pytest.raises(DataError, match="lists 4 categories but num_classes=80"):
        _coco(coco_set[0], num_classes=80)


def test_training_substitutes_bad_images_and_leaves_out_crowd_only_images(coco_set) -> None:
    root, expected = coco_set
    ds = _coco(root, "train", hflip=False, with_masks=True)
    # 70 holds only a crowd region: not a negative; 30 has no annotations: kept as a negative
    assert ds.image_ids.tolist() == [10, 20, 30, 40, 50, 60]
    _, empty = ds[2]
    assert empty["image_id"] == 30 and empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    # 50 (corrupt) and 60 (missing), both 32x32 (width >= height): the next readable image of the same
    # orientation, cyclically, is 10 (64x48); 20 (40x56, portrait) is passed over
    for index in (4, 5):
        _, target = ds[index]
        assert target["image_id"] == 10
        _check_objects(target, expected[10], with_masks=True)
    assert count_bad_files(ds) == 2


def _flipping_seed(flip: bool) -> int:
    """A global seed under which the data set's flip draw (torch.rand(()) < 0.5) comes out `flip`."""
    for seed in range(100):
        torch.manual_seed(seed)
        if bool(torch.rand(()) < 0.5) == flip:
            return seed
    raise AssertionError


def test_hflip_mirrors_image_boxes_and_masks(coco_set) -> None:
    root, expected = coco_set
    plain = _coco(root, "train", hflip=False, with_masks=True)
    flipping = _coco(root, "train", hflip=True, with_masks=True)
    for index in (0, 1, 3):
        image, target = plain[index]
        torch.manual_seed(_flipping_seed(True))
        f_image, f_target = flipping[index]
        width = image.shape[-1]
        torch.testing.assert_close(f_image, image.flip(-1), rtol=0, atol=0)
        objects = expected[target["image_id"]]
        manual = [[width - o["box"][2], o["box"][1], width - o["box"][0], o["box"][3]] for o in objects]
        assert f_target["boxes"].tolist() == manual
        for mask, o in zip(f_target["masks"], objects):
            np.testing.assert_array_equal(mask.numpy(), o["mask"][:, ::-1])
        assert f_target["labels"].tolist() == target["labels"].tolist()
        torch.manual_seed(_flipping_seed(False))
        n_image, n_target = flipping[index]
        assert torch.equal(n_image, image) and torch.equal(n_target["boxes"], target["boxes"])
    # the flipped polygon rectangle: its mask's tight box is the flipped box
    torch.manual_seed(_flipping_seed(True))
    _, f_target = flipping[0]
    assert mask_boxes(f_target["masks"][:1]).tolist() == f_target["boxes"][:1].tolist()


def test_coco_2017_layout_under_root(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    smooth_jpeg(tmp_path / "val2017" / "000000000001.jpg", 32, 24, seed=0)
    data = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 32, "height": 24}],
        # no annotation ids, no iscrowd, no area: filled in (COCOeval reads all three)
        "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1.5, 2.0, 10.25, 8.0]}],
        "categories": [{"id": 1, "name": "person"}],
    }
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = build_detection_dataset("val", name="coco", root=str(tmp_path))
    _, target = ds[0]
    assert target["boxes"].tolist() == [[1.5, 2.0, 11.75, 10.0]] and target["area"].tolist() == [82.0]
    gt = ds.coco.loadAnns(ds.coco.getAnnIds())[0]
    assert gt["id"] == 1 and gt["iscrowd"] == 0 and gt["area"] == 82.0
    with pytest.raises(DataError, match=r"instances_train2017.json does not exist; .*annotations holds: "):
        build_detection_dataset("train", name="coco", root=str(tmp_path))


def test_coco_errors(coco_set, tmp_path: Path) -> None:
    root, _ = coco_set
    paths = _paths(root)
    with pytest.raises(DataError, match=r"root is None and val_ann / val_images are not both set"):
        build_detection_dataset("val", name="coco")
    with pytest.raises(DataError, match=r"The COCO folder .*nowhere does not exist.*fix root"):
        build_detection_dataset("val", name="coco", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"annotation file .*missing.json does not exist.*set val_ann"):
        build_detection_dataset("val", name="coco", **{**paths, "val_ann": str(root / "missing.json")})
    with pytest.raises(DataError, match=r"image folder .*no_images does not exist.*set val_images"):
        build_detection_dataset("val", name="coco", **{**paths, "val_images": str(root / "no_images")})
    with pytest.raises(DataError, match=r"holds none of the first 7 images"):
        build_detection_dataset("val", name="coco", **{**paths, "val_images": str(tmp_path)})

    # relative paths are taken under root
    ds = build_detection_dataset("val", name="coco", root=str(root), val_ann="ann.json", val_images="images")
    assert len(ds) == 7

    data = json.loads((root / "ann.json").read_text())
    cases = {
        "not json": (b"\x89PNG this is not json", r"is not json"),
        "list": (json.dumps([1, 2]).encode(), r"json but not COCO annotations: it lacks images, annotations"),
        "no bbox": (
            json.dumps({**data, "annotations": [{"image_id": 10, "category_id": 3}]}).encode(),
            r"every annotation needs 'bbox' \[x, y, width, height\]",
        ),
        "unknown category": (
            json.dumps({**data, "categories": [c for c in data["categories"] if c["id"] != 7]}).encode(),
            r"2 annotation\(s\) use category id\(s\) 7 that 'categories' does not list \(it lists 3, 5, 9\)",
        ),
        "unknown image": (
            json.dumps({**data, "images": [i for i in data["images"] if i["id"] != 10]}).encode(),
            r"refer to image id\(s\) 10 that 'images' does not list",
        ),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_bytes(content)
        with pytest.raises(DataError, match=message) as info:
            build_detection_dataset("val", name="coco", **{**paths, "val_ann": str(bad)})
        assert "`" not in str(info.value)  # argument names render bare (the engine maps them to keys)

    broken_rle = {
        **data,
        "annotations": [{**a, "segmentation": {"size": [1, 1], "counts": "0"}} for a in data["annotations"]],
    }
    (tmp_path / "rle.json").write_text(json.dumps(broken_rle))
    with pytest.raises(
        DataError, match=r"with_masks=True needs a 'segmentation' .* of the image's size 48x64"
    ):
        build_detection_dataset(
            "val", name="coco", with_masks=True, **{**paths, "val_ann": str(tmp_path / "rle.json")}
        )


def test_on_bad_file_error_names_the_file(coco_set) -> None:
    ds = _coco(coco_set[0], on_bad_file="error")
    with pytest.raises(DataError, match=r"Cannot read image file .*0050.jpg .*on_bad_file=error"):
        ds[4]


def test_detection_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"Unknown detection data option\(s\) crop_size"):
        build_detection_dataset("val", crop_size=3)
    with pytest.raises(ConfigError, match=r"Unknown detection data set name='voc'"):
        build_detection_dataset("val", name="voc")
    with pytest.raises(ConfigError, match=r"min_size=900 and max_size=800"):
        DetectionDataOptions(min_size=900, max_size=800).validate()
    with pytest.raises(ConfigError, match=r"between 1 and 10"):
        build_detection_dataset("val", num_classes=11, num_val_images=2)


# -- the built-in detection set -------------------------------------------------------------------------


def _builtin(split: str = "val", **kw):
    return build_detection_dataset(split, **{"name": "builtin_detection", "num_val_images": 12, **kw})


def test_builtin_detection_is_deterministic() -> None:
    a, b = _builtin(with_masks=True), _builtin(with_masks=True)
    state = torch.get_rng_state()
    for index in range(len(a)):
        (xa, ta), (xb, tb) = a[index], b[index]
        assert torch.equal(xa, xb) and xa.shape == (3, 128, 128) and xa.dtype == torch.float32
        assert all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "masks", "area"))
    assert torch.equal(torch.get_rng_state(), state)  # generation never draws from the global RNG
    other = build_detection_dataset("train", name="builtin_detection", num_train_images=12, hflip=False)
    assert not torch.equal(a[0][0], other[0][0])  # splits differ


def test_builtin_detection_boxes_are_tight_and_sizes_varied() -> None:
    ds = _builtin(with_masks=True, num_val_images=40)
    counts, extents = [], []
    for index in range(len(ds)):
        _, target = ds[index]
        counts.append(len(target["labels"]))
        for box, mask, area in zip(target["boxes"], target["masks"], target["area"]):
            assert box.tolist() == tight_xyxy(mask.numpy())
            assert area == mask.sum()
            extents.append(max(box[2] - box[0], box[3] - box[1]))
        union = target["masks"].sum(0)
        assert union.max() <= 1  # objects never overlap
        assert target["labels"].min() >= 1 and target["labels"].max() <= 6
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) >= 3
    assert min(extents) >= 8 and max(extents) <= 66
    assert min(extents) < 32 < max(extents)  # small and medium objects


def test_builtin_detection_coco_ground_truth_matches_the_items() -> None:
    ds = _builtin(with_masks=True)
    gt = ds.coco
    assert sorted(gt.getImgIds()) == ds.image_ids.tolist()
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == ds.classes
    for index in range(len(ds)):
        _, target = ds[index]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[target["image_id"]]))
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert xyxy == target["boxes"].tolist()
        assert [ds.label_to_category[int(label)] for label in target["labels"]] == [
            a["category_id"] for a in anns
        ]
        assert [a["area"] for a in anns] == target["area"].tolist()
        for a, mask in zip(anns, target["masks"]):
            np.testing.assert_array_equal(mask_utils.decode(gt.annToRLE(a)), mask.numpy())


def test_builtin_detection_flip_follows_the_seed() -> None:
    ds = _builtin("train", num_train_images=4, with_masks=True)
    plain = _builtin("train", num_train_images=4, with_masks=True, hflip=False)
    image, target = plain[1]
    torch.manual_seed(_flipping_seed(True))
    f_image, f_target = ds[1]
    assert torch.equal(f_image, image.flip(-1)) and torch.equal(f_target["masks"], target["masks"].flip(-1))
    assert f_target["boxes"].tolist() == mask_boxes(target["masks"].flip(-1)).tolist()


def test_data_package_imports_without_pycocotools() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["pycocotools"] = None  # importing it now raises ImportError
        from polyscale import data
        image, label = data.build_dataset("val", name="builtin", num_val_samples=2, image_size=16)[0]
        from polyscale.errors import ConfigError
        try:
            data.build_detection_dataset("val", num_val_images=2).coco
        except ConfigError as err:
            print("error:", err)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "install it (pip install pycocotools)" in done.stdout
