"""Backbones: timm's features_only convention, weights from classification checkpoints, freezing."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from psconv_original_ref import generated_state_dict
from timm.models._features import FeatureDictNet, FeatureHookNet, FeatureListNet
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from polyscale.errors import CheckpointError, ConfigError
from polyscale.models import (
    create_model,
    freeze_backbone,
    get_model_spec,
    list_models,
    load_backbone_weights,
    load_model_weights,
)

# The contract per family, written out here (the code derives it from the strides it builds).
IMAGENET = ([64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32])
EXPECTED = {
    "resnet20": ([16, 16, 32, 64], [1, 1, 2, 4]),
    "resnet56": ([16, 16, 32, 64], [1, 1, 2, 4]),
    "resnext29_8x64d": ([64, 256, 512, 1024], [1, 1, 2, 4]),
    "resnext29_16x64d": ([64, 256, 512, 1024], [1, 1, 2, 4]),
}
SIZES = [(64, 64), (97, 65), (33, 50)]  # odd sizes: every stride-2 layer rounds up


def expected(name: str) -> tuple[list[int], list[int]]:
    return EXPECTED.get(name.removeprefix("ps_"), IMAGENET)


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random changes to every float tensor (BN statistics too), so a wrong or missed copy shows.

    Small, zero-mean and scale-keeping, so that a 50-layer net in eval mode stays finite.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.mul_(1 + 0.2 * (torch.rand(t.shape, generator=g) - 0.5))
                t.add_(0.02 * torch.rand(t.shape, generator=g))  # zero-initialised tensors too
    return model.eval()


def map_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in model(x)]


def reference_maps(classifier: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The stem's and every stage's output, captured from the classifier's own forward."""
    names = ["relu"] + [f"layer{i + 1}" for i in range(classifier.num_stages)]
    maps: dict[str, torch.Tensor] = {}
    hooks = [
        classifier.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o.clone()))
        for n in names
    ]
    classifier(x)
    for h in hooks:
        h.remove()
    return [maps[n] for n in names]


@pytest.mark.parametrize("name", list_models())
def test_every_registered_backbone_feature_maps(name: str) -> None:
    channels, reductions = expected(name)
    with torch.device("meta"):
        model = create_model(name, features_only=True)
        assert isinstance(model, FeatureListNet)
        info = model.feature_info
        assert info.channels() == channels and info.reduction() == reductions
        assert len(info) == get_model_spec(name).num_stages + 1
        assert info.module_name() == ["relu"] + [f"layer{i}" for i in range(1, len(channels))]
        for h, w in SIZES:
            shapes = map_shapes(model, torch.empty(2, 3, h, w))
            want = [(2, c, math.ceil(h / r), math.ceil(w / r)) for c, r in zip(channels, reductions)]
            assert shapes == want
    assert not any(n.startswith(("fc", "global_pool")) for n, _ in model.named_modules())


# PyConv's default level groups need wider stages than ResNet-20's 16 channels
CIFAR_PYCONV = {"name": "pyconv", "pyramid_groups": [[1, 2, 4, 4], [1, 2, 4], [1, 2]]}


