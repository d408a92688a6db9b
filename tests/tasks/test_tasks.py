"""The task layer: lookup by name, the classification task's loss, model checks and its evaluator."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import TINY, compose_config
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from polyscale.engine.distributed import DistInfo
from polyscale.engine.runtime import Runtime
from polyscale.errors import ConfigError
from polyscale.tasks import Task, get_task, list_tasks
from polyscale.tasks.classification import TASK, ClassificationLoss

CPU = Runtime(DistInfo(), torch.device("cpu"), "fp32", channels_last=False, show_progress=False)


def test_tasks_are_found_by_module_name() -> None:
    assert "classification" in list_tasks() and "base" not in list_tasks()
    assert get_task("classification") is TASK and isinstance(TASK, Task)
    with pytest.raises(ConfigError, match="Unknown task 'segmentation'.*classification"):
        get_task("segmentation")


class _Data:
    num_classes = 10


def test_loss_is_label_smoothed_cross_entropy_or_mixup_soft_targets() -> None:
    cfg = compose_config("train", *TINY, "trainer.label_smoothing=0.1")
    loss = TASK.batch_loss(cfg, _Data(), CPU, micro_batch=8)
    assert isinstance(loss, ClassificationLoss) and loss.mixup is None
    assert isinstance(loss.loss_fn, nn.CrossEntropyLoss) and loss.loss_fn.label_smoothing == 0.1
    cfg = compose_config("train", *TINY, "trainer.label_smoothing=0.1", "trainer.cutmix_alpha=1.0")
    loss = TASK.batch_loss(cfg, _Data(), CPU, micro_batch=8)
    assert isinstance(loss.loss_fn, SoftTargetCrossEntropy) and isinstance(loss.mixup, Mixup)
    images, targets = loss.mixup(torch.randn(8, 3, 8, 8), torch.arange(8))
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
    cfg = compose_config("train", *TINY, "trainer.mixup_alpha=0.2")
    with pytest.raises(ConfigError, match="even per-rank micro-batch"):
        TASK.batch_loss(cfg, _Data(), CPU, micro_batch=7)


def test_batch_loss_moves_the_batch_and_returns_its_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images, targets = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    loss, size = ClassificationLoss(CPU, nn.CrossEntropyLoss(), None)(model, (images, targets))
    assert size == 5 and torch.allclose(loss, nn.functional.cross_entropy(model(images), targets))


def test_model_options_are_checked_on_the_meta_device() -> None:
    TASK.check(compose_config("train", *TINY, "model=ps_resnet50"))  # no memory, instant
    with pytest.raises(ConfigError, match="no_such_net"):
        TASK.check(compose_config("train", *TINY, "model.name=no_such_net"))
    bad = compose_config("train", *TINY, "model=ps_resnet20", "model.conv.dilation_pattern=[1,0]")
    with pytest.raises(ConfigError, match=r"model/conv psconv .*dilation_pattern"):
        TASK.check(bad)
