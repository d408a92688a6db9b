"""Classification: the PSConv paper's Tables 1-6 and section 4.2 (ECCV 2020) and the PyConv README.

A *run* (architecture + conv + recipe) can fill cells of
several tables: the ResNet-50 baseline appears in PSConv Tables 1-4, the default PS-ResNet-50 in
Tables 1, 2, 4 and 5, and Table 3's t = 2 is Table 4's {1,2,1,2} (the paper prints the same numbers).
Table 3's t = 4 ({1,1,1,2}: one slot of 2, the rest 1) equals Table 4's {1,2,1,1} up to a cyclic
relabelling of the channel partitions, yet the paper prints different numbers (21.476 vs 22.368 top-1
error): they stay two runs, whose gap doubles as a measure of run-to-run noise.
"""

from __future__ import annotations

from polyscale.paper_results.types import Cell, Recipe, Run, Table

__all__ = ["PRESETS", "RECIPES", "SWEEP_BASES", "TABLES", "UNPUBLISHED"]


_COMMON = {"optim.name": "sgd", "optim.momentum": 0.9, "optim.nesterov": False, "data.auto_augment": None}
_COMMON |= {"trainer.label_smoothing": 0.0, "trainer.mixup_alpha": 0.0, "model.drop_rate": 0.0}
_IMAGENET = {"data.name": "imagenet", "data.image_size": 224, "data.crop_ratio": 0.875}
_IMAGENET |= {"data.rrc_scale": [0.08, 1.0], "data.hflip": True}
_COSINE = {"schedule.name": "cosine", "schedule.min_lr": 0.0, "schedule.warmup_epochs": 0.0}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "psconv_imagenet",
            "PSConv section 4.1: SGD, batch 256, lr 0.1 -> 0 on a half cosine, 120 epochs, best epoch",
            _COMMON
            | _IMAGENET
            | _COSINE
            | {"data.batch_size": 256, "optim.lr": 0.1}
            | {"optim.weight_decay": 1e-4, "trainer.epochs": 120, "trainer.cutmix_alpha": 0.0},
        ),
        Recipe(
            "resnext_cifar",
            "ResNeXt paper's CIFAR regime (PSConv section 4.2): batch 128, lr 0.1 x0.1 at 150/225 of 300",
            _COMMON
            | {"data.name": "cifar100", "data.image_size": 32, "data.random_crop_padding": 4}
            | {"data.hflip": True, "data.batch_size": 128, "optim.lr": 0.1, "optim.weight_decay": 5e-4}
            | {"schedule.name": "step", "schedule.milestones": [150, 225], "schedule.gamma": 0.1}
            | {"schedule.warmup_epochs": 0.0, "trainer.epochs": 300, "trainer.cutmix_alpha": 0.0},
        ),
        Recipe(
            "pyconv_imagenet",
            "PyConv code: batch 256, lr 0.1 x0.1 at epochs 30/60/80 of 90",
            _COMMON
            | _IMAGENET
            | {"data.batch_size": 256, "optim.lr": 0.1, "optim.weight_decay": 1e-4}
            | {"schedule.name": "step", "schedule.milestones": [30, 60, 80], "schedule.gamma": 0.1}
            | {"schedule.warmup_epochs": 0.0, "trainer.epochs": 90, "trainer.cutmix_alpha": 0.0},
        ),
        Recipe(
            "pyconv_augment",
            "PyConv README '+augment': CutMix, batch 1024, lr 0.4, 300 epochs cosine, mixed precision",
            _COMMON
            | _IMAGENET
            | _COSINE
            | {"data.batch_size": 1024, "optim.lr": 0.4}
            | {"optim.weight_decay": 1e-4, "trainer.epochs": 300, "trainer.cutmix_alpha": 1.0}
            | {"trainer.mix_prob": 1.0},
        ),
    )
}


def _ps(pattern: tuple[int, ...] = (1, 2, 1, 4), axes: str = "both", model: str = "resnet50") -> Run:
    return Run(model, "psconv", "psconv_imagenet", pattern, axes)


R50, PS_R50 = Run("resnet50", "standard", "psconv_imagenet"), _ps()
T2, T4, T8 = _ps((1, 2)), _ps((1, 1, 1, 2)), _ps((1,) * 7 + (2,))
# Dynamic PSConv (section 4.2): `pattern` holds its (small, large) dilation rates.
DYNAMIC_R50 = Run("resnet50", "dynamic_psconv", "psconv_imagenet", (1, 2))

