"""load_model_weights on our checkpoints, wrapped / prefixed / bare state dicts and the authors' files.

The authors' files are generated with exactly the keys and shapes listed in
../shared/reference/official_state_dicts.json (copied to data/), random values.
"""

from __future__ import annotations

import collections

import pytest
import torch
from psconv_original_ref import generated_state_dict, official_shapes

from polyscale.errors import CheckpointError
from polyscale.models import create_model, load_model_weights
from polyscale.models.convert import rename_pyconv_original
from polyscale.models.describe import describe_state_dict


class NotATensor:
    """An arbitrary Python object: torch.load(weights_only=True) refuses to unpickle it."""


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = create_model("resnet20", num_classes=10)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))  # distinguishable from any fresh init
    return model.state_dict()


def assert_same(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_polyscale_checkpoint_file_and_create_model(tmp_path, trained) -> None:
    ckpt = {
        "format": "polyscale",
        "version": 1,
        "model": trained,
        "ema": {k: v + 1 if v.is_floating_point() else v for k, v in trained.items()},
        "config": {"model": {"name": "resnet20", "conv": {"name": "standard"}}},
        "epoch": 3,
    }
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    model = create_model("resnet20", num_classes=10)
    report = load_model_weights(model, path)  # the weights under "model", like torchvision's references
    assert report.format == "state_dict" and report.complete and report.loaded == len(trained)
    assert_same(model, trained)
    assert_same(create_model("resnet20", num_classes=10, checkpoint_path=path), trained)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module.", "_orig_mod."])
def test_wrapped_and_prefixed_state_dicts(trained, wrap: str) -> None:
    if wrap.endswith("."):
        source = collections.OrderedDict((wrap + k, v) for k, v in trained.items())
    else:
        source = trained if wrap == "bare" else {wrap: trained, "epoch": 1}
    model = create_model("resnet20", num_classes=10)
    assert load_model_weights(model, source).format == "state_dict"
    assert_same(model, trained)


def test_wrong_architecture_names_keys_and_what_the_file_looks_like(tmp_path, trained) -> None:
    ckpt = {
        "format": "polyscale",
        "version": 1,
        "model": trained,
        "ema": None,
        "config": {"model": {"name": "resnet20"}},
    }
    with pytest.raises(CheckpointError) as err:
        load_model_weights(
            create_model("resnet56", num_classes=10), ckpt, name="run/last.pt", trained_as="model=resnet20"
        )
    msg = str(err.value)
    assert msg.startswith("Checkpoint run/last.pt does not fit the model")
    assert "built model=resnet56 (conv standard), num_classes=10" in msg
    assert "looks like model=resnet20 (resnet20, blocks [3, 3, 3], 10 classes)" in msg
    assert "216 model keys are missing from it: layer1.3.conv1.weight" in msg
    assert "strict=False" in msg and "the given state dict" not in msg


def test_wrong_classifier_shape_strict_and_not_strict(trained) -> None:
    model = create_model("resnet20", num_classes=100)
    with pytest.raises(
        CheckpointError, match=r"2 have the wrong shape: fc.weight \[10, 64\] in file vs \[100, 64\]"
    ):
        load_model_weights(model, trained)
    fc_before = model.fc.weight.clone()
    report = load_model_weights(model, trained, strict=False)
    assert [k for k, _, _ in report.mismatched_keys] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.fc.weight, fc_before)  # kept, the rest loaded
    assert torch.equal(model.layer3[2].conv2.weight, trained["layer3.2.conv2.weight"])


def test_create_model_with_checkpoint_fine_tunes_a_new_classifier(tmp_path, trained) -> None:
    path = tmp_path / "ten_classes.pt"
    torch.save(trained, path)
    with pytest.warns(UserWarning, match=r"classifier not loaded.*2 wrong shape \(fc.weight, fc.bias\)"):
        model = create_model("resnet20", num_classes=100, checkpoint_path=path)
    assert model.fc.out_features == 100
    assert torch.equal(model.layer2[1].bn1.running_var, trained["layer2.1.bn1.running_var"])
    with pytest.raises(CheckpointError, match="216 model keys are missing"):  # the trunk stays strict
        create_model("resnet56", num_classes=100, checkpoint_path=path)


