"""Every config file composes against the schemas; the schemas reject mistyped keys and wrong types."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import CONFIG_DIR, compose_config  # noqa: E402

from polyscale.cli import open_data_keys

GROUPS = ("model", "model/conv", "data", "optim", "schedule", "trainer", "experiment")


def group_options(group: str) -> list[str]:
    """Option names of a config group, sub-folders included (experiment/recipe/NAME)."""
    folder = CONFIG_DIR / group
    nested = {"model": ["conv"]}.get(group, [])  # model/conv is its own group
    return sorted(
        str(p.relative_to(folder).with_suffix(""))
        for p in folder.rglob("*.yaml")
        if not any(p.relative_to(folder).parts[0] == n for n in nested)
    )


OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_every_group_has_options() -> None:
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes_into_train(group: str, option: str) -> None:
    cfg = compose_config("train", f"{group}={option}")
    OmegaConf.resolve(cfg)  # no dangling interpolations
    for key in ("model", "data", "optim", "schedule", "trainer"):
        assert OmegaConf.is_dict(cfg[key])
    if group == "model/conv":
        assert cfg.model.conv.name == option
    if group in ("data", "optim", "schedule") or group == "model":
        assert cfg[group].name


@pytest.mark.parametrize("option", group_options("model")[:3] + ["resnet20"])
def test_eval_config_composes_with_groups_and_keys(option: str) -> None:
    cfg = compose_config(
        "eval",
        "checkpoint=x.pt",
        f"model={option}",
        "data=builtin",
        "data.root=/d",
        "eval.crop_sizes=[224,320]",
    )
    assert (cfg.model.name, cfg.data.root, list(cfg.eval.crop_sizes)) == (option, "/d", [224, 320])
    # a key without choosing the group changes the checkpoint's stored data section (evaluate.py's argv)
    assert open_data_keys(["checkpoint=x.pt", "data.root=/d"]) == ["checkpoint=x.pt", "+data.root=/d"]
    assert compose_config("eval", "+data.root=/d").data.root == "/d"
    assert open_data_keys(["data=imagenet", "data.root=/d"]) == ["data=imagenet", "data.root=/d"]


def has_submitit() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not has_submitit(), reason="hydra-submitit-launcher (optional) is not installed")
@pytest.mark.parametrize("option", group_options("hydra/launcher") if (CONFIG_DIR / "hydra").exists() else [])
def test_launcher_configs_compose(option: str) -> None:
    assert compose_config("train", f"hydra/launcher={option}") is not None


def test_default_train_config() -> None:
    cfg = compose_config("train")
    assert (cfg.data.name, cfg.optim.name, cfg.schedule.name, cfg.seed) == ("builtin", "sgd", "cosine", 0)
    assert cfg.trainer.resume is None and cfg.trainer.device == "auto"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epoch=3", "Key 'epoch' not in 'TrainerConfig'"),
        ("optim.learning_rate=0.1", "Key 'learning_rate' not in 'OptimConfig'"),
        ("trainer.epochs=ten", "Value 'ten' of type 'str' could not be converted to Integer"),
        ("data.batch_size=1.5", "Value '1.5' of type 'float' could not be converted to Integer"),
        ("trainer.deterministic=maybe", "Value 'maybe' is not a valid bool"),
    ],
)
def test_schema_rejects_mistyped_keys_and_wrong_types(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("train", override)
    assert message in str(info.value.__cause__)