_T1 = {  # architecture: (label, standard top-1/top-5, PSConv top-1/top-5)
    "resnet50": ("ResNet-50", (22.850, 6.532), (21.126, 5.724)),
    "resnet101": ("ResNet-101", (21.102, 5.696), (19.954, 5.052)),
    "resnext50_32x4d": ("ResNeXt-50 (32x4d)", (21.802, 6.084), (20.378, 5.296)),
    "resnext101_32x4d": ("ResNeXt-101 (32x4d)", (20.502, 5.390), (19.498, 4.724)),
    "seresnet50": ("SE-ResNet-50", (22.192, 6.040), (20.814, 5.578)),
    "seresnet101": ("SE-ResNet-101", (20.732, 5.406), (19.786, 4.924)),
}
_T2_OTHERS = (  # published only: (network, params, GFLOPs, schedule, top-1, top-5)
    ("DRN-A-50", "25.557M", "19.079", "stepwise (120 epoch)", 22.9, 6.6),
    ("DRN-D-54", "35.809M", "28.487", "stepwise (120 epoch)", 21.2, 5.9),
    ("FishNet-150", "24.96M", "6.45", "stepwise (100 epoch)", 21.86, 6.05),
    ("FishNet-150", "24.96M", "6.45", "cosine (200 epoch) w/ label smoothing", 20.65, 5.25),
    ("HRNet-W18-C", "21.3M", "3.99", "stepwise (100 epoch)", 23.2, 6.6),
    ("OctResNet-50 (alpha = 0.5)", "25.6M", "2.4", "cosine (110 epoch)", 22.6, 6.4),
    ("bL-ResNet-50 (alpha = 2, beta = 4)", "26.69M", "2.85", "cosine (110 epoch)", 22.69, None),
    ("Res2Net-50 (26w x 4s)", "25.70M", "4.2", "stepwise (100 epoch)", 22.01, 6.15),
    ("ScaleNet-50", "31.483M", "3.818", "stepwise (100 epoch)", 22.02, 6.05),
)
_PYCONV = {  # network label: (model prefix, conv, top-1 accuracy at 50 / 101 / 152 layers)
    "ResNet": ("resnet", "standard", (76.12, 78.00, 78.45)),
    "PyConvHGResNet": ("pyconvhgresnet", "pyconv", (78.48, 79.22, 79.36)),
    "PyConvResNet": ("pyconvresnet", "pyconv", (77.88, 79.01, 79.52)),
}
_CROPS = ("test crop: 224x224", "test crop: 320x320")


def _cifar(width: str, conv: str) -> Run:
    ps_args = ((1, 2, 1, 4), "both") if conv == "psconv" else ()
    return Run(f"resnext29_{width}", conv, "resnext_cifar", *ps_args)