def test_unreadable_sources(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_weights(create_model("resnet20"), tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_model_weights(create_model("resnet20"), tmp_path / "list.pt")
    torch.save({"w": NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_model_weights(create_model("resnet20"), tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="contains no tensors"):
        load_model_weights(create_model("resnet20"), {"epoch": 3})


@pytest.mark.parametrize("name", ["pyconvresnet50", "pyconvhgresnet50"])
def test_pyconv_original_file_loads_strictly(name: str) -> None:
    sd = generated_state_dict(name)
    model = create_model(name)
    report = load_model_weights(model, {"module." + k: v for k, v in sd.items()})
    assert report.format == "pyconv_original" and report.complete and report.loaded == len(sd)
    ours = model.state_dict()
    assert torch.equal(ours["layer1.0.conv2.levels.3.weight"], sd["layer1.0.conv2.conv2_4.weight"])
    assert torch.equal(ours["layer3.5.conv2.levels.1.weight"], sd["layer3.5.conv2.conv2_2.weight"])
    assert torch.equal(ours["layer4.2.conv2.levels.0.weight"], sd["layer4.2.conv2.weight"])  # one level
    assert torch.equal(ours["layer2.0.downsample.1.weight"], sd["layer2.0.downsample.1.weight"])


@pytest.mark.parametrize(
    "name", ["pyconvresnet101", "pyconvresnet152", "pyconvhgresnet101", "pyconvhgresnet152"]
)
def test_pyconv_original_keys_and_shapes_map_onto_ours(name: str) -> None:
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in create_model(name).state_dict().items()}
    renamed = rename_pyconv_original({k: torch.empty(0) for k in official_shapes()[name]}, set(ours))
    shapes = official_shapes()[name]
    original = {new: tuple(shapes[old]) for new, old in zip(renamed, shapes)}
    assert original == ours


def test_pyconv_file_into_wrong_model_says_what_it_is() -> None:
    sd = generated_state_dict("pyconvhgresnet50")
    with pytest.raises(
        CheckpointError, match=r"built model=pyconvresnet50.*looks like pyconvhgresnet50 \(the PyConv"
    ):
        load_model_weights(create_model("pyconvresnet50"), sd)


def test_dynamic_psconv_file_says_what_it_is() -> None:
    """DynamicPSConv2d's keys (weight, gate_logits) name their conv type, not PSConv (the fallback)."""
    sd = create_model("resnet20", conv="dynamic_psconv", num_classes=10).state_dict()
    looks = r"looks like resnet20 with model/conv=dynamic_psconv, blocks \[3, 3, 3\], 10 classes"
    with pytest.raises(CheckpointError, match=r"built model=ps_resnet20 \(conv psconv\).*" + looks):
        load_model_weights(create_model("ps_resnet20", num_classes=10), sd)
    grouped = create_model("resnext29_8x64d", conv="dynamic_psconv", num_classes=10).state_dict()
    assert describe_state_dict(grouped) == (
        "resnext29_8x64d with model/conv=dynamic_psconv, blocks [3, 3, 3], 8-group middle convs, 10 classes"
    )


@pytest.mark.parametrize(("name", "layers"), [("ps_resnet50", 16), ("ps_resnet101", 33)])
def test_psconv_original_backbone_converts_strictly(name: str, layers: int) -> None:
    sd = generated_state_dict(name)
    for key in [k for k in sd if k.endswith("conv2.conv.weight")]:  # a correctly masked file
        c, p = sd[key].shape[0], sd[key].shape[0] // 4
        part = torch.arange(c) // p
        sd[key][(part[:, None] == part[None, :]) | (part[:, None] == (part[None, :] + 2) % 4)] = 0
    model = create_model(name)
    report = load_model_weights(model, sd)
    assert report.format == "psconv_original" and report.complete
    assert len(report.converted_layers) == layers and not report.unrepresentable
    assert report.loaded == len(sd) - 3 * layers + layers  # three tensors -> one kernel per layer
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    # conv3 columns were permuted with the kernel's output channels, bn2 with them
    conv3, bn2 = model.layer1[0].conv3.weight, model.layer1[0].bn2.running_mean
    assert sorted(conv3[0, :, 0, 0].tolist()) == sorted(sd["layer1.0.conv3.weight"][0, :, 0, 0].tolist())
    order = [sd["layer1.0.bn2.running_mean"].tolist().index(v) for v in bn2.tolist()]
    assert torch.equal(conv3[:, :, 0, 0], sd["layer1.0.conv3.weight"][:, order, 0, 0])


def test_psconv_original_grouped_file_reports_masked_weights() -> None:
    """ps_resnext101_32x4d: random values everywhere, so every layer's masked blocks are non-zero."""
    sd = generated_state_dict("ps_resnext101_32x4d")
    del sd["fc.weight"], sd["fc.bias"]  # a backbone file without classifier
    model = create_model("ps_resnext101_32x4d")
    with pytest.raises(
        CheckpointError, match=r"2 model keys are missing from it: fc.weight, fc.bias.*strict=False"
    ):
        load_model_weights(model, sd)
    with pytest.warns(UserWarning, match=r"dropped non-zero masked-block weights in 33 layers"):
        report = load_model_weights(model, sd, strict=False)
    assert report.missing_keys == ["fc.weight", "fc.bias"] and not report.unexpected_keys
    assert len(report.unrepresentable) == 33
    first = report.unrepresentable[0]
    masked = sd["layer1.0.conv2.conv.weight"].abs().amax(dim=(2, 3))  # (128, 4); 1 channel per part
    part = torch.arange(128)[:, None] % 4
    keep = (torch.arange(4)[None, :] == part) | (torch.arange(4)[None, :] == (part + 2) % 4)
    assert first.layer == "layer1.0.conv2" and first.max_abs == pytest.approx(masked[keep].max().item())
    assert 0.5 < first.rel_norm < 1.5 and first.fraction_nonzero == 1.0


def test_psconv_file_into_wrong_model() -> None:
    sd = generated_state_dict("ps_resnet50")
    with pytest.raises(
        CheckpointError, match=r"model=resnet50 .*has a Conv2d there.*looks like ps_resnet50 \(the PSConv"
    ):
        load_model_weights(create_model("resnet50"), sd)
    with pytest.raises(CheckpointError, match=r"not a channel relabelling.*dilation_pattern"):
        load_model_weights(
            create_model("ps_resnet50", conv={"name": "psconv", "dilation_pattern": [1, 2]}), sd
        )