@pytest.mark.parametrize(
    ("name", "size", "conv"),
    [
        *(("resnet50", (21, 26), conv) for conv in ("standard", "psconv", "pyconv")),
        *(("resnet20", (15, 12), conv) for conv in ("standard", "psconv", CIFAR_PYCONV)),
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else None,
)
def test_feature_maps_are_the_classifier_trunk(name: str, size: tuple[int, int], conv) -> None:
    torch.manual_seed(0)
    classifier = perturbed(create_model(name, conv=conv, num_classes=10))
    backbone = create_model(name, conv=conv, features_only=True).eval()
    report = load_backbone_weights(backbone, classifier.state_dict())
    assert report.complete and report.dropped_keys == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps, ref = backbone(x), reference_maps(classifier, x)
    assert len(maps) == len(ref) == len(backbone.feature_info)
    for got, want, c in zip(maps, ref, backbone.feature_info.channels()):
        assert got.shape[1] == c
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ps_resnet50", "ps_resnext29_8x64d", "pyconvresnet50", "pyconvhgresnet101"])
def test_timm_create_model_features_only(name: str) -> None:
    channels, reductions = expected(name)
    with torch.device("meta"):
        model = timm.create_model(name, features_only=True, out_indices=(1, 2, 3))
        maps = model(torch.empty(1, 3, 64, 64))
    assert isinstance(model, FeatureListNet)
    assert model.feature_info.channels() == channels[1:4]
    assert model.feature_info.reduction() == reductions[1:4]
    assert model.feature_info.module_name() == ["layer1", "layer2", "layer3"]
    assert [m.shape[1] for m in maps] == channels[1:4]
    assert "num_classes" not in model.pretrained_cfg and model.pretrained_cfg["input_size"][0] == 3
    conv = get_model_spec(name).conv
    assert model.polyscale_conv == conv


def test_timm_features_only_defaults_and_wrappers() -> None:
    with torch.device("meta"):
        full = timm.create_model("ps_resnet50", features_only=True)
        as_dict = timm.create_model(
            "pyconvresnet50", features_only=True, feature_cls="dict", out_indices=(2, 4)
        )
        hooked = timm.create_model("ps_resnet20", features_only=True, feature_cls="hook", out_indices=(-1,))
        x = torch.empty(1, 3, 64, 64)  # layer4 of the PyConv net: 2x2, so train-mode BN has 4 values
        assert full.feature_info.out_indices == (0, 1, 2, 3, 4)
        assert isinstance(as_dict, FeatureDictNet) and list(as_dict(x)) == ["2", "4"]
        assert isinstance(hooked, FeatureHookNet) and [t.shape for t in hooked(x)] == [(1, 64, 16, 16)]


@pytest.mark.parametrize(
    ("out_indices", "want"),
    [((2, 3, 4), (2, 3, 4)), ((1, 2), (1, 2)), ((-1,), (4,)), (2, (3, 4)), ((0, -2), (0, 3))],
)
def test_out_indices_subsets(out_indices, want: tuple[int, ...]) -> None:
    with torch.device("meta"):
        model = create_model("resnet101", features_only=True, out_indices=out_indices)
        shapes = map_shapes(model, torch.empty(1, 3, 64, 96))
    assert model.feature_info.out_indices == want
    channels, reductions = IMAGENET
    assert shapes == [(1, channels[i], math.ceil(64 / reductions[i]), 96 // reductions[i]) for i in want]
    last = max(want)
    assert all(f"layer{k}" not in model for k in range(last + 1, 5))  # truncated after the last map


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(out_indices=(1, 4)), r"out_indices=\(1, 4\) has invalid \[4\]; valid indices"),
        (dict(out_indices=(3, 1)), r"must be increasing"),
        (dict(out_indices=(1, 1)), r"must be increasing"),
        (dict(out_indices=()), r"non-empty list of ints"),
        (dict(out_indices=5), r"last 5 of 4 maps"),
        (dict(feature_cls="fx"), r"feature_cls='fx' is not supported; use one of list, dict, hook"),
    ],
)
def test_bad_feature_arguments(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        create_model("resnet20", features_only=True, **kwargs)
    assert f"`{next(iter(kwargs))}`=" in err.value.args[0]  # marked for the config layer's renaming
    if "out_indices" in kwargs:  # names the valid ones
        listed = "0 (stem relu, reduction 1), 1 (layer1, reduction 1), 2 (layer2, reduction 2), 3 (layer3, "
        assert listed + "reduction 4); negative ones count from the end" in str(err.value)


def test_feature_arguments_need_features_only() -> None:
    with pytest.raises(ConfigError, match=r"out_indices and feature_cls .*need features_only=True") as err:
        create_model("resnet20", out_indices=(1, 2))
    assert "`features_only`=True" in err.value.args[0]


def test_backbone_from_classification_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    trained = perturbed(create_model("ps_resnet20", num_classes=10)).state_dict()
    path = tmp_path / "best.pt"
    torch.save({"format": "polyscale", "model": trained, "epoch": 7}, path)
    backbone = create_model("ps_resnet20", features_only=True, checkpoint_path=path)
    report = backbone.load_report
    assert report.complete and report.format == "state_dict"
    assert report.dropped_keys == ["fc.weight", "fc.bias"]
    assert report.loaded == len(trained) - 2 and "dropped 2 outside the backbone (fc.weight, fc.bias)" in (
        report.summary()
    )
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, trained[key]), key
    # a truncated backbone drops the stages it lacks as well
    short = create_model("ps_resnet20", features_only=True, out_indices=(0, 1), checkpoint_path=path)
    assert {k.split(".")[0] for k in short.load_report.dropped_keys} == {"layer2", "layer3", "fc"}
    # the trunk stays strict: another depth is an error naming the missing keys
    with pytest.raises(CheckpointError, match=r"built model=ps_resnet56.* model keys are missing"):
        create_model("ps_resnet56", features_only=True, checkpoint_path=path)
    with pytest.raises(CheckpointError, match=r"holds none of the backbone's modules"):
        load_backbone_weights(backbone, {"head.weight": torch.zeros(3)})


