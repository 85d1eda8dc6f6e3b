"""tpp.pruning against independent references: loops for the penalty, hand-written masks, the paper."""

import copy
import functools

import pytest
import torch
from torch import nn

from tpp.metrics import count_flops, count_params
from tpp.models import ModelSpec, build_model, model_prune_preset
from tpp.pruning import (
    PruneRegularizer,
    expand_preset,
    find_followers,
    kept_indices,
    orthp_reinit,
    rebuild_pruned,
    remove_pruned,
    resolve_layers,
    select_l1,
    zero_pruned,
)
from tpp.results import PrunedModel, example_input

CIFAR = (3, 32, 32)


def user_sequential() -> nn.Sequential:
    """A user model of standard layers: conv biases, a sigmoid (f(0) != 0), a flatten of a 4x4 map."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, bias=True), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.Tanh(), nn.Linear(12, 5),
    )


SEQ_SHAPE = (3, 20, 20)  # conv(pad 1) 20 -> conv(3, stride 2) 9 -> pool 4
SEQ_RATIOS = {"0": 0.5, "3": 0.5, "7": 0.5}


@torch.no_grad()
def realistic_bn(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Running statistics from a few random batches, random affine params: BN(0) is far from 0."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for _ in range(2):
        model(torch.randn(8, *shape, generator=g))
    for bn in bns:
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=g))
        bn.momentum = 0.1
    return model.eval()


def preset_ratios(model: nn.Module, name: str, pr: float, **kwargs) -> dict[str, float]:
    return resolve_layers(model, expand_preset(model_prune_preset(name, **kwargs), pr))


# ------------------------------------------------------------------------------------------ layers
def test_expand_preset_and_resolve_layers():
    assert expand_preset({"a*": "pr", "b": 0.2}, 0.7) == {"a*": 0.7, "b": 0.2}
    model = build_model(ModelSpec("resnet20", 10, CIFAR))
    ratios = preset_ratios(model, "resnet20", 0.5)
    assert sorted(ratios) == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    with pytest.raises(ValueError, match=r"'layer9\.\*' matches no prunable.*layer1\.0\.conv1"):
        resolve_layers(model, {"layer9.*": 0.5})
    with pytest.raises(ValueError, match="'fc' is the final classifier"):
        resolve_layers(model, {"*conv1": 0.5, "fc": 0.3})
    with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\)"):
        resolve_layers(model, {"layer1.0.conv1": 1.0})
    assert resolve_layers(model, {"*": 0.5, "fc": 0.0})["fc"] == 0.0  # later patterns override earlier


# ------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("pr,kept", [(0.9, (1, 3, 6)), (0.95, (1, 1, 3)), (0.5, (8, 16, 32)),
                                     (0.3, (11, 22, 44))])
def test_selection_counts_follow_the_authors_rounding(pr, kept):
    model = build_model(ModelSpec("resnet56", 10, CIFAR))
    masks = select_l1(model, preset_ratios(model, "resnet56", pr))
    assert len(masks) == 27
    for name, mask in masks.items():
        stage = int(name[len("layer")])
        assert int((~mask).sum()) == kept[stage - 1], name


def test_selection_prunes_the_smallest_l1_filters_with_index_tie_breaking():
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        # Row L1 means: 5, 1, 3, 1, 0.5, 2 -> the three smallest are rows 4, 1, 3 (1 and 3 tie).
        model[0].weight.copy_(torch.tensor([5.0, 1, 3, 1, 0.5, 2])[:, None] * torch.tensor([1.0, -1, 1]))
    mask = select_l1(model, {"0": 0.5})["0"]
    assert mask.tolist() == [False, True, False, True, True, False]
    # One of two tied filters: the lower index goes first.
    assert select_l1(model, {"0": 0.3})["0"].tolist() == [False, True, False, False, True, False]
    assert kept_indices({"0": mask}) == {"0": [0, 2, 5]}


# ------------------------------------------------------------------------------------------ followers
def test_followers_of_builtin_and_user_models():
    model = build_model(ModelSpec("resnet20", 10, CIFAR))
    f = find_followers(model, torch.zeros(1, *CIFAR), ["layer2.0.conv1"])["layer2.0.conv1"]
    assert f.bn == "layer2.0.bn1" and [c.name for c in f.consumers] == ["layer2.0.conv2"]
    seq = user_sequential()
    fs = find_followers(seq, torch.zeros(1, *SEQ_SHAPE), ["0", "3", "7"])
    assert fs["0"].bn == "1" and fs["3"].bn is None and fs["7"].bn is None
    (lin,) = fs["3"].consumers
    assert lin.name == "7" and len(lin.index) == 96  # 6 channels x 4x4 positions after the flatten
    assert sorted(i for i, r in zip(lin.index, lin.root, strict=True) if r == 2) == list(range(32, 48))


def test_find_followers_rejects_tied_layers_and_the_classifier_and_keeps_the_model_untouched():
    model = build_model(ModelSpec("resnet20", 10, CIFAR)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="tied"):
        find_followers(model, torch.zeros(1, *CIFAR), ["layer1.0.conv2"])
    with pytest.raises(ValueError, match="final classifier"):
        find_followers(model, torch.zeros(1, *CIFAR), ["fc"])
    find_followers(model, torch.zeros(1, *CIFAR), ["layer1.0.conv1"])
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ penalty
def gram_loss_by_loops(weights: list[torch.Tensor], masks: list[torch.Tensor], target: str) -> torch.Tensor:
    """The paper's L_gram from its definition, one filter pair at a time, summed over layers."""
    total = torch.zeros((), dtype=torch.float64)
    for w, mask in zip(weights, masks, strict=True):
        rows = w.reshape(w.shape[0], -1).double()
        n = rows.shape[0]
        layer = torch.zeros((), dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                g = torch.dot(rows[i], rows[j])
                kept_pair = not mask[i] and not mask[j]
                if target == "gram":
                    t = g.detach() if kept_pair else 0.0
                else:
                    t = 1.0 if (i == j and not mask[i]) else 0.0
                layer = layer + (g - t) ** 2
        total = total + layer / n**2
    return total


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(),
                         nn.Conv2d(6, 7, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3))


