"""CocoEvaluator: COCO result conversion and pycocotools' AP on hand-made detections with known answers."""

from __future__ import annotations

import contextlib
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from polyscale.detection import CocoEvaluator, contiguous_category_map
from polyscale.errors import ConfigError, DataError

H, W = 128, 160  # every test image
LABEL_TO_CAT = {1: 1, 2: 3}  # detector labels 1..2 -> COCO category ids with a gap, as COCO's own


def _mask(box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _coco(gt: dict[int, list[tuple[tuple[int, int, int, int], int]]]) -> COCO:
    """Ground truth: image id -> [(xyxy box, category id)]; masks fill the boxes (stored as RLE)."""
    images, anns = [], []
    for image_id, objects in gt.items():
        images.append({"id": image_id, "width": W, "height": H})
        for box, cat in objects:
            x0, y0, x1, y1 = box
            rle = mask_util.encode(np.asfortranarray(_mask(box)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}, {"id": 3}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _output(dets: list[tuple[tuple[int, int, int, int], float, int]]) -> dict[str, torch.Tensor]:
    """A detector's eval output for one image: [(xyxy box, score, label)], masks filling the boxes."""
    boxes = torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4)
    masks = torch.from_numpy(np.stack([_mask(d[0]) for d in dets])) if dets else torch.zeros(0, H, W)
    return {
        "boxes": boxes,
        "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
        "labels": torch.tensor([d[2] for d in dets], dtype=torch.int64),
        "masks": masks.float()[:, None] * 0.9,  # (N, 1, H, W) probabilities, above the 0.5 threshold
    }


SMALL, MEDIUM, LARGE = (4, 4, 24, 24), (30, 30, 70, 70), (10, 20, 130, 120)  # areas 400, 1600, 12000
# Image 1: one object of each size; image 2: one medium object of the other class; image 3: no objects.
GT = {1: [(SMALL, 1), (MEDIUM, 1), (LARGE, 3)], 2: [((80, 40, 120, 90), 3)], 3: []}


def test_perfect_detections_score_100_for_boxes_and_masks():
    evaluator = CocoEvaluator(_coco(GT), LABEL_TO_CAT, iou_types=("bbox", "segm"))
    cat_to_label = {c: label for label, c in LABEL_TO_CAT.items()}
    for image_id, objects in GT.items():
        dets = [(box, 0.9, cat_to_label[cat]) for box, cat in objects]
        evaluator.update([_output(dets)], [image_id])
    metrics = evaluator.compute(expected_images=3)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(100.0), (iou_type, name)
    assert metrics["num_images"] == 3


def _two_of_four_found():
    """Four medium GT boxes of one class on two images; the two on image 1 are found exactly (scores .9,
    .8), image 2 gets two false positives away from its objects (scores .5, .4)."""
    a, b, c, d = (10, 10, 50, 50), (60, 10, 100, 50), (10, 60, 50, 100), (60, 60, 100, 100)
    coco = _coco({1: [(a, 1), (b, 1)], 2: [(c, 1), (d, 1)]})
    outputs = {1: [(a, 0.9, 1), (b, 0.8, 1)], 2: [(a, 0.5, 1), (b, 0.4, 1)]}
    return coco, outputs


# Ranked by score: TP, TP, FP, FP over 4 GT -> recall .25 .5 .5 .5, precision 1 1 2/3 1/2. The interpolated
# precision is 1 up to recall .5 and recall never passes .5, so of the 101 recall points 0, .01, ..., 1
# the 51 points 0..0.50 score 1 and the other 50 score 0. All matches have IoU 1: equal at every IoU.
HALF_FOUND_AP = 100.0 * 51 / 101


def test_half_the_objects_found_gives_the_101_point_ap_worked_out_by_hand():
    coco, outputs = _two_of_four_found()
    evaluator = CocoEvaluator(coco, LABEL_TO_CAT, iou_types=("bbox", "segm"))
    for image_id, dets in outputs.items():
        evaluator.update([_output(dets)], [image_id])
    metrics = evaluator.compute()
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APm"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(HALF_FOUND_AP), (iou_type, name)
        # no small or large objects: pycocotools leaves those undefined (-1)
        assert metrics[f"{iou_type}_APs"] == -1.0
        assert metrics[f"{iou_type}_APl"] == -1.0


def test_false_positive_between_hits_gives_the_interpolated_ap():
    # 2 GT; ranked TP (.9), FP (.8), TP (.7): recall .5 .5 1, precision 1 1/2 2/3 -> interpolated 1 up to
    # recall .5 (51 points) and 2/3 above it (50 points): AP = (51 + 50 * 2/3) / 101.
    a, b = (10, 10, 50, 50), (60, 60, 100, 100)
    evaluator = CocoEvaluator(_coco({1: [(a, 1), (b, 1)]}), LABEL_TO_CAT)
    evaluator.update([_output([(a, 0.9, 1), ((100, 10, 140, 50), 0.8, 1), (b, 0.7, 1)])], [1])
    assert evaluator.compute()["bbox_AP"] == pytest.approx(100.0 * (51 + 50 * 2 / 3) / 101)


def test_no_detections_score_zero():
    evaluator = CocoEvaluator(_coco(GT), LABEL_TO_CAT, iou_types=("bbox", "segm"))
    evaluator.update([_output([]), _output([]), _output([])], torch.tensor([1, 2, 3]))
    metrics = evaluator.compute(expected_images=3)
    for key in ("bbox_AP", "bbox_AP50", "bbox_APs", "segm_AP", "segm_APl"):
        assert metrics[key] == 0.0, key


def test_only_the_images_seen_are_evaluated():
    # a partial pass (limit_val_batches) over image 1 only: image 2's objects are not counted as missed
    a, b = (10, 10, 50, 50), (60, 60, 100, 100)
    evaluator = CocoEvaluator(_coco({1: [(a, 1)], 2: [(b, 1)]}), LABEL_TO_CAT)
    evaluator.update([_output([(a, 0.9, 1)])], [1])
    assert evaluator.compute()["bbox_AP"] == pytest.approx(100.0)


def test_false_positive_on_an_image_without_objects_counts():
    a = (10, 10, 50, 50)
    evaluator = CocoEvaluator(_coco({1: [(a, 1)], 2: []}), LABEL_TO_CAT)
    evaluator.update([_output([(a, 0.5, 1)]), _output([(a, 0.9, 1)])], [1, 2])
    # ranked FP (.9), TP (.5): precision 0, 1/2 at recall 0, 1 -> interpolated 1/2 everywhere
    assert evaluator.compute()["bbox_AP"] == pytest.approx(50.0)


def _fake_all_gather(world: int):
    """all_gather_object for `world` threads standing in for ranks: each waits for all, gets all."""
    slots: list[object] = [None] * world
    barrier = threading.Barrier(world)

    def for_rank(rank: int):
        def all_gather_object(obj):
            slots[rank] = obj
            barrier.wait(timeout=30)
            return list(slots)

        return all_gather_object

    return for_rank


def test_gather_over_two_ranks_gives_the_single_rank_metrics():
    coco, outputs = _two_of_four_found()
    single = CocoEvaluator(coco, LABEL_TO_CAT, iou_types=("bbox", "segm"))
    for image_id, dets in outputs.items():
        single.update([_output(dets)], [image_id])
    expected = single.compute(expected_images=2)

    ranks = [CocoEvaluator(coco, LABEL_TO_CAT, iou_types=("bbox", "segm")) for _ in range(2)]
    for rank, (image_id, dets) in zip((1, 0), outputs.items()):  # image 1 on rank 1, image 2 on rank 0
        ranks[rank].update([_output(dets)], [image_id])
    gather = _fake_all_gather(2)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda r: ranks[r].gather(gather(r)), range(2)))
    assert ranks[0].image_ids == ranks[1].image_ids == [2, 1]  # rank order
    for evaluator in ranks:
        assert evaluator.compute(expected_images=2) == pytest.approx(expected)