def test_backbone_from_the_pyconv_authors_file() -> None:
    sd = generated_state_dict("pyconvresnet50")
    backbone = create_model("pyconvresnet50", features_only=True, out_indices=(1, 2, 3, 4))
    report = load_backbone_weights(backbone, sd, name="pyconvresnet50.pth")
    assert report.format == "pyconv_original" and report.complete
    assert report.dropped_keys == ["fc.weight", "fc.bias"] and report.loaded == len(sd) - 2
    ours = backbone.state_dict()
    assert torch.equal(ours["layer1.0.conv2.levels.3.weight"], sd["layer1.0.conv2.conv2_4.weight"])


def test_backbone_from_the_psconv_authors_file_computes_the_classifier_trunk() -> None:
    sd = generated_state_dict("ps_resnet50")
    for key in [k for k in sd if k.endswith("conv2.conv.weight")]:  # a correctly masked file
        part = torch.arange(sd[key].shape[0]) // (sd[key].shape[0] // 4)
        sd[key][(part[:, None] == part[None, :]) | (part[:, None] == (part[None, :] + 2) % 4)] = 0
    classifier = create_model("ps_resnet50").eval()
    load_model_weights(classifier, sd)
    backbone = create_model("ps_resnet50", features_only=True, out_indices=(2, 4)).eval()
    report = load_backbone_weights(backbone, sd)
    assert report.format == "psconv_original" and report.complete and len(report.converted_layers) == 16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps, ref = backbone(x), reference_maps(classifier, x)
    torch.testing.assert_close(maps[0], ref[2], rtol=0, atol=0)
    torch.testing.assert_close(maps[1], ref[4], rtol=0, atol=0)


def trainable(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("stages", [0, 1, 2, 3, 4, 5])
def test_freeze_matches_torchvision_trainable_backbone_layers(stages: int) -> None:
    with torch.device("meta"):
        ours = freeze_backbone(create_model("resnet50", num_classes=0), stages, frozen_bn=False)
        theirs = create_model("resnet50", num_classes=0)
        theirs.inplanes = theirs.num_features  # read by torchvision's FPN builder
        _resnet_fpn_extractor(theirs, stages)
    assert trainable(ours) == trainable(theirs)


def test_freeze_backbone_with_frozen_bn_trains_the_rest() -> None:
    torch.manual_seed(2)
    backbone = perturbed(create_model("ps_resnet20", features_only=True, out_indices=(2, 3)))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = backbone(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    freeze_backbone(backbone, 2, frozen_bn=True)  # of stem, layer1, layer2, layer3: the last two train
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == n_bn
    assert isinstance(backbone.bn1, FrozenBatchNorm2d) and list(backbone)[:3] == ["conv1", "bn1", "relu"]
    flags = trainable(backbone)
    assert all(not v for k, v in flags.items() if k.startswith(("conv1", "layer1")))
    assert all(v for k, v in flags.items() if k.startswith(("layer2", "layer3")))
    backbone.train()  # frozen BN: the same function in train mode, statistics unchanged
    maps = backbone(x)
    for got, want in zip(maps, before):  # FrozenBatchNorm2d folds BN into scale + shift: rounding differs
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    sum(m.mean() for m in maps).backward()
    params = dict(backbone.named_parameters())
    assert params["conv1.weight"].grad is None and params["layer1.0.conv1.weight"].grad is None
    assert params["layer2.0.conv1.weight"].grad is not None
    assert params["layer3.2.conv2.weight"].grad.abs().sum() > 0
    # weights still load into a frozen backbone (FrozenBatchNorm2d keeps no batch counter)
    report = load_backbone_weights(backbone, create_model("ps_resnet20", num_classes=10).state_dict())
    assert report.complete and "bn1.num_batches_tracked" in report.dropped_keys


def test_freeze_backbone_bad_stage_count() -> None:
    backbone = create_model("resnet20", features_only=True)
    with pytest.raises(ConfigError, match=r"trainable_stages=5 is out of range for this backbone: 0..4"):
        freeze_backbone(backbone, 5)
    freeze_backbone(backbone, 4, frozen_bn=False)
    assert all(trainable(backbone).values())
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