@pytest.mark.parametrize("target", ["gram", "identity"])
def test_gram_loss_and_its_gradient_equal_the_definition(target):
    model = small_net()
    ratios = {"0": 0.5, "3": 0.4, "6": 0.6, "8": 0.3}  # "3" and "6" have one shape: a batched group
    masks = select_l1(model, ratios)
    followers = find_followers(model, torch.zeros(1, 3, 12, 12), list(masks))
    reg = PruneRegularizer(model, masks, followers, gram=True, bn=True, target=target, lw=1000.0)
    layers = [dict(model.named_modules())[n] for n in masks]
    loss = reg.loss(0.37)
    grads = torch.autograd.grad(loss, [m.weight for m in layers])
    ref_weights = [m.weight.detach().double().requires_grad_() for m in layers]
    ref = 1000.0 * 0.37 * gram_loss_by_loops(ref_weights, [masks[n] for n in masks], target)
    ref_grads = torch.autograd.grad(ref, ref_weights)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)
    assert reg.loss(0.0).item() == 0.0
    no_gram = PruneRegularizer(model, masks, followers, gram=False, bn=True)
    assert no_gram.loss(0.5).item() == 0.0


@pytest.mark.parametrize("bn", [True, False])
def test_l2_grads_are_factor_times_w_on_pruned_entries_only(bn):
    model = small_net()
    masks = select_l1(model, {"0": 0.5, "3": 0.4})
    followers = find_followers(model, torch.zeros(1, 3, 12, 12), list(masks))
    reg = PruneRegularizer(model, masks, followers, gram=True, bn=bn)
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.add_l2_grads(0.25)
    # Hand-written reference: which rows of which parameter belong to pruned outputs.
    pruned_rows = {"0.weight": masks["0"], "0.bias": masks["0"], "3.weight": masks["3"], "3.bias": masks["3"]}
    if bn:
        pruned_rows.update({"1.weight": masks["0"], "1.bias": masks["0"],
                            "4.weight": masks["3"], "4.bias": masks["3"]})
    for n, p in model.named_parameters():
        expected = torch.zeros_like(p)
        if n in pruned_rows:
            rows = pruned_rows[n]
            expected[rows] = 0.25 * p.detach()[rows]
        torch.testing.assert_close(p.grad - before[n], expected, rtol=0, atol=1e-6)


def test_zero_layer_and_reapply_keep_the_pruned_outputs_zero():
    model = small_net()
    masks = select_l1(model, {"0": 0.5, "3": 0.4})
    followers = find_followers(model, torch.zeros(1, 3, 12, 12), list(masks))
    reg = PruneRegularizer(model, masks, followers, gram=True, bn=False)
    reg.zero_layer("0")
    p0, p1 = masks["0"], masks["3"]
    assert model[0].weight[p0].abs().sum() == 0 and model[0].bias[p0].abs().sum() == 0
    assert model[1].weight[p0].abs().sum() == 0 and model[1].bias[p0].abs().sum() == 0
    assert model[3].weight[:, p0].abs().sum() == 0  # the consumer's input columns
    assert model[0].weight[~p0].abs().sum() > 0 and model[3].weight[~p1][:, ~p0].abs().sum() > 0
    with torch.no_grad():  # an optimizer step moves everything
        for p in model.parameters():
            p.add_(1.0)
    kept_before = model[0].weight[~p0].clone()
    reg.reapply_zeros()
    assert model[0].weight[p0].abs().sum() == 0 and model[3].weight[:, p0].abs().sum() == 0
    assert torch.equal(model[0].weight[~p0], kept_before)
    assert model[3].weight[p1].abs().sum() > 0  # layer "3" not zeroed yet
    reg.zero_all()
    assert model[3].weight[p1].abs().sum() == 0 and reg.zeroed == ["0", "3"]