def test_wrong_image_count_raises():
    coco, outputs = _two_of_four_found()
    evaluator = CocoEvaluator(coco, LABEL_TO_CAT)
    evaluator.update([_output(outputs[1])], [1])
    with pytest.raises(DataError, match="saw 1 images, but the validation set has 2"):
        evaluator.compute(expected_images=2)
    evaluator.gather(lambda obj: [obj, obj])  # two ranks that both evaluated image 1
    with pytest.raises(DataError, match=r"images \[1\] more than once"):
        evaluator.compute()


def test_bad_inputs_raise_clear_errors():
    coco, outputs = _two_of_four_found()
    with pytest.raises(ConfigError, match="iou_types"):
        CocoEvaluator(coco, LABEL_TO_CAT, iou_types=("keypoints",))
    with pytest.raises(ConfigError, match=r"category ids \[7\]"):
        CocoEvaluator(coco, {1: 7})
    evaluator = CocoEvaluator(coco, LABEL_TO_CAT, iou_types=("segm",))
    with pytest.raises(ConfigError, match="no masks"):
        evaluator.update([{k: v for k, v in _output(outputs[1]).items() if k != "masks"}], [1])
    with pytest.raises(ConfigError, match="label 5"):
        evaluator.update([_output([((0, 0, 9, 9), 0.5, 5)])], [1])
    evaluator.update([_output(outputs[1])], [99])
    with pytest.raises(DataError, match=r"\[99\] are not in the ground-truth"):
        evaluator.compute()
    with pytest.raises(DataError, match="no images"):
        CocoEvaluator(coco, LABEL_TO_CAT).compute()


def test_pycocotools_output_is_quiet_unless_verbose(capsys):
    coco, outputs = _two_of_four_found()
    quiet = CocoEvaluator(coco, LABEL_TO_CAT)
    quiet.update([_output(outputs[1])], [1])
    quiet.compute()
    assert capsys.readouterr().out == ""
    assert "Average Precision" in quiet.summary_text["bbox"]
    loud = CocoEvaluator(coco, LABEL_TO_CAT, verbose=True)
    loud.update([_output(outputs[1])], [1])
    loud.compute()
    assert "Average Precision" in capsys.readouterr().out


def test_contiguous_category_map_and_sequence_mapping():
    coco, outputs = _two_of_four_found()
    assert contiguous_category_map(coco) == {1: 1, 2: 2, 3: 3}
    by_sequence = CocoEvaluator(coco, [1, 3])  # labels 1..K -> sequence[label - 1]
    by_sequence.update([_output(outputs[1])], [1])
    assert by_sequence.compute()["bbox_AP"] == pytest.approx(100.0)
