"""Detection: the PSConv paper's Table 7 (Mask R-CNN on COCO) and the SEPC paper's Tables 1 and 4.

Values are COCO val2017 (minival) percentages under the keys of our results.json (bbox_AP, bbox_AP50,
..., segm_APl). Rows whose detector torchvision lacks (Cascade Mask R-CNN, FSAF, HTC) are published
only. SEPC Table 1 also prints each head's FLOPs (800x1333 input) and latency on the authors' GPU:
they are labels here, measured by scripts/sepc_cost.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from polyscale.paper_results.types import Cell, Recipe, Run, Table

__all__ = ["PRESETS", "RECIPES", "TABLES", "UNPUBLISHED"]

_BOX = tuple(f"bbox_{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
_MASK = tuple(f"segm_{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl"))

# mmdetection's 1x (NOTES "Detection facts"): SGD momentum 0.9, wd 1e-4, x0.1 at epochs 8 and 11 of 12,
# 500-iteration linear warm-up from 1/3, shorter side 800 (longer at most 1333), flip 0.5, gradient
# clipping at 35 (mmdetection 1.x's configs, which both papers used).
_1X = {"task.name": "detection", "data.name": "coco", "data.min_size": 800, "data.max_size": 1333}
_1X |= {"data.hflip": True, "optim.name": "sgd", "optim.momentum": 0.9, "optim.nesterov": False}
_1X |= {"optim.weight_decay": 1e-4, "schedule.name": "step", "schedule.milestones": [8, 11]}
_1X |= {"schedule.gamma": 0.1, "schedule.warmup_steps": 500, "schedule.warmup_start_factor": 1 / 3}
_1X |= {"trainer.epochs": 12, "trainer.clip_grad_norm": 35.0, "trainer.precision": "fp32"}
_1X |= {"detector.fpn_channels": 256}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "mmdet_1x",
            "PSConv section 4.3: mmdetection's 1x, 16 images per step (2 per GPU x 8), lr 0.02",
            _1X | {"data.batch_size": 16, "optim.lr": 0.02},
            task="detection",
        ),
        Recipe(
            "sepc_1x",
            "SEPC section 5: 1x with 4 images per GPU x 8 (32 per step), lr 0.01, gradient clip 35",
            _1X | {"data.batch_size": 32, "optim.lr": 0.01},
            task="detection",
        ),
    )
}


def _values(keys: Sequence[str], numbers: Sequence[float]) -> dict[str, float]:
    return dict(zip(keys, numbers, strict=True))


_T7 = {  # architecture: (label, (standard box + mask row, PSConv row), Mask R-CNN then Cascade Mask R-CNN)
    "resnet50": (
        "R50",
        (37.3, 59.0, 40.2, 21.9, 40.9, 48.1, 34.2, 55.9, 36.2, 15.8, 36.9, 50.1),
        (39.4, 61.3, 42.8, 24.1, 43.1, 51.3, 35.6, 57.9, 37.9, 17.2, 38.4, 52.4),
        (41.2, 59.1, 45.1, 23.3, 44.5, 54.5, 35.7, 56.3, 38.6, 16.4, 38.2, 52.6),
        (42.9, 61.7, 46.9, 24.2, 46.5, 57.2, 36.9, 58.4, 39.5, 17.1, 39.4, 54.6),
    ),
    "resnet101": (
        "R101",
        (39.4, 60.9, 43.3, 23.0, 43.7, 51.4, 35.9, 57.7, 38.4, 16.8, 39.1, 53.6),
        (41.6, 63.4, 45.1, 24.7, 45.6, 54.4, 37.4, 60.0, 39.8, 17.8, 40.4, 55.1),
        (42.6, 60.7, 46.7, 23.8, 46.4, 56.9, 37.0, 58.0, 39.9, 16.7, 40.3, 54.6),
        (44.6, 63.2, 48.6, 25.9, 48.7, 59.6, 38.4, 60.5, 41.2, 18.6, 41.5, 56.8),
    ),
    "resnext101_32x4d": (
        "X101-32x4d",
        (41.1, 62.8, 45.0, 24.0, 45.4, 52.6, 37.1, 59.4, 39.7, 17.7, 40.5, 53.8),
        (42.4, 64.4, 46.1, 25.4, 46.5, 55.7, 38.0, 60.8, 40.5, 18.6, 41.0, 55.8),
        (44.4, 62.6, 48.6, 25.4, 48.1, 58.7, 38.2, 59.6, 41.2, 18.3, 41.4, 55.6),
        (45.3, 64.2, 49.5, 27.0, 49.2, 60.0, 38.9, 61.1, 41.8, 19.4, 41.9, 56.6),
    ),
}


def _t7_run(arch: str, conv: str) -> Run:
    ps_args = ((1, 2, 1, 4), "both") if conv == "psconv" else ()
    return Run(arch, conv, "mmdet_1x", *ps_args, detector="mask_rcnn")  # type: ignore[misc]


_SEPC_HEADS = {  # SEPC Table 1's "Note" column -> detector.head
    "baseline": "standard",
    "DCN head": "dcn",
    "PConv": "pconv",
    "PConv+iBN": "pconv_ibn",
    "SEPC": "sepc",
    "SEPC-lite": "sepc_lite",
}
_SEPC_T1 = {  # detector label: (detector kind or None, {note: (FLOPs G, time ms, AP .. APl)})
    "RetinaNet": (
        "retinanet",
        {
            "baseline": ("239.32", "73.2", (35.7, 55.0, 38.5, 18.9, 38.9, 46.3)),
            "DCN head": ("249.55", "102.1", (36.8, 56.8, 39.6, 20.4, 40.3, 49.0)),
            "PConv": ("239.29", "76.5", (37.0, 57.7, 39.4, 22.3, 40.8, 48.9)),
            "PConv+iBN": ("239.36", "76.4", (37.9, 59.3, 40.6, 22.5, 42.2, 49.1)),
            "SEPC": ("242.22", "89.6", (39.7, 60.4, 42.7, 23.1, 44.0, 52.2)),
            "SEPC-lite": ("240", "78.5", (38.8, 59.9, 41.8, 22.6, 42.8, 51.0)),
        },
    ),
    "FSAF": (
        None,
        {
            "baseline": ("205.2", "62.4", (36.9, 56.1, 39.0, 20.6, 40.1, 48.2)),
            "DCN head": ("215.42", "85.2", (40.1, 58.5, 42.8, 22.4, 43.3, 54.7)),
            "PConv": ("205.18", "66.0", (38.7, 58.9, 41.1, 22.2, 42.0, 51.0)),
            "PConv+iBN": ("205.25", "66.1", (38.9, 59.1, 41.8, 22.2, 42.5, 51.0)),
            "SEPC": ("208.11", "77.4", (41.3, 60.4, 43.6, 23.0, 44.8, 57.8)),
            "SEPC-lite": ("205.88", "68.2", (40.7, 60.0, 43.4, 22.4, 44.6, 55.1)),
        },
    ),
    "FreeAnchor": (
        "free_anchor",
        {
            "baseline": ("239.32", "76.4", (38.5, 57.3, 41.2, 21.1, 41.8, 51.5)),
            "DCN head": ("249.55", "100.4", (39.4, 58.0, 42.4, 21.7, 43.0, 52.7)),
            "PConv": ("239.29", "79.4", (40.0, 59.1, 43.0, 22.8, 43.8, 53.3)),
            "PConv+iBN": ("239.36", "79.7", (41.2, 60.5, 44.3, 24.3, 44.6, 54.6)),
            "SEPC": ("242.22", "89.9", (42.8, 61.9, 45.9, 25.6, 46.4, 57.4)),
            "SEPC-lite": ("240", "81.2", (41.7, 61.0, 45.1, 24.2, 45.2, 54.8)),
        },
    ),
}
# The paper does not say how many PConv modules follow the FPN in its two-stage detectors; 4, as in
# its single-stage head's stack.
NECK_PCONV = 4
_SEPC_T4 = {  # detector label: (detector kind or None, baseline AP/AP50/AP75, PConv AP/AP50/AP75)
    "Faster": ("faster_rcnn", (36.5, 58.4, 39.1), (38.5, 59.9, 41.4)),
    "Mask": ("mask_rcnn", (37.3, 59.0, 40.2), (39.6, 60.1, 43.5)),
    "HTC": (None, (42.1, 60.8, 45.9), (43.6, 62.0, 47.4)),
}


def _sepc_run(detector: str | None, head: str = "standard", neck_pconv: int = 0) -> Run | None:
    if detector is None:
        return None
    return Run("resnet50", "standard", "sepc_1x", detector=detector, head=head, neck_pconv=neck_pconv)


TABLES: tuple[Table, ...] = (
    Table(
        "psconv_t7",
        "PSConv Table 7",
        "COCO val2017, FPN, 1x: box and mask AP (%); Cascade Mask R-CNN: published only",
        ("Detector", "Architecture", "Conv"),
        tuple(
            Cell((detector, label, conv_label), run, values=_values(_BOX + _MASK, numbers))
            for detector, rows in (("Mask R-CNN", (0, 1)), ("Cascade Mask R-CNN", (2, 3)))
            for arch, (label, *numbers_by_row) in _T7.items()
            for conv, conv_label, numbers in (
                ("standard", "standard", numbers_by_row[rows[0]]),
                ("psconv", "PSConv", numbers_by_row[rows[1]]),
            )
            for run in (_t7_run(arch, conv) if detector == "Mask R-CNN" else None,)
        ),
        unit="AP",
        decimals=1,
        metrics=("bbox_AP", "segm_AP"),
    ),
    Table(
        "sepc_t1",
        "SEPC Table 1",
        "COCO minival, ResNet-50, 1x: box AP (%); FLOPs at 800x1333 and time as published; FSAF: "
        "published only",
        ("Detector", "Head", "FLOPs (G)", "Time (ms)"),
        tuple(
            Cell((label, note, flops, ms), _sepc_run(kind, _SEPC_HEADS[note]), values=_values(_BOX, ap))
            for label, (kind, rows) in _SEPC_T1.items()
            for note, (flops, ms, ap) in rows.items()
        ),
        unit="AP",
        decimals=1,
        naming_labels=2,
        metrics=_BOX,
    ),
    Table(
        "sepc_t4",
        "SEPC Table 4",
        f"COCO minival, ResNet-50, 1x: box AP (%) without and with {NECK_PCONV} PConv after the FPN; "
        "HTC: published only",
        ("Detector", "Note"),
        tuple(
            Cell((label, note), _sepc_run(kind, neck_pconv=neck), values=_values(_BOX[:3], ap))
            for label, (kind, baseline, pconv) in _SEPC_T4.items()
            for note, neck, ap in (("Baseline", 0, baseline), ("PConv", NECK_PCONV, pconv))
        ),
        unit="AP",
        decimals=1,
        metrics=_BOX[:3],
    ),
)


def _preset_names() -> dict[str, Run]:
    presets = {
        f"psconv_t7_mask_rcnn_{c.run.model_config}": c.run for c in TABLES[0].cells if c.run is not None
    }
    for c in (c for c in TABLES[1].cells if c.run is not None):
        presets[f"sepc_t1_{c.run.detector}_{'baseline' if c.run.head == 'standard' else c.run.head}"] = c.run
    for c in (c for c in TABLES[2].cells if c.run is not None):
        presets[f"sepc_t4_{c.run.detector}_{'pconv' if c.run.neck_pconv else 'baseline'}"] = c.run
    return presets


PRESETS: dict[str, Run] = _preset_names()  # experiment=NAME -> the run it trains
# Presets of combinations no paper reports (new: a PS-ResNet-50 backbone under FreeAnchor + SEPC).
UNPUBLISHED: dict[str, Run] = {
    "sepc_free_anchor_sepc_ps_resnet50": Run(
        "resnet50", "psconv", "sepc_1x", (1, 2, 1, 4), "both", detector="free_anchor", head="sepc"
    ),
}
