"""Experiment presets (configs/experiment/): each composes to the paper's recipe, model and conv and
carries the published numbers; the documented sweeps expand to the right table cells; presets train
two steps on synthetic data; a multirun over two dilation patterns writes two result files."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from polyscale import paper_results
from polyscale.config import register_configs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from script_helpers import load_script  # noqa: E402

# The papers' recipes, written out here independently of polyscale.paper_results:
# data, crop, global batch, lr, weight decay, schedule, milestones, epochs, cutmix alpha, precision.
RECIPES = {
    "psconv_imagenet": ("imagenet", 224, 256, 0.1, 1e-4, "cosine", [], 120, 0.0, "fp32"),
    "resnext_cifar": ("cifar100", 32, 128, 0.1, 5e-4, "step", [150, 225], 300, 0.0, "fp32"),
    "pyconv_imagenet": ("imagenet", 224, 256, 0.1, 1e-4, "step", [30, 60, 80], 90, 0.0, "fp32"),
    "pyconv_augment": ("imagenet", 224, 1024, 0.4, 1e-4, "cosine", [], 300, 1.0, "fp16"),
}
Preset = tuple[str, str, str, list[int] | None, str | None]  # recipe, model, conv, pattern, axes


def _std(recipe: str, *models: str) -> dict[str, Preset]:
    return {m: (recipe, m, "pyconv" if m.startswith("pyconv") else "standard", None, None) for m in models}


def _ps(
    recipe: str, *models: str, pattern: tuple[int, ...] = (1, 2, 1, 4), axes: str = "both"
) -> dict[str, Preset]:
    return {m: (recipe, m, "psconv", list(pattern), axes) for m in models}


_T1 = ("resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d", "seresnet50", "seresnet101")
_T6 = ("resnext29_8x64d", "resnext29_16x64d")
_PYCONV = [
    f"{net}{depth}" for net in ("resnet", "pyconvresnet", "pyconvhgresnet") for depth in (50, 101, 152)
]
PS50 = "ps_resnet50"
PRESETS: dict[str, Preset] = {
    **{f"psconv_t1_{m}": p for m, p in _std("psconv_imagenet", *_T1).items()},
    **{f"psconv_t1_{m}": p for m, p in _ps("psconv_imagenet", *(f"ps_{m}" for m in _T1)).items()},
    "psconv_ablation": _ps("psconv_imagenet", PS50)[PS50],  # base of the Tables 3-5 sweeps
    "psconv_t3_t2": _ps("psconv_imagenet", PS50, pattern=(1, 2))[PS50],  # one slot of 2, the rest 1
    "psconv_t3_t4": _ps("psconv_imagenet", PS50, pattern=(1, 1, 1, 2))[PS50],
    "psconv_t3_t8": _ps("psconv_imagenet", PS50, pattern=(1, 1, 1, 1, 1, 1, 1, 2))[PS50],
    "psconv_t4_1211": _ps("psconv_imagenet", PS50, pattern=(1, 2, 1, 1))[PS50],
    "psconv_t4_1411": _ps("psconv_imagenet", PS50, pattern=(1, 4, 1, 1))[PS50],
    "psconv_t5_input": _ps("psconv_imagenet", PS50, axes="input")[PS50],
    "psconv_t5_output": _ps("psconv_imagenet", PS50, axes="output")[PS50],
    **{f"psconv_t6_{m}": p for m, p in _std("resnext_cifar", *_T6).items()},
    **{f"psconv_t6_{m}": p for m, p in _ps("resnext_cifar", *(f"ps_{m}" for m in _T6)).items()},
    **{f"pyconv_{m}": p for m, p in _std("pyconv_imagenet", *_PYCONV).items()},
    **{f"pyconv_aug_{m}": p for m, p in _std("pyconv_augment", "pyconvresnet50", "pyconvresnet101").items()},
    # Dynamic PSConv (section 4.2): `pattern` holds the two rates the learned mask chooses between.
    "psconv_dynamic_ps_resnet50": ("psconv_imagenet", "resnet50", "dynamic_psconv", [1, 2], None),
    "psconv_dynamic_cifar": ("resnext_cifar", "resnext29_8x64d", "dynamic_psconv", [1, 2], None),
}
# Detection presets (PSConv Table 7, SEPC Tables 1 and 4), written out independently of paper_results:
# recipe -> (global batch, lr); both are mmdetection's 1x otherwise (12 epochs, x0.1 at 8 and 11, 500
# warm-up iterations from 1/3, clip 35, shorter side 800 / longer 1333, flip).
DETECTION_RECIPES = {"mmdet_1x": (16, 0.02), "sepc_1x": (32, 0.01)}
DetectionPreset = tuple[str, str, str, str, str, int]  # recipe, model, conv, detector, head, neck_pconv
_T7_BACKBONES = ("resnet50", "resnet101", "resnext101_32x4d")
_SEPC_HEADS = ("baseline", "dcn", "pconv", "pconv_ibn", "sepc", "sepc_lite")
DETECTION_PRESETS: dict[str, DetectionPreset] = {
    **{
        f"psconv_t7_mask_rcnn_{m}": ("mmdet_1x", m, "standard", "mask_rcnn", "standard", 0)
        for m in _T7_BACKBONES
    },
    **{
        f"psconv_t7_mask_rcnn_ps_{m}": ("mmdet_1x", f"ps_{m}", "psconv", "mask_rcnn", "standard", 0)
        for m in _T7_BACKBONES
    },
    **{
        f"sepc_t1_{det}_{head}": (
            "sepc_1x",
            "resnet50",
            "standard",
            det,
            "standard" if head == "baseline" else head,
            0,
        )
        for det in ("retinanet", "free_anchor")
        for head in _SEPC_HEADS
    },
    **{
        f"sepc_t4_{det}_{note}": ("sepc_1x", "resnet50", "standard", det, "standard", 4 * (note == "pconv"))
        for det in ("faster_rcnn", "mask_rcnn")
        for note in ("baseline", "pconv")
    },
    "sepc_free_anchor_sepc_ps_resnet50": ("sepc_1x", "ps_resnet50", "psconv", "free_anchor", "sepc", 0),
}
SMOKE = shlex.split(  # synthetic data at 32x32, two optimizer steps (small LR: batch 2), one val batch
    "optim.lr=0.001 data=synthetic data.image_size=32 data.batch_size=2 data.num_workers=0 "
    "data.num_train_samples=4 data.num_val_samples=2 data.pin_memory=false data.persistent_workers=false "
    "trainer.epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.progress=false "
    "trainer.device=cpu"
)
# One preset per code path: grouped and SE PSConv, output-axis PSConv, CIFAR ResNeXt, both PyConv
# families, CutMix + fp16 (t = 2 and t = 8: the pattern multirun). All presets run with -m slow.
SMOKE_DEFAULT = shlex.split(
    "psconv_t1_ps_resnext50_32x4d psconv_t1_ps_seresnet50 psconv_t5_output psconv_t6_ps_resnext29_8x64d "
    "pyconv_pyconvhgresnet50 pyconv_aug_pyconvresnet50"
)


@pytest.fixture(scope="module")
def composed() -> Iterator[Any]:
    """composed(*overrides) -> the resolved train config as a plain dict (cached)."""
    register_configs()
    if not OmegaConf.has_resolver("polyscale_stamp"):
        OmegaConf.register_new_resolver("polyscale_stamp", lambda: "stamp")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):

        @functools.cache
        def compose_plain(*overrides: str) -> dict[str, Any]:
            return OmegaConf.to_container(compose("train", list(overrides)), resolve=True)  # type: ignore[return-value]

        yield compose_plain


def test_every_preset_file_is_in_the_settings_table() -> None:
    folder = REPO / "configs" / "experiment"
    assert {p.stem for p in folder.glob("*.yaml")} == set(PRESETS) | set(DETECTION_PRESETS)
    assert {p.stem for p in (folder / "recipe").glob("*.yaml")} == set(RECIPES) | set(DETECTION_RECIPES)
    listed = set(paper_results.PRESETS) | set(paper_results.SWEEP_BASES) | set(paper_results.UNPUBLISHED)
    assert listed == set(PRESETS) | set(DETECTION_PRESETS)


@pytest.mark.parametrize("preset", sorted(DETECTION_PRESETS))
def test_detection_preset_composes_to_the_papers_recipe(composed, preset: str) -> None:
    recipe, model, conv, detector, head, neck_pconv = DETECTION_PRESETS[preset]
    batch, lr = DETECTION_RECIPES[recipe]
    cfg = composed(f"experiment={preset}")
    d, o, s, t, det = cfg["data"], cfg["optim"], cfg["schedule"], cfg["trainer"], cfg["detector"]
    assert cfg["task"]["name"] == "detection" and (cfg["model"]["name"], cfg["model"]["conv"]["name"]) == (
        model,
        conv,
    )
    assert (det["name"], det["head"], det["neck_pconv"], det["fpn_channels"]) == (
        detector,
        head,
        neck_pconv,
        256,
    )
    # the authors' N(0, 0.01) init wherever there are PConvs (the option is an error elsewhere)
    assert det["pconv_init"] == ("he" if head in ("standard", "dcn") and not neck_pconv else "authors")
    # The papers' fine-tuning (stem + stage 1 and every BN frozen) follows from the backbone checkpoint.
    assert (det["trainable_stages"], det["frozen_bn"], cfg["model"]["checkpoint_path"]) == (None, None, None)
    assert (d["name"], d["batch_size"], d["min_size"], d["max_size"], d["hflip"]) == (
        "coco",
        batch,
        800,
        1333,
        True,
    )
    assert (o["name"], o["lr"], o["momentum"], o["weight_decay"], o["nesterov"]) == (
        "sgd",
        lr,
        0.9,
        1e-4,
        False,
    )
    assert (s["name"], s["milestones"], s["gamma"], s["warmup_epochs"]) == ("step", [8, 11], 0.1, 0)
    assert s["warmup_steps"] == 500 and abs(s["warmup_start_factor"] - 1 / 3) < 1e-12
    assert (t["epochs"], t["clip_grad_norm"], t["precision"], t["accum_steps"]) == (12, 35.0, "fp32", 1)


@pytest.mark.parametrize("preset", sorted(DETECTION_PRESETS))
def test_detection_preset_carries_the_published_numbers(composed, preset: str) -> None:
    cfg = composed(f"experiment={preset}")
    assert cfg["experiment_name"] == preset and cfg["notes"] == paper_results.preset_notes(preset)
    run = paper_results.PRESETS.get(preset) or paper_results.UNPUBLISHED[preset]
    header = (REPO / "configs" / "experiment" / f"{preset}.yaml").read_text().split("\ndefaults:")[0]
    cells = paper_results.cells_of(run)
    assert bool(cells) == (preset in paper_results.PRESETS)
    for table, cell in cells:
        assert paper_results.describe(table, cell) in header
    # make_tables places a run of the preset (with an ImageNet backbone) in the preset's cells.
    with_backbone = composed(f"experiment={preset}", "model.checkpoint_path=/ckpt/backbone.pt")
    assert load_script("make_tables").identify_run(with_backbone) == run


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_to_the_papers_recipe(composed, preset: str) -> None:
    cfg = composed(f"experiment={preset}")
    recipe, model, conv, pattern, axes = PRESETS[preset]
    data, crop, batch, lr, wd, schedule, milestones, epochs, cutmix, precision = RECIPES[recipe]
    assert (cfg["model"]["name"], cfg["model"]["conv"]["name"]) == (model, conv)
    if conv == "psconv":
        assert (cfg["model"]["conv"]["dilation_pattern"], cfg["model"]["conv"]["axes"]) == (pattern, axes)
    if conv == "dynamic_psconv":  # the paper's rates, started from the static pattern, no regulariser
        assert (cfg["model"]["conv"]["rates"], cfg["model"]["conv"]["init"]) == (pattern, "static")
        assert cfg["model"]["conv"]["large_fraction_weight"] == 0.0
    if conv == "pyconv":  # PyConvResNet's own per-stage kernels and groups
        assert cfg["model"]["conv"]["kernel_sizes"] is None and cfg["model"]["conv"]["groups"] is None
    d, o, s, t = cfg["data"], cfg["optim"], cfg["schedule"], cfg["trainer"]
    assert (d["name"], d["image_size"], d["batch_size"], d["hflip"]) == (data, crop, batch, True)
    if data == "imagenet":
        assert (d["crop_ratio"], d["rrc_scale"]) == (0.875, [0.08, 1.0])  # val resize 256 / crop 224
        assert (cfg["model"]["num_classes"] or d["num_classes"]) == 1000
    else:
        assert d["random_crop_padding"] == 4 and (cfg["model"]["num_classes"] or d["num_classes"]) == 100
    assert (o["name"], o["lr"], o["weight_decay"]) == ("sgd", lr, wd)
    assert (o["momentum"], o["nesterov"]) == (0.9, False)
    assert (s["name"], s["warmup_epochs"]) == (schedule, 0)
    if schedule == "step":
        assert (s["milestones"], s["gamma"]) == (milestones, 0.1)
    else:  # half cosine to zero
        assert s["min_lr"] == 0.0
    assert (t["epochs"], t["cutmix_alpha"]) == (epochs, cutmix)
    assert (t["mixup_alpha"], t["label_smoothing"]) == (0.0, 0.0)
    assert (t["precision"], t["accum_steps"], cfg["model"]["drop_rate"]) == (precision, 1, 0.0)
    if cutmix:
        assert t["mix_prob"] == 1.0


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - set(paper_results.SWEEP_BASES)))
def test_preset_carries_the_published_numbers_and_maps_back_to_its_cells(composed, preset: str) -> None:
    run = paper_results.PRESETS.get(preset) or paper_results.UNPUBLISHED[preset]
    recipe, model, conv, pattern, axes = PRESETS[preset]
    ps_args = (tuple(pattern), axes) if pattern else ()
    assert run == paper_results.Run(model.removeprefix("ps_"), conv, recipe, *ps_args)
    assert run.model_config == model
    cfg = composed(f"experiment={preset}")
    assert cfg["experiment_name"] == preset and cfg["notes"] == paper_results.preset_notes(preset)
    header = (REPO / "configs" / "experiment" / f"{preset}.yaml").read_text().split("\ndefaults:")[0]
    cells = paper_results.cells_of(run)
    assert bool(cells) == (preset in paper_results.PRESETS)  # unpublished combinations fill no cell
    for table, cell in cells:
        assert paper_results.describe(table, cell) in header
    assert load_script("make_tables").identify_run(cfg) == run  # make_tables finds the preset's cells


@pytest.mark.parametrize(
    ("preset", "numbers"),
    [  # spot checks against the papers' text
        ("psconv_t1_ps_resnet50", ["21.126", "5.724"]),
        ("psconv_t3_t4", ["21.476", "5.72"]),
        ("psconv_t5_output", ["22.056", "6.174"]),
        ("psconv_t6_ps_resnext29_16x64d", ["16.528 +- 0.353"]),
        ("pyconv_pyconvhgresnet101", ["79.22"]),
        ("pyconv_aug_pyconvresnet101", ["80.58", "81.49"]),
        ("psconv_t7_mask_rcnn_ps_resnet101", ["box AP 41.6", "mask AP 37.4"]),
        ("sepc_t1_free_anchor_sepc_lite", ["box AP 41.7", "box AP50 61.0", "box APl 54.8"]),
        ("sepc_t4_mask_rcnn_pconv", ["box AP 39.6", "box AP50 60.1", "box AP75 43.5"]),
    ],
)
def test_published_numbers_in_headers(preset: str, numbers: list[str]) -> None:
    header = (REPO / "configs" / "experiment" / f"{preset}.yaml").read_text().split("\ndefaults:")[0]
    assert all(n in header for n in numbers)


def documented_sweeps() -> list[list[str]]:
    """The `python train.py -m ...` lines of docs/reproduce.md, as override lists."""
    text = (REPO / "docs" / "reproduce.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("python train.py -m ")]
    return [shlex.split(line)[3:] for line in lines]


def expand(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic sweeper: the cartesian product of the sweep overrides (hydra.* dropped)."""
    parsed = [
        o
        for o in OverridesParser.create().parse_overrides(overrides)
        if not o.key_or_group.startswith("hydra")
    ]
    choices = [
        [f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def test_documented_sweeps_fill_the_ablation_and_seed_tables(composed) -> None:
    sweeps = documented_sweeps()
    assert len(sweeps) >= 4 + 4 + 3  # Tables 3-6, the all-presets lines (SLURM variants), detection
    make_tables, presets_by_run = load_script("make_tables"), {r: n for n, r in paper_results.PRESETS.items()}
    per_run = ("seed=", "data.root=", "trainer.resume=")  # compared separately / not part of the recipe
    jobs: dict[tuple[str, ...], set[int]] = {}  # a job without its per-run overrides -> its seeds
    for job in (job for sweep in sweeps for job in expand(sweep)):
        seed = next((int(o.split("=")[1]) for o in job if o.startswith("seed=")), 0)
        jobs.setdefault(tuple(o for o in job if not o.startswith(per_run)), set()).add(seed)
    seeds: dict[paper_results.Run, set[int]] = {}
    for job, job_seeds in jobs.items():
        cfg = composed(*job)
        run = make_tables.identify_run(cfg)
        assert run in presets_by_run, f"{job}: {run}"
        seeds.setdefault(run, set()).update(job_seeds)
        backbone = [o for o in job if o.startswith("model.checkpoint_path=")]  # detection: ImageNet weights
        preset = composed(f"experiment={presets_by_run[run]}", *backbone)
        naming = ("experiment_name", "notes")
        trained, expected = ({k: v for k, v in c.items() if k not in naming} for c in (cfg, preset))
        assert trained == expected, job  # a sweep job trains what the cell's preset trains
    for table in paper_results.TABLES:
        for cell in (c for c in table.cells if c.run is not None):
            assert cell.run in seeds, f"{table.title} {cell.labels}: no documented command"
            assert seeds[cell.run] >= set(range(table.seeds))


def run_multirun(sweep_dir: Path, *overrides: str, timeout: int = 600) -> list[Path]:
    """`python train.py -m OVERRIDES SMOKE` in one process; returns the job directories in job order."""
    # Job directories are named after the sweep's own overrides only (Hydra's default subdir scheme).
    hidden = ["hydra.sweep.dir", "trainer.resume", "data.root", *(o.split("=")[0] for o in SMOKE)]
    names = f"hydra.job.config.override_dirname.exclude_keys=[{','.join(hidden)}]"
    command = [sys.executable, "train.py", "-m", *overrides, *SMOKE, f"hydra.sweep.dir={sweep_dir}", names]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(job_dirs, key=lambda p: int(p.name.split("_")[0]))


def check_smoke_runs(job_dirs: list[Path], presets: list[str]) -> None:
    """One directory per job, named after its preset, holding results.json and the preset's config."""
    assert [p.name for p in job_dirs] == [f"{i}_experiment={preset}" for i, preset in enumerate(presets)]
    for job_dir, preset in zip(job_dirs, presets):
        results = json.loads((job_dir / "results.json").read_text())
        config = OmegaConf.load(job_dir / "config.yaml")
        assert config.experiment_name == preset and config.model.name == PRESETS[preset][1]
        recipe = RECIPES[PRESETS[preset][0]]
        assert (
            config.data.image_size == 32 and (config.optim.weight_decay, config.schedule.name) == recipe[4:6]
        )
        assert 0.0 <= results["best"]["top1"] <= results["best"]["top5"] <= 100.0
        assert results["num_val_samples"] == 2 and results["final"]["epoch"] == results["best"]["epoch"] == 1


def test_representative_presets_train_two_steps(tmp_path: Path) -> None:
    job_dirs = run_multirun(tmp_path / "sweep", "experiment=" + ",".join(SMOKE_DEFAULT))
    check_smoke_runs(job_dirs, SMOKE_DEFAULT)


@pytest.mark.slow
def test_all_presets_train_two_steps(tmp_path: Path) -> None:
    job_dirs = run_multirun(tmp_path / "sweep", "experiment=" + ",".join(sorted(PRESETS)), timeout=3600)
    check_smoke_runs(job_dirs, sorted(PRESETS))


def test_multirun_over_two_patterns_writes_two_results(tmp_path: Path, capsys) -> None:
    patterns = "model.conv.dilation_pattern=[1,2],[1,1,1,1,1,1,1,2]"  # Table 3's t = 2 and t = 8
    job_dirs = run_multirun(tmp_path / "sweep", "experiment=psconv_ablation", patterns)
    assert [p.name for p in job_dirs] == [
        "0_experiment=psconv_ablation,model.conv.dilation_pattern=[1,2]",
        "1_experiment=psconv_ablation,model.conv.dilation_pattern=[1,1,1,1,1,1,1,2]",
    ]
    configs = [OmegaConf.load(d / "config.yaml") for d in job_dirs]
    assert [list(c.model.conv.dilation_pattern) for c in configs] == [[1, 2], [1, 1, 1, 1, 1, 1, 1, 2]]
    errors = [100 - json.loads((d / "results.json").read_text())["best"]["top1"] for d in job_dirs]
    # make_tables puts the two jobs in their Table 3 cells (the smoke settings ignored), each with its number.
    smoke_keys = ["optim.lr", "data.name", "data.image_size", "data.batch_size", "trainer.epochs"]
    smoke_keys += ["trainer.limit_train_batches", "trainer.limit_val_batches"]
    ignore = [arg for key in smoke_keys for arg in ("--ignore", key)]
    assert load_script("make_tables").main([str(tmp_path / "sweep"), "--tables", "psconv_t3", *ignore]) == 0
    out = capsys.readouterr().out
    for label, error in zip(("t = 2", "t = 8"), errors):
        assert f"| PS-ResNet-50 | {label} | {error:.3f} | " in out
    assert "| PS-ResNet-50 | t = 4 | missing |" in out


DETECTION_SMOKE = shlex.split(  # the built-in detection set at 64 px, two optimizer steps, one val batch
    "data=builtin_detection data.batch_size=2 data.num_train_images=4 data.num_val_images=2 "
    "data.num_workers=0 data.persistent_workers=false data.pin_memory=false schedule.warmup_steps=1 "
    "trainer.epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.progress=false "
    "trainer.device=cpu"
)


@pytest.mark.slow
def test_detection_presets_train_two_steps(tmp_path: Path) -> None:
    """One preset per detection code path (Mask R-CNN over PS-ResNet-50, FreeAnchor + SEPC head, Faster
    R-CNN + PConv neck), from scratch on the built-in set: about 2 minutes each on 2 CPU cores."""
    presets = ["psconv_t7_mask_rcnn_ps_resnet50", "sepc_t1_free_anchor_sepc", "sepc_t4_faster_rcnn_pconv"]
    hidden = ["hydra.sweep.dir", *(o.split("=")[0] for o in DETECTION_SMOKE)]
    names = f"hydra.job.config.override_dirname.exclude_keys=[{','.join(hidden)}]"
    command = [sys.executable, "train.py", "-m", "experiment=" + ",".join(presets), *DETECTION_SMOKE]
    command += [f"hydra.sweep.dir={tmp_path}", names]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for i, preset in enumerate(presets):
        job = tmp_path / f"{i}_experiment={preset}"
        config, results = OmegaConf.load(job / "config.yaml"), json.loads((job / "results.json").read_text())
        recipe, model, _, detector, head, neck = DETECTION_PRESETS[preset]
        assert (config.model.name, config.detector.name, config.detector.head) == (model, detector, head)
        assert config.detector.neck_pconv == neck and results["num_val_images"] == 2
        assert ("segm_AP" in results["best"]) == (detector == "mask_rcnn") and results["final"]["epoch"] == 1
