"""The detection task on the shared engine: a tiny run on the built-in detection set, its records, exact
resume, evaluate.py on its checkpoint, and a classification network as its backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, assert_tensors_equal, compose_config, load, run_cli, run_in_process

from polyscale.engine.fit import run_training

DET = (
    "task=detection",
    "model=resnet20",
    "data.image_size=64",
    "data.min_size=64",
    "data.max_size=64",
    "data.num_train_images=24",
    "data.num_val_images=5",
    "data.batch_size=4",
    "data.num_workers=0",
    "detector.fpn_channels=32",
    "schedule.warmup_steps=1",
    "schedule.milestones=[1]",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every_n_steps=1",
    "trainer.limit_train_batches=3",
)
METRICS = {f"bbox_{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def train(run: Path, *overrides: str) -> dict | None:
    return run_training(compose_config("train", *DET, *overrides), run)


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("det")
    return run, train(run, "trainer.epochs=2")


def test_detection_run_records_coco_metrics_and_each_loss(detection_run) -> None:
    run, results = detection_run
    assert set(results) == {
        "best",
        "final",
        "num_val_images",
        "bad_files",
        "bad_files_train",
        "bad_files_val",
    }
    assert set(results["best"]) == METRICS | {"epoch"} and results["num_val_images"] == 5
    assert results["final"]["epoch"] == 2 and all(-1 <= v <= 100 for v in results["final"].values())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fcos = {"loss_classification", "loss_bbox_regression", "loss_bbox_ctrness"}
    assert all(fcos <= set(line) and {f"val_{m}" for m in METRICS} <= set(line) for line in lines)
    # the epoch's loss is the sum of the detector's losses (each a mean over the same micro-batches)
    assert lines[0]["train_loss"] == pytest.approx(sum(lines[0][k] for k in fcos), rel=1e-5)
    last = load(run / "checkpoints" / "last.pt")
    assert last["config"]["task"]["name"] == "detection" and last["config"]["detector"]["name"] == "fcos"


def test_detection_resume_is_exact(tmp_path: Path) -> None:
    overrides = ("trainer.epochs=2", "trainer.deterministic=true")
    reference = train(tmp_path / "a", *overrides)
    assert train(tmp_path / "b", *overrides, "trainer.stop_after_steps=2") is None
    assert train(tmp_path / "b", *overrides, "trainer.resume=auto") == reference
    a, b = (load(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    for key in ("model", "optimizer", "scheduler", "global_step", "best"):
        assert_tensors_equal(a[key], b[key], key)


def test_evaluate_reproduces_the_detection_metrics(detection_run, tmp_path: Path) -> None:
    run, results = detection_run
    out = tmp_path / "eval.json"
    best = run / "checkpoints" / "best.pt"
    code, output = run_in_process(
        "evaluate.py", f"checkpoint={best}", f"eval.output={out}", f"hydra.run.dir={tmp_path}"
    )
    assert code == 0, output
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["num_images"] == 5 and row["bad_files"] == 0
    assert {k: row[k] for k in METRICS} == {k: results["best"][k] for k in METRICS}


def test_a_classification_checkpoint_is_no_detection_checkpoint(tmp_path: Path) -> None:
    run_training(
        compose_config("train", *TINY, "trainer.epochs=1", "trainer.limit_train_batches=1"), tmp_path
    )
    last = tmp_path / "checkpoints" / "last.pt"
    code, output = run_in_process(
        "evaluate.py",
        f"checkpoint={last}",
        "data=coco",
        "data.root=/nowhere",
        f"hydra.run.dir={tmp_path / 'e'}",
    )
    assert code == 2 and "checkpoint of task=classification, and data.name=coco" in output, output
    assert f"model.checkpoint_path={last}" in output and "Traceback" not in output
    code, output = run_in_process(
        "train.py", *DET, "trainer.epochs=1", f"trainer.resume={last}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert code == 2 and "is a checkpoint of task=classification; this run is task=detection" in output, (
        output
    )
    # ... and as a backbone it initialises the detector's network (the classifier dropped)
    det = tmp_path / "det"
    train(det, "trainer.epochs=1", "trainer.limit_train_batches=2", f"model.checkpoint_path={last}")
    backbone = {
        k.removeprefix("backbone.body."): v for k, v in load(det / "checkpoints" / "last.pt")["model"].items()
    }
    trained = load(last)["model"]
    frozen = "conv1.weight"  # the stem: frozen by the papers' fine-tuning default for a pretrained backbone
    assert torch.equal(backbone[frozen], trained[frozen])


def test_two_process_detection_metrics_equal_one_process(tmp_path: Path) -> None:
    """torchrun with 2 gloo ranks over an odd-sized validation set: every image scored once, and the
    gathered COCO metrics equal evaluate.py's single-process ones on the same weights."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [o for o in DET if not o.startswith(("data.num_val_images", "trainer.limit_train_batches"))]
    done = run_cli(
        "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "train.py", *overrides,
        "data.num_val_images=7", "trainer.epochs=1", "trainer.limit_train_batches=2",
        f"hydra.run.dir={tmp_path}", timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_val_images"] == 7  # 3 + 4 images: odd, no padding
    out = tmp_path / "eval.json"
    best = tmp_path / "checkpoints" / "best.pt"
    code, output = run_in_process(
        "evaluate.py", f"checkpoint={best}", f"eval.output={out}", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert code == 0, output
    (row,) = json.loads(out.read_text())["results"]
    assert row["num_images"] == 7 and {k: row[k] for k in METRICS} == {k: results["best"][k] for k in METRICS}


def _epoch_losses(run: Path) -> dict[str, float]:
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return {k: v for k, v in line.items() if k.startswith("loss_") or k == "train_loss"}


def test_bf16_detection_training_tracks_fp32(tmp_path: Path) -> None:
    """Mixed precision on the detection task: autocast bf16 (CPU or GPU) trains with finite losses that
    follow the fp32 run of the same seed, and evaluation still scores the boxes."""
    overrides = ("trainer.epochs=1", "detector=retinanet", "trainer.limit_train_batches=2")
    fp32 = train(tmp_path / "fp32", *overrides)
    bf16 = train(tmp_path / "bf16", *overrides, "trainer.precision=bf16")
    reference, mixed = _epoch_losses(tmp_path / "fp32"), _epoch_losses(tmp_path / "bf16")
    assert set(mixed) == set(reference) == {"train_loss", "loss_classification", "loss_bbox_regression"}
    for key, value in reference.items():
        assert mixed[key] == pytest.approx(value, rel=0.05), key
    assert fp32 is not None and bf16 is not None and set(bf16["final"]) == set(fp32["final"])
    assert load(tmp_path / "bf16" / "checkpoints" / "last.pt")["config"]["trainer"]["precision"] == "bf16"


@pytest.mark.gpu
def test_fp16_detection_training_on_cuda(tmp_path: Path) -> None:
    """fp16 with the grad scaler on a GPU (on a CPU fp16 convolutions take minutes): finite losses."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    train(tmp_path, "trainer.epochs=1", "trainer.precision=fp16", "trainer.device=cuda")
    losses = _epoch_losses(tmp_path)
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
