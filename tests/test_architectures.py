"""The modern architectures: torchvision's MobileNetV2, EfficientNet-B0, ResNeXt-50, RegNetY-400MF,
ShuffleNetV2, ConvNeXt-T and our small ViT, pruned by their presets with coupled groups: removal
exact against the producer-masked model and torch_pruning's Group.prune (float32, eval, random
weights), params and FLOPs before/after, `tpp run` end to end on tiny inputs, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from test_pruning_groups import half_masks, realistic_bn, removal_errors, torch_pruning_removed
from torch import nn

from tpp.config import RunConfig
from tpp.metrics import count_flops, count_params
from tpp.models import ModelSpec, build_model, model_prune_preset
from tpp.pruning import channel_groups, expand_preset, find_followers, remove_pruned, resolve_layers
from tpp.run import run_pipeline

SHAPE = (3, 32, 32)
# name: (kwargs, groups of the preset, torch_pruning can trace the whole model)
MODELS = {
    "mobilenet_v2": ({}, 18, True),
    "efficientnet_b0": ({}, 33, True),
    "resnext50_32x4d": ({}, 32, True),
    "regnet_y_400mf": ({}, 32, True),
    "shufflenet_v2_x1_0": ({}, 16, False),  # the channel shuffle: traced inside each block's branch
    "convnext_tiny": ({}, 18, True),
    "vit": ({}, 12, True),
}


def preset_groups(model: nn.Module, name: str, pr: float = 0.5, coupling: str = "groups"):
    patterns = expand_preset(model_prune_preset(name), pr)
    ratios = {k: r for k, r in resolve_layers(model, patterns, coupling).items() if r > 0}
    return channel_groups(model, torch.zeros(1, *SHAPE), ratios, coupling)


def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = realistic_bn(build_model(ModelSpec(name, 10, SHAPE, MODELS[name][0])), SHAPE)
    with torch.no_grad():  # ConvNeXt's layer scale starts at 1e-6: a block would barely change the output
        for n, p in model.named_parameters():
            if n.endswith("layer_scale"):
                p.fill_(1.0)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_preset_removal_is_exact_and_smaller(name):
    model = built(name)
    roots, groups = preset_groups(model, name)
    assert len(roots) == MODELS[name][1]
    masks = half_masks(groups)
    x = torch.randn(2, *SHAPE)
    errors = removal_errors(model, masks, groups, x)
    removed = remove_pruned(model, masks, groups).eval()
    params = (count_params(model), count_params(removed))
    flops = (count_flops(model, SHAPE), count_flops(removed, SHAPE))
    print(f"{name}: max|Δ| zeroed {errors['zeroed']:.1e} masked {errors['masked']:.1e}; params {params[0]:,} "
          f"-> {params[1]:,}; FLOPs {flops[0] / 1e6:.1f}M -> {flops[1] / 1e6:.1f}M")
    assert errors["zeroed"] <= 1e-5 and errors["masked"] <= 1e-5, errors
    assert errors["dense"] > 1e-3, "the check is not vacuous"
    assert params[1] < 0.8 * params[0] and flops[1] < 0.8 * flops[0]
    if MODELS[name][2]:
        theirs = torch_pruning_removed(model, masks, groups, torch.zeros(1, *SHAPE))
        with torch.no_grad():
            assert (removed(x) - theirs(x)).abs().max().item() <= 1e-5


def test_grouped_and_head_groups_have_the_right_units():
    resnext = build_model(ModelSpec("resnext50_32x4d", 10, SHAPE))
    _, groups = preset_groups(resnext, "resnext50_32x4d")
    assert groups["layer1.0.conv1"].units == 4 and groups["layer1.0.conv2"].units == 4  # 32 groups of 4
    vit = build_model(ModelSpec("vit", 10, SHAPE))
    _, groups = preset_groups(vit, "vit")
    assert groups["blocks.0.attn.qkv"].units == 6 and groups["blocks.0.mlp.fc1"].units == 384
    mask = torch.tensor([True, False, True, False, False, False])
    removed = remove_pruned(vit, {"blocks.0.attn.qkv": mask}, groups)
    assert removed.blocks[0].attn.heads == 4 and removed.blocks[0].attn.proj.in_features == 4 * 32


def test_a_star_pattern_on_mobilenet_v2():
    model = built("mobilenet_v2")
    everything = {"*": 0.5, "classifier.1": 0.0}
    # the paper's mode skips the depthwise convs, then names the first layer that feeds one
    ratios = {k: r for k, r in resolve_layers(model, everything).items() if r > 0}
    assert not any(model.get_submodule(n).groups > 1 for n in ratios if n.startswith("features"))
    with pytest.raises(ValueError, match=r"'features\.0\.0' feeds the depthwise convolution"):
        find_followers(model, torch.zeros(1, *SHAPE), list(ratios), coupling="none")
    # coupled, every conv prunes (residual streams included), exactly
    ratios = {k: r for k, r in resolve_layers(model, everything, "groups").items() if r > 0}
    roots, groups = channel_groups(model, torch.zeros(1, *SHAPE), ratios, "groups")
    assert len(roots) == 25
    errors = removal_errors(model, half_masks(groups), groups, torch.randn(2, *SHAPE))
    assert errors["zeroed"] <= 1e-5 and errors["masked"] <= 1e-5


def test_other_input_channels_replace_the_stem():
    for name in ("efficientnet_b0", "shufflenet_v2_x1_0", "vit"):
        model = build_model(ModelSpec(name, 7, (1, 32, 32))).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


TINY = dict(data="synthetic", method="tpp", pr=0.5,
            data_kwargs={"input_shape": list(SHAPE), "n_train": 16, "n_test": 8, "num_classes": 4},
            batch_size=8, reg_batch_size=8, dense_batch_size=8, epochs=1, dense_epochs=0,
            growth=0.5, update_reg_interval=1, stabilize_reg_interval=1, jsv_samples=2, eval_batch_size=8,
            device="cpu")


# The three largest (23-28M parameters) run the penalty-free pipeline, to keep the suite short.
BIG = ("resnext50_32x4d", "convnext_tiny", "efficientnet_b0")


@pytest.mark.parametrize("name", list(MODELS))
def test_runs_end_to_end_with_the_coupled_penalty(name):
    method = "l1" if name in BIG else "tpp"
    out = run_pipeline(RunConfig(model=name, model_kwargs=MODELS[name][0], **{**TINY, "method": method}))
    result = out.members[0]
    assert result.status == "completed" and out.pruned.metrics["iters_prune"] == (0 if name in BIG else 3)
    metrics = out.pruned.metrics
    assert metrics["speedup"] > 1.4 and metrics["params"] < metrics["params_dense"]
    assert torch.isfinite(torch.tensor(result.metrics["final_jsv_mean"]))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tpp.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_runs_the_vit_on_digits_and_refuses_a_shuffle_crossing_layer_in_one_line():
    common = ["--model", "vit", "--model-kwargs", '{"patch": 2, "dim": 32, "depth": 2, "heads": 4}',
              "--data", "digits", "--device", "cpu", "--dense-epochs", "1", "--epochs", "1",
              "--jsv-samples", "2"]
    proc = run_cli("run", *common, "--method", "l1", "--pr", "0.5", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["speedup"] > 1.5
    assert out["config"]["coupling"] == "auto"
    proc = run_cli("run", "--model", "shufflenet_v2_x1_0", "--data", "synthetic", "--data-kwargs",
                   '{"input_shape": [3, 32, 32], "n_train": 8, "n_test": 8}', "--prune-layers",
                   '{"stage2.0.branch2.5": 0.5}', "--dense-epochs", "0", "--epochs", "1", "--device", "cpu",
                   "--quiet")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "stage2.0.branch2.5" in proc.stderr and "Traceback" not in proc.stderr