def test_regularizer_drives_pruned_filters_to_zero():
    model = small_net()
    masks = select_l1(model, {"0": 0.5, "3": 0.4})
    followers = find_followers(model, torch.zeros(1, 3, 12, 12), list(masks))
    reg = PruneRegularizer(model, masks, followers, gram=True, bn=True, lw=10.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 3, (16,))
    norm0, kept0 = model[0].weight[masks["0"]].norm().item(), model[0].weight[~masks["0"]].norm().item()
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x), y) + reg.loss(1.0)
        opt.zero_grad()
        loss.backward()
        reg.add_l2_grads(1.0)
        opt.step()
    assert model[0].weight[masks["0"]].norm().item() < 0.05 * norm0
    assert model[0].weight[~masks["0"]].norm().item() > 0.5 * kept0


# ------------------------------------------------------------------------------------------ removal
BUILTINS = [("resnet20", CIFAR, {}), ("resnet56", CIFAR, {}), ("vgg19", CIFAR, {}), ("resnet18", CIFAR, {}),
            ("resnet50", CIFAR, {}), ("mlp", (1, 8, 8), {"depth": 4, "width": 32, "activation": "relu"}),
            ("mlp7_linear", (1, 16, 16), {})]


def bn_after(model_name: str, layer: str) -> str | None:
    """Hand-written: the BatchNorm right after each pruned layer of the built-in models."""
    if model_name.startswith("resnet"):
        return layer.replace("conv", "bn")
    if model_name == "vgg19":
        prefix, idx = layer.rsplit(".", 1)
        return f"{prefix}.{int(idx) + 1}"
    return None


def hooked_reference(model: nn.Module, model_name: str, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The dense model with the pruned channels forced to 0 after their BN (forward hooks)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for layer, mask in masks.items():
        at = bn_after(model_name, layer) or layer
        keep = (~mask).float()

        def hook(_m, _inp, out, keep=keep):
            shape = (1, -1) + (1,) * (out.dim() - 2)
            return out * keep.view(shape)

        modules[at].register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("name,shape,kwargs", BUILTINS, ids=[b[0] for b in BUILTINS])
def test_removed_model_equals_the_masked_model(name, shape, kwargs):
    torch.manual_seed(0)
    model = realistic_bn(build_model(ModelSpec(name, 10, shape, kwargs)), shape)
    masks = select_l1(model, preset_ratios(model, name, 0.6, **kwargs))
    followers = find_followers(model, torch.zeros(1, *shape), list(masks))
    zeroed = copy.deepcopy(model)
    zero_pruned(zeroed, masks, followers)
    removed = remove_pruned(model, masks, followers).eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        out_removed, out_zeroed = removed(x), zeroed(x)
        out_hooked, out_dense = hooked_reference(model, name, masks)(x), model(x)
    assert (out_removed - out_zeroed).abs().max().item() <= 1e-5
    assert (out_removed - out_hooked).abs().max().item() <= 1e-5
    assert (out_removed - out_dense).abs().max().item() > 1e-3  # the check is not vacuous
    assert count_params(removed) < count_params(model)
    modules = dict(removed.named_modules())
    for layer, mask in masks.items():
        assert modules[layer].weight.shape[0] == int((~mask).sum())
        if bn_after(name, layer):
            bn = modules[bn_after(name, layer)]
            assert bn.num_features == bn.running_mean.numel() == bn.weight.numel() == int((~mask).sum())


def test_user_sequential_removal_with_sigmoid_flatten_and_rebuild():
    torch.manual_seed(0)
    seq = realistic_bn(user_sequential(), SEQ_SHAPE)
    masks = select_l1(seq, SEQ_RATIOS)
    followers = find_followers(seq, torch.zeros(1, *SEQ_SHAPE), list(masks))
    zeroed = copy.deepcopy(seq)
    zero_pruned(zeroed, masks, followers)
    removed = remove_pruned(seq, masks, followers).eval()
    assert removed[7].in_features == 3 * 16 and removed[3].out_channels == 3 and removed[1].num_features == 4
    x = torch.randn(5, *SEQ_SHAPE)
    with torch.no_grad():
        assert (removed(x) - zeroed(x)).abs().max().item() <= 1e-5
    rebuilt = rebuild_pruned(user_sequential(), kept_indices(masks), torch.zeros(1, *SEQ_SHAPE))
    rebuilt.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), removed(x))