TABLES: tuple[Table, ...] = (
    Table(
        "psconv_t1",
        "PSConv Table 1",
        "ImageNet val, single center crop, top-1 / top-5 error (%)",
        ("Architecture", "Conv"),
        tuple(
            Cell((label, name), run, *errs)
            for arch, (label, std, ps) in _T1.items()
            for name, run, errs in (
                ("standard", Run(arch, "standard", "psconv_imagenet"), std),
                ("PSConv", _ps(model=arch), ps),
            )
        ),
    ),
    Table(
        "psconv_t2",
        "PSConv Table 2",
        "ImageNet val, multi-scale networks (others: published only)",
        ("Network", "Params", "GFLOPs", "LR decay schedule"),
        (
            Cell(("ResNet-50", "25.557M", "4.089", "cosine (120 epoch)"), R50, 22.850, 6.532),
            Cell(("PS-ResNet-50", "25.557M", "4.089", "cosine (120 epoch)"), PS_R50, 21.126, 5.724),
        )
        + tuple(Cell((n, p, g, s), None, t1, t5) for n, p, g, s, t1, t5 in _T2_OTHERS),
        naming_labels=1,
    ),
    Table(
        "psconv_t3",
        "PSConv Table 3",
        "PS-ResNet-50, cyclic interval t (one slot of 2, the rest 1)",
        ("Architecture", "Cyclic interval"),
        (
            Cell(("ResNet-50", "t = 1 (baseline)"), R50, 22.850, 6.532),
            Cell(("PS-ResNet-50", "t = 2"), T2, 21.948, 5.978),
            Cell(("PS-ResNet-50", "t = 4"), T4, 21.476, 5.720),
            Cell(("PS-ResNet-50", "t = 8"), T8, 21.634, 5.816),
        ),
    ),
    Table(
        "psconv_t4",
        "PSConv Table 4",
        "PS-ResNet-50, dilation pattern (t = 4)",
        ("Dilation pattern",),
        (
            Cell(("{1, 1, 1, 1} (baseline)",), R50, 22.850, 6.532),
            Cell(("{1, 2, 1, 1}",), _ps((1, 2, 1, 1)), 22.368, 6.214),
            Cell(("{1, 4, 1, 1}",), _ps((1, 4, 1, 1)), 22.754, 6.470),
            Cell(("{1, 2, 1, 2} (= t = 2)",), T2, 21.948, 5.978),
            Cell(("{1, 2, 1, 4} (default)",), PS_R50, 21.126, 5.724),
        ),
    ),
    Table(
        "psconv_t5",
        "PSConv Table 5",
        "PS-ResNet-50, axes of the kernel lattice the dilation varies along",
        ("Dilation varies along",),
        (
            Cell(("input channel axis only",), _ps(axes="input"), 21.658, 5.832),
            Cell(("output channel axis only",), _ps(axes="output"), 22.056, 6.174),
            Cell(("both axes",), PS_R50, 21.126, 5.724),
        ),
    ),
    Table(
        "psconv_t6",
        "PSConv Table 6",
        "CIFAR-100 test, top-1 error (%), mean +- std over 5 seeds",
        ("Architecture", "Conv"),
        tuple(
            cell
            for width, official, std, ps in (
                ("8x64d", 17.77, (18.074, 0.130), (17.138, 0.286)),
                ("16x64d", 17.31, (17.538, 0.094), (16.528, 0.353)),
            )
            for cell in (
                Cell((f"ResNeXt-29 ({width})", "standard (official)"), None, official),
                Cell(
                    (f"ResNeXt-29 ({width})", "standard (self impl.)"),
                    _cifar(width, "standard"),
                    std[0],
                    top1_std=std[1],
                ),
                Cell((f"ResNeXt-29 ({width})", "PSConv"), _cifar(width, "psconv"), ps[0], top1_std=ps[1]),
            )
        ),
        seeds=5,
    ),
    Table(
        "pyconv",
        "PyConv README",
        "ImageNet val top-1 accuracy (%), default training settings",
        ("Network", "Depth"),
        tuple(
            Cell((net, f"{depth}-layers"), Run(f"{prefix}{depth}", conv, "pyconv_imagenet"), acc)
            for net, (prefix, conv, accs) in _PYCONV.items()
            for depth, acc in zip((50, 101, 152), accs)
        ),
        unit="accuracy",
        layout="grid",
        decimals=2,
    ),
    Table(
        "pyconv_augment",
        "PyConv README (+augment)",
        "ImageNet val top-1 accuracy (%), CutMix recipe",
        ("Network", "Test crop"),
        tuple(
            Cell(
                (f"PyConvResNet-{depth} (+augment)", label),
                Run(f"pyconvresnet{depth}", "pyconv", "pyconv_augment"),
                acc,
                crop=crop,
            )
            for depth, accs in ((50, (79.44, 80.59)), (101, (80.58, 81.49)))
            for label, crop, acc in zip(_CROPS, (None, 320), accs)
        ),
        unit="accuracy",
        layout="grid",
        decimals=2,
    ),
    Table(
        "psconv_dynamic",
        "PSConv section 4.2",
        "Dynamic PS-ResNet-50: a learned binary mask picks dilation 1 or 2 per kernel; ImageNet val err (%)",
        ("Network",),
        (
            Cell(("ResNet-50 (baseline)",), R50, 22.850, 6.532),
            Cell(("PS-ResNet-50 (static {1, 2, 1, 4})",), PS_R50, 21.126, 5.724),
            Cell(("Dynamic PS-ResNet-50 (rates 1, 2)",), DYNAMIC_R50, 21.138),
        ),
    ),
)


def _preset_names() -> dict[str, Run]:
    presets = {f"psconv_t1_{run.model_config}": run for run in (c.run for c in TABLES[0].cells)}
    presets |= {"psconv_t3_t2": T2, "psconv_t3_t4": T4, "psconv_t3_t8": T8}
    presets |= {"psconv_t4_1211": _ps((1, 2, 1, 1)), "psconv_t4_1411": _ps((1, 4, 1, 1))}
    presets |= {"psconv_t5_input": _ps(axes="input"), "psconv_t5_output": _ps(axes="output")}
    for table, prefix in ((TABLES[5], "psconv_t6_"), (TABLES[6], "pyconv_"), (TABLES[7], "pyconv_aug_")):
        presets |= {prefix + c.run.model_config: c.run for c in table.cells if c.run is not None}
    return presets | {"psconv_dynamic_ps_resnet50": DYNAMIC_R50}


PRESETS: dict[str, Run] = _preset_names()  # experiment=NAME -> the run it trains
SWEEP_BASES: dict[str, Run] = {"psconv_ablation": PS_R50}  # bases of the Tables 3-5 multirun lines
# Presets of combinations no paper reports: dynamic PSConv on CIFAR-100 (compare with Table 6's PSConv).
UNPUBLISHED: dict[str, Run] = {
    "psconv_dynamic_cifar": Run("resnext29_8x64d", "dynamic_psconv", "resnext_cifar", (1, 2)),
}
