"""Model registry and built-in architectures: sizes against hand counts, names, presets, shapes."""

import fnmatch
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tpp.models import (
    RESNET50_SPEEDUPS,
    ModelSpec,
    ShortcutA,
    build_model,
    list_models,
    model_prune_preset,
    register_model,
    resnet50_speedup_preset,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops()


def cifar_resnet_counts(depth: int, classes: int = 10, hw: int = 32) -> tuple[int, int]:
    """(params, 2*MACs) of a 6n+2 option-A CIFAR ResNet, counted by hand from the paper's description."""
    n = (depth - 2) // 6
    params, macs = 3 * 16 * 9 + 2 * 16, hw * hw * 16 * 3 * 9
    in_w, size = 16, hw
    for stage, w in enumerate((16, 32, 64)):
        if stage:
            size //= 2
        for b in range(n):
            cin = in_w if b == 0 else w
            params += cin * w * 9 + w * w * 9 + 4 * w  # two 3x3 convs (no bias) + two BNs
            macs += size * size * w * (cin * 9 + w * 9)
        in_w = w
    params += 64 * classes + classes
    macs += 64 * classes
    return params, 2 * macs


def preset_matches(model: nn.Module, preset: dict) -> list[str]:
    return [name for name, _ in model.named_modules() if any(fnmatch.fnmatchcase(name, p) for p in preset)]


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_resnet_size_matches_hand_count_and_paper(depth):
    model = build_model(ModelSpec(f"resnet{depth}", 10, (3, 32, 32)))
    params, fl = cifar_resnet_counts(depth)
    assert n_params(model) == params
    assert flops(model, (3, 32, 32)) == fl
    if depth == 56:  # the paper's 0.85M params, 0.25 GFLOPs
        assert abs(params - 0.85e6) < 0.01e6 and abs(fl - 0.25e9) < 0.01e9
    else:
        assert abs(params - 0.27e6) < 0.01e6


def test_cifar_resnet_module_names_and_preset():
    model = build_model(ModelSpec("resnet56", 10, (3, 32, 32)))
    names = dict(model.named_modules())
    for name in ("conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2",
                 "layer3.8.conv2", "fc"):
        assert name in names, name
    assert isinstance(names["layer2.0.shortcut"], ShortcutA)
    assert isinstance(names["layer2.1.shortcut"], nn.Identity)
    pruned = preset_matches(model, model_prune_preset("resnet56"))
    assert len(pruned) == 27 and all(n.endswith(".conv1") and n.count(".") == 2 for n in pruned)
    assert set(model_prune_preset("resnet56").values()) == {"pr"}
    pickle.loads(pickle.dumps(model))  # no lambdas inside


def test_option_a_shortcut_is_subsample_plus_zero_channels():
    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(16, 32)(x)
    assert out.shape == (2, 32, 4, 4)
    ref = torch.zeros(2, 32, 4, 4)
    ref[:, 8:24] = x[:, :, 0::2, 0::2]
    assert torch.equal(out, ref)


def test_vgg19_structure_and_preset():
    model = build_model(ModelSpec("vgg19", 100, (3, 32, 32)))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(n.startswith("features.") for n in convs)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 512
    preset = model_prune_preset("vgg19")
    assert preset_matches(model, preset) == convs[1:]
    # Every pruned conv is followed by its BatchNorm in `features`.
    for name in convs[1:]:
        i = int(name.split(".")[1])
        assert isinstance(model.features[i + 1], nn.BatchNorm2d)


def test_torchvision_resnet_presets():
    r50 = build_model(ModelSpec("resnet50", 1000, (3, 224, 224)))
    assert n_params(r50) == 25_557_032  # torchvision's documented ResNet50 size
    matched = preset_matches(r50, model_prune_preset("resnet50"))
    assert len(matched) == 2 * (3 + 4 + 6 + 3)
    assert all(n.split(".")[-1] in ("conv1", "conv2") and n.startswith("layer") for n in matched)
    r18 = build_model(ModelSpec("resnet18", 10, (3, 32, 32)))
    assert len(preset_matches(r18, model_prune_preset("resnet18"))) == 8
    p = resnet50_speedup_preset("2.56x")
    ratio = {n: next(r for pat, r in p.items() if fnmatch.fnmatchcase(n, pat))
             for n in preset_matches(r50, p)}
    assert ratio["layer1.0.conv1"] == ratio["layer2.3.conv2"] == 0.74
    assert ratio["layer3.5.conv1"] == 0.6 and ratio["layer4.2.conv2"] == 0.21
    assert resnet50_speedup_preset("1.49")["layer4.*.conv1"] == 0.14
    assert set(RESNET50_SPEEDUPS) == {"1.49x", "2.31x", "2.56x", "3.06x"}
    with pytest.raises(ValueError, match="2.31x"):
        resnet50_speedup_preset("9x")


@pytest.mark.parametrize("name,shape,classes", [
    ("resnet20", (3, 32, 32), 10), ("resnet32", (3, 24, 20), 7), ("resnet56", (1, 16, 16), 3),
    ("resnet110", (3, 32, 32), 100), ("vgg19", (3, 32, 32), 100), ("resnet18", (3, 32, 32), 5),
    ("resnet34", (1, 32, 32), 10), ("resnet50", (3, 32, 32), 10), ("mlp", (1, 8, 8), 10),
    ("mlp7_linear", (64,), 10),
])
def test_every_builtin_model_forward_shape(name, shape, classes):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, classes, shape)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_every_builtin_is_listed():
    expected = {"resnet20", "resnet32", "resnet56", "resnet110", "vgg19", "resnet18", "resnet34", "resnet50",
                "mlp", "mlp7_linear"}
    assert expected <= set(list_models())