class Concat(nn.Module):
    """Two branches concatenated into one BatchNorm and one consumer (DenseNet/Inception style)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn, self.c, self.fc = nn.BatchNorm2d(10), nn.Conv2d(10, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.relu(self.c(y)).mean((2, 3)))


def test_concatenated_branches_map_to_offset_channels():
    torch.manual_seed(0)
    model = realistic_bn(Concat(), (3, 8, 8))
    masks = select_l1(model, {"a": 0.5, "b": 0.5, "c": 0.4})
    followers = find_followers(model, torch.zeros(1, 3, 8, 8), list(masks))
    assert followers["b"].bn == "bn" and followers["b"].norms[0].index == tuple(range(4, 10))
    zeroed = copy.deepcopy(model)
    zero_pruned(zeroed, masks, followers)
    removed = remove_pruned(model, masks, followers).eval()
    assert removed.bn.num_features == 5 and removed.c.in_channels == 5 and removed.fc.in_features == 3
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert (removed(x) - zeroed(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,shape,kwargs", [BUILTINS[0], BUILTINS[5]], ids=["resnet20", "mlp"])
def test_rebuild_and_state_dict_round_trip(name, shape, kwargs):
    spec = ModelSpec(name, 10, shape, kwargs)
    model = realistic_bn(build_model(spec), shape)
    masks = select_l1(model, preset_ratios(model, name, 0.7, **kwargs))
    removed = remove_pruned(model, masks, find_followers(model, example_input(spec), list(masks))).eval()
    state = {k: v.clone() for k, v in removed.state_dict().items()}
    rebuilt = PrunedModel(spec, kept_indices(masks), state).build().eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), removed(x))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}


# ------------------------------------------------------------------------------------------ paper numbers
# TPP paper, ResNet56 / CIFAR-10: layerwise PR -> (sparsity %, FLOPs speed-up).
PAPER = {0.3: (31.14, 1.45), 0.5: (49.82, 1.99), 0.7: (70.57, 3.59), 0.9: (90.39, 11.41),
         0.95: (95.19, 19.31)}


def test_resnet56_sparsity_and_speedups_match_the_paper():
    model = build_model(ModelSpec("resnet56", 10, CIFAR))
    params, flops = count_params(model), count_flops(model, CIFAR)
    assert params == 853_018 and abs(flops / 0.25e9 - 1) < 0.01
    for pr, (sparsity, speedup) in PAPER.items():
        masks = select_l1(model, preset_ratios(model, "resnet56", pr))
        removed = remove_pruned(model, masks, find_followers(model, torch.zeros(1, *CIFAR), list(masks)))
        got_sparsity = 100 * (1 - count_params(removed) / params)
        got_speedup = flops / count_flops(removed, CIFAR)
        print(f"PR {pr}: sparsity {got_sparsity:.2f}% (paper {sparsity}%), "
              f"speed-up {got_speedup:.2f}x (paper {speedup}x)")
        # Parameters are counted the same way as the paper: equal to its 2 decimals (+-0.1 pp).
        assert got_sparsity == pytest.approx(sparsity, abs=0.1)
        # FLOP counters differ in what else they count (BN, ReLU, pooling, the shortcut); those extras
        # weigh more as the convs shrink, so the speed-up may drift a few percent at 0.9/0.95.
        assert got_speedup == pytest.approx(speedup, rel=0.05)


# ------------------------------------------------------------------------------------------ OrthP
def test_orthp_makes_every_linear_an_isometry():
    torch.manual_seed(0)
    shape = (1, 16, 16)
    model = build_model(ModelSpec("mlp7_linear", 10, shape))
    masks = select_l1(model, preset_ratios(model, "mlp7_linear", 0.5))
    removed = remove_pruned(model, masks, find_followers(model, torch.zeros(1, *shape), list(masks)))
    before = [m.weight.clone() for m in removed.modules() if isinstance(m, nn.Linear)]
    assert orthp_reinit(removed) == 7
    linears = [m for m in removed.modules() if isinstance(m, nn.Linear)]
    for lin, w0 in zip(linears, before, strict=True):
        s = torch.linalg.svdvals(lin.weight.detach().double())
        assert s.numel() == min(lin.weight.shape)
        torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-5)
        assert lin.weight.shape == w0.shape
    # The product of the seven layers (the linear MLP's Jacobian) is an isometry too.
    jac = functools.reduce(torch.matmul, [lin.weight.detach().double() for lin in reversed(linears)])
    torch.testing.assert_close(torch.linalg.svdvals(jac), torch.ones(10).double(), rtol=0, atol=1e-5)
