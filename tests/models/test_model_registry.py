"""Registry contract: names, conv overrides, errors, timm registration, Hydra model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import polyscale
from polyscale.config import ModelConfig, register_configs
from polyscale.errors import ConfigError
from polyscale.models import create_model, list_models
from polyscale.models.complexity import count_params
from polyscale.tasks.arguments import model_arguments

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def signature(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """Architecture fingerprint: every module's type and every state tensor's shape, in order."""
    mods = [(n, type(m).__name__, ()) for n, m in model.named_modules()]
    return mods + [(k, "tensor", tuple(v.shape)) for k, v in model.state_dict().items()]


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def psconvs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "dilation_matrix")]


def test_top_level_exports() -> None:
    assert polyscale.create_model is create_model
    assert polyscale.list_models is list_models


def test_list_models_pattern() -> None:
    assert list_models("pyconvhg*") == ["pyconvhgresnet101", "pyconvhgresnet152", "pyconvhgresnet50"]
    assert "ps_resnext29_8x64d" in list_models("ps_*") and "resnet50" not in list_models("ps_*")


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"Unknown model 'ps_resnet5'.*ps_resnet50.*list_models"):
        create_model("ps_resnet5")


@pytest.mark.parametrize(
    ("name", "conv", "same_as"),
    [
        ("resnet20", "psconv", "ps_resnet20"),
        ("ps_resnet20", {"name": "standard", "dilation_pattern": [1, 2, 1, 4]}, "resnet20"),
        (
            "resnext29_8x64d",
            {"name": "psconv", "kernel_sizes": None, "pyramid_groups": None},
            "ps_resnext29_8x64d",
        ),
        ("ps_resnet50", "standard", "resnet50"),
        ("resnet50", {"name": "psconv", "axes": "both", "kernel_sizes": [[3]]}, "ps_resnet50"),
    ],
)
def test_conv_argument_wins_over_the_names_default(name: str, conv: object, same_as: str) -> None:
    torch.manual_seed(0)
    a = create_model(name, conv=conv, num_classes=10) if "50" not in name else on_meta(name, conv=conv)
    torch.manual_seed(0)
    b = create_model(same_as, num_classes=10) if "50" not in name else on_meta(same_as)
    assert signature(a) == signature(b)
    if "50" not in name:  # same seed, same architecture -> same weights
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka


def test_psconv_options_pass_through() -> None:
    model = create_model("ps_resnet20", conv={"name": "psconv", "dilation_pattern": [1, 3], "axes": "input"})
    mats = [m.dilation_matrix() for m in psconvs(model)]
    assert len(mats) == 18  # 9 basic blocks x 2 convs; the stem stays standard
    for d in mats:
        assert set(d.unique().tolist()) == {1, 3}
        assert (d == d[:1]).all()  # axes="input": every filter has the same row


def test_pyconv_hg_groups_default_and_override() -> None:
    hg = on_meta("pyconvhgresnet50", conv="pyconv")
    assert hg.layer1[0].conv2.levels[3].weight.shape == (32, 4, 9, 9)  # 128 channels in 32 groups
    plain = on_meta("pyconvresnet50")
    assert plain.layer1[0].conv2.levels[3].weight.shape == (16, 4, 9, 9)  # 64 channels in 16 groups
    custom = on_meta(
        "pyconvresnet50", conv={"name": "pyconv", "pyramid_groups": [[1, 1, 1, 1], [1, 1, 1], [1, 1], [1]]}
    )
    assert custom.layer1[0].conv2.levels[3].weight.shape == (16, 64, 9, 9)


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        ("dilated", r"(?i)unknown conv type 'dilated'.*standard"),
        ({"name": "psconv", "dilation_patern": [1, 2]}, r"(?i)unknown conv option.*dilation_patern"),
        (3, r"`?conv`? must be a conv type name"),
    ],
)
def test_bad_conv_raises_config_error(conv: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model("resnet20", conv=conv)


def test_unknown_keyword_and_bad_operator_arguments() -> None:
    with pytest.raises(ConfigError, match=r"unknown argument.*drop_path_rate"):
        create_model("resnet20", drop_path_rate=0.1)
    with pytest.raises(ConfigError, match=r"Cannot build model 'resnet20'"):  # 16 channels, 5 rates
        create_model("resnet20", conv={"name": "psconv", "dilation_pattern": [1, 2, 3, 4, 5] * 4})


def test_init_options() -> None:
    model = create_model("resnet56", num_classes=7, drop_rate=0.25, zero_init_last=True, in_chans=1)
    assert model.fc.out_features == 7 and model.dropout.p == 0.25
    assert all(
        (blk.bn2.weight == 0).all() for stage in (model.layer1, model.layer2, model.layer3) for blk in stage
    )
    assert (model.bn1.weight == 1).all() and (model.bn1.bias == 0).all()
    std = model.layer3[0].conv1.weight.std().item()  # kaiming fan_out: sqrt(2 / (64 * 9))
    assert abs(std - (2 / (64 * 9)) ** 0.5) < 0.01
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)


def test_ps_pattern_one_equals_standard_with_same_weights() -> None:
    """t = 1, pattern (1,): every kernel has dilation 1, i.e. the standard conv (grouped one too)."""
    for std_name, ps_name in (("resnet20", "ps_resnet20"), ("resnext50_32x4d", "ps_resnext50_32x4d")):
        std = create_model(std_name).eval()
        ps = create_model(ps_name, conv={"name": "psconv", "dilation_pattern": [1]}).eval()
        conv_names = {n for n, m in ps.named_modules() if hasattr(m, "load_dense_weight")}
        ps.load_state_dict(
            {k: v for k, v in std.state_dict().items() if k.rsplit(".", 1)[0] not in conv_names}, strict=False
        )
        for n in conv_names:
            ps.get_submodule(n).load_dense_weight(std.get_submodule(n).weight)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = std(x)
            torch.testing.assert_close(ps(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_timm_create_model_for_every_name_timm_lacks() -> None:
    ours = [
        n
        for n in list_models()
        if n.startswith(("ps_", "pyconv")) or "resnext29" in n or n in ("resnet20", "resnet56")
    ]
    assert len(ours) == 21  # 11 PS, 6 PyConv, 4 CIFAR
    for name in ours:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=100)
        assert model.fc.out_features == 100 and model.polyscale_name == name
        assert model.polyscale_conv == (
            "psconv" if name.startswith("ps_") else "pyconv" if "pyconv" in name else "standard"
        )
        if name == "ps_resnet50":
            assert count_params(model) == 25_557_032 - 900 * 2049  # 100 instead of 1000 classes
    assert set(timm.list_models("ps_resnext29*")) == {"ps_resnext29_16x64d", "ps_resnext29_8x64d"}
    with pytest.raises(ConfigError, match="checkpoint_path"):
        timm.create_model("ps_resnet20", pretrained=True)


def test_timm_own_names_untouched() -> None:
    for name in ("resnet50", "seresnet50", "resnext50_32x4d"):
        assert timm.models.model_entrypoint(name).__module__.startswith("timm.")
    assert timm.models.get_pretrained_cfg("ps_resnet50").input_size == (3, 224, 224)
    assert timm.models.get_pretrained_cfg("ps_resnet20").input_size == (3, 32, 32)


def test_reference_sizes_match_timm() -> None:
    """Our standard ImageNet nets have exactly timm's (= torchvision's) sizes."""
    for name in ("resnet101", "resnext101_32x4d", "seresnet101"):
        with torch.device("meta"):
            ref = timm.create_model(name)
        assert count_params(on_meta(name)) == count_params(ref)


def build_model_from_config(cfg, num_classes: int | None = None):
    """What the engine does with a `model` config section (tasks.arguments + create_model)."""
    return create_model(**model_arguments(cfg, num_classes))


@pytest.fixture(scope="module")
def compose_model():
    register_configs()
    if not OmegaConf.has_resolver("polyscale_stamp"):
        OmegaConf.register_new_resolver("polyscale_stamp", lambda: "test")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda *overrides, config="train": compose(config_name=config, overrides=list(overrides)).model


def test_every_model_config_composes_and_builds_the_named_model(compose_model) -> None:
    files = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
    assert files == list_models()
    assert compose_model("model=resnet20").name == "resnet20"  # the train entry config composes
    for name in files:
        cfg = compose_model(f"+model={name}", config=None)  # the model group alone: twice as fast
        assert cfg.name == name
        with torch.device("meta"):
            built = build_model_from_config(cfg, num_classes=10)
        assert signature(built) == signature(on_meta(name, num_classes=10)), name


def test_config_conv_override_equals_ps_name(compose_model) -> None:
    a = compose_model("model=resnet50", "model/conv=psconv")
    b = compose_model("model=ps_resnet50")
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b) | {"name": "resnet50"}
    with torch.device("meta"):
        assert signature(build_model_from_config(a, 1000)) == signature(build_model_from_config(b, 1000))
    hg = compose_model("model=pyconvhgresnet50", "model.num_classes=5")
    with torch.device("meta"):
        model = build_model_from_config(hg, num_classes=10)
    assert model.fc.out_features == 5 and model.layer1[0].conv2.levels[0].weight.shape == (32, 4, 3, 3)


def test_config_picks_the_psconv_formulation(compose_model) -> None:
    from polyscale.ops import PSConv2d

    for impl, expected in ((None, None), ("depthwise", "depthwise")):
        overrides = ["model=ps_resnet20"] + ([f"model.conv.impl={impl}"] if impl else [])
        model = build_model_from_config(compose_model(*overrides), num_classes=10)
        convs = [m for m in model.modules() if isinstance(m, PSConv2d)]
        assert convs and all(m.impl == expected for m in convs)


def test_build_from_dataclass_needs_a_class_count() -> None:
    model = build_model_from_config(ModelConfig(name="resnet20"), num_classes=3)
    assert model.fc.out_features == 3
    with pytest.raises(ConfigError, match="num_classes"):
        build_model_from_config(ModelConfig(name="resnet20"))