def test_mlp7_linear_is_a_product_of_seven_matrices():
    model = build_model(ModelSpec("mlp7_linear", 10, (1, 32, 32)))
    lins = [model.layers[i] for i in range(7)]
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linear_names == [f"layers.{i}" for i in range(7)]
    assert lins[0].in_features == 1024 and lins[-1].out_features == 10
    assert all(lin.out_features == 100 for lin in lins[:-1])
    x = torch.randn(3, 1, 32, 32)
    ref = x.flatten(1)
    for lin in lins:
        ref = ref @ lin.weight.T + lin.bias
    torch.testing.assert_close(model(x), ref)
    assert model_prune_preset("mlp7_linear") == {f"layers.{i}": "pr" for i in range(6)}


def test_mlp_activation_between_layers_only():
    model = build_model(ModelSpec("mlp", 4, (5,), {"depth": 3, "width": 6, "activation": "relu"}))
    x = torch.randn(8, 5)
    h = F.relu(model.layers[0](x))
    h = F.relu(model.layers[1](h))
    torch.testing.assert_close(model(x), model.layers[2](h))  # no ReLU on the logits
    assert (model(x) < 0).any()
    assert model_prune_preset("mlp", depth=4) == {"layers.0": "pr", "layers.1": "pr", "layers.2": "pr"}
    assert model_prune_preset("mlp") == {f"layers.{i}": "pr" for i in range(6)}  # factory default depth 7
    with pytest.raises(ValueError, match="identity, relu, tanh"):
        build_model(ModelSpec("mlp", 4, (5,), {"activation": "gelu"}))


def test_model_spec_is_hashable_and_round_trips_through_json():
    spec = ModelSpec("mlp", 10, (1, 8, 8), {"depth": 3, "width": 16})
    back = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and hash(back) == hash(spec) and back.input_shape == (1, 8, 8)
    assert ModelSpec("mlp", 10, [1, 8, 8], {"width": 16, "depth": 3}) == spec  # list shape, key order
    assert spec != ModelSpec("mlp", 10, (1, 8, 8), {"depth": 4, "width": 16})
    assert len({spec, back}) == 1
    with pytest.raises(ValueError, match="unknown key"):
        ModelSpec.from_dict({**spec.to_dict(), "extra": 1})


def test_user_model_registration_and_errors():
    @register_model("test_tiny_cnn", prune_preset={"body.0": "pr", "body.2": 0.25})
    def tiny_cnn(num_classes, input_shape, width=4):
        return nn.Sequential(nn.Conv2d(input_shape[0], width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    assert "test_tiny_cnn" in list_models()
    model = build_model(ModelSpec("test_tiny_cnn", 3, (2, 9, 9), {"width": 5}))
    assert model(torch.randn(4, 2, 9, 9)).shape == (4, 3) and model[0].out_channels == 5
    assert model_prune_preset("test_tiny_cnn") == {"body.0": "pr", "body.2": 0.25}
    with pytest.raises(ValueError, match=r"unknown kwarg\(s\) depth; accepted: width"):
        build_model(ModelSpec("test_tiny_cnn", 3, (2, 9, 9), {"depth": 5}))
    with pytest.raises(ValueError, match="unknown model 'nope'.*resnet56"):
        build_model(ModelSpec("nope", 3, (3, 32, 32)))
    with pytest.raises(ValueError, match="unknown model"):
        model_prune_preset("nope")


def test_image_models_reject_flat_inputs():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model(ModelSpec("resnet20", 10, (64,)))


def test_init_is_seeded_and_kaiming():
    a = build_model(ModelSpec("resnet20", 10, (3, 32, 32)))
    torch.manual_seed(1)
    b = build_model(ModelSpec("resnet20", 10, (3, 32, 32)))
    torch.manual_seed(1)
    c = build_model(ModelSpec("resnet20", 10, (3, 32, 32)))
    assert torch.equal(b.conv1.weight, c.conv1.weight) and not torch.equal(a.conv1.weight, b.conv1.weight)
    w = build_model(ModelSpec("resnet110", 10, (3, 32, 32))).layer3[0].conv2.weight  # fan_in 576
    assert abs(w.std().item() - math.sqrt(2 / 576)) < 0.005
