"""Coupled channel groups (coupling "groups") on small hand-built blocks: residual sums, depthwise and
grouped convolutions, squeeze-excitation, a channel shuffle; removal against independent references
(the dense model with the pruned channels forced to 0 where they are produced, and torch_pruning's
own Group.prune), the penalty on every coupled parameter against loops, one-line errors."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual

from tpp.pruning import (
    PruneRegularizer,
    channel_groups,
    find_followers,
    kept_indices,
    pruned_slots,
    rebuild_pruned,
    remove_pruned,
    resolve_layers,
    verify_removal,
    zero_pruned,
)


# ------------------------------------------------------------------------------------------ helpers
@torch.no_grad()
def realistic_bn(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so BN(0) is far from 0; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for bn in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=g))
    return model.eval()


def half_masks(groups, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random half of every group's units pruned (at least one kept)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for root, group in groups.items():
        mask = torch.zeros(group.units, dtype=torch.bool)
        mask[torch.randperm(group.units, generator=g)[: max(1, group.units // 2)]] = True
        if mask.all():
            mask[0] = False
        masks[root] = mask
    return masks


def producer_masked(model: nn.Module, masks, groups) -> nn.Module:
    """The dense model with every pruned channel forced to 0 at the output of each layer producing it
    (filters and BatchNorms; no consumer is touched): what removing the channels must compute."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for root, mask in masks.items():
        for link in (*groups[root].filters, *groups[root].norms):
            positions = link.positions(mask)
            dim = -1 if isinstance(modules[link.name], nn.Linear) else 1

            def hook(_m, _inp, out, positions=positions, dim=dim):
                out = out.clone()
                out.index_fill_(dim % out.dim(), positions.to(out.device), 0.0)
                return out

            modules[link.name].register_forward_hook(hook)
    return ref


def torch_pruning_removed(model: nn.Module, masks, groups, example: torch.Tensor) -> nn.Module:
    """The same channels removed by torch_pruning's own Group.prune (an independent surgery)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    dg = tp.DependencyGraph().build_dependency(ref, example_inputs=(example,), verbose=False)
    for root, mask in masks.items():
        layer = modules[root]
        fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
        dg.get_pruning_group(layer, fn, groups[root].filters[0].positions(mask).tolist()).prune()
    return ref.eval()


def removal_errors(model, masks, groups, x) -> dict[str, float]:
    """max |removed - reference| for the zeroed model, the producer-masked model, and the dense one."""
    zeroed = copy.deepcopy(model)
    zero_pruned(zeroed, masks, groups)
    removed = remove_pruned(model, masks, groups).eval()
    with torch.no_grad():
        out = removed(x)
        return {"zeroed": (out - zeroed(x)).abs().max().item(),
                "masked": (out - producer_masked(model, masks, groups)(x)).abs().max().item(),
                "dense": (out - model(x)).abs().max().item()}


# ------------------------------------------------------------------------------------------ blocks
class ResMini(nn.Module):
    """A stem and two residual blocks on one 8-channel stream, then a classifier."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c11, self.b11 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c12, self.b12 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c21, self.b21 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c22, self.b22 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.b12(self.c12(torch.relu(self.b11(self.c11(x))))))
        x = torch.relu(x + self.b22(self.c22(torch.relu(self.b21(self.c21(x))))))
        return self.fc(x.mean((2, 3)))


def _cbr(cin, cout, k=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


class DepthwiseMini(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1 (a MobileNetV2 block without the shortcut)."""

    def __init__(self):
        super().__init__()
        self.expand, self.dw, self.project = _cbr(3, 8), _cbr(8, 8, 3, groups=8), _cbr(8, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.project(self.dw(self.expand(x))).mean((2, 3)))


class GroupedMini(nn.Module):
    """1x1 conv -> grouped 3x3 conv (2 groups of 4) -> 1x1 conv (a ResNeXt bottleneck body)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _cbr(3, 8), _cbr(8, 8, 3, groups=2), _cbr(8, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


class SEMini(nn.Module):
    """expand -> depthwise -> squeeze-excitation gate (fc1, fc2, sigmoid, product) -> project."""

    def __init__(self):
        super().__init__()
        self.expand, self.dw = _cbr(3, 8, act=nn.SiLU), _cbr(8, 8, 3, groups=8, act=nn.SiLU)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.project, self.fc = _cbr(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = self.dw(self.expand(x))
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.project(x).mean((2, 3)))


class ShuffleMini(nn.Module):
    """Two ShuffleNetV2 blocks (torchvision's): chunk, concatenation and a channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.block, self.down = InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.down(self.block(self.stem(x))).mean((2, 3)))


SHAPE = (3, 8, 8)
BLOCKS = {  # model, pruned layers, the expected group of the first: filters, norms, consumers, units
    "residual": (ResMini, ["c12"], ({"c12", "stem", "c22"}, {"b12", "bn", "b22"}, {"c11", "c21", "fc"}, 8)),
    "depthwise": (DepthwiseMini, ["expand.0"],
                  ({"expand.0", "dw.0"}, {"expand.1", "dw.1"}, {"project.0"}, 8)),
    "grouped": (GroupedMini, ["a.0", "b.0"], ({"a.0"}, {"a.1"}, {"b.0"}, 4)),
    "squeeze-excitation": (SEMini, ["expand.0", "fc1"],
                           ({"expand.0", "dw.0", "fc2"}, {"expand.1", "dw.1"}, {"fc1", "project.0"}, 8)),
}


@pytest.mark.parametrize("block", list(BLOCKS))
def test_coupled_groups_hold_every_tied_member(block):
    make, layers, (filters, norms, consumers, units) = BLOCKS[block]
    group = find_followers(make(), torch.zeros(1, *SHAPE), layers[:1], coupling="groups")[layers[0]]
    assert group.filters[0].name == layers[0]  # the pruned layer first
    assert {link.name for link in group.filters} == filters
    assert {link.name for link in group.norms} == norms
    assert {link.name for link in group.consumers} == consumers
    assert group.units == units


def test_grouped_conv_units_are_equal_positions_in_every_group():
    model = GroupedMini()
    groups = find_followers(model, torch.zeros(1, *SHAPE), ["a.0", "b.0"], coupling="groups")
    a, b = groups["a.0"], groups["b.0"]
    # a's channel c feeds column c % 4 of the grouped conv: channels c and c + 4 are one unit
    assert a.filters[0].root == (0, 1, 2, 3, 0, 1, 2, 3)
    assert a.consumers[0].index == (0, 1, 2, 3) and a.consumers[0].root == (0, 1, 2, 3)
    assert b.filters[0].root == (0, 1, 2, 3, 0, 1, 2, 3) and b.units == 4  # its own rows: per group
    masks = {"a.0": torch.tensor([False, True, False, True]),
             "b.0": torch.tensor([True, False, False, False])}
    removed = remove_pruned(model, masks, groups)
    assert removed.b[0].weight.shape == (6, 2, 3, 3) and removed.b[0].groups == 2
    assert removed.b[0].in_channels == 4 and removed.a[0].out_channels == 4 and removed.c[0].in_channels == 6


@pytest.mark.parametrize("block", list(BLOCKS))
def test_coupled_removal_equals_the_masked_model_and_torch_pruning(block):
    torch.manual_seed(0)
    make, layers, _ = BLOCKS[block]
    model = realistic_bn(make(), SHAPE)
    roots, groups = channel_groups(model, torch.zeros(1, *SHAPE), dict.fromkeys(layers, 0.5), "groups")
    masks = half_masks(groups)
    x = torch.randn(4, *SHAPE)
    errors = removal_errors(model, masks, groups, x)
    assert errors["zeroed"] <= 1e-5 and errors["masked"] <= 1e-5, errors
    assert errors["dense"] > 1e-3, "the check is not vacuous"
    ours = remove_pruned(model, masks, groups).eval()
    theirs = torch_pruning_removed(model, masks, groups, torch.zeros(1, *SHAPE))
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5


def test_rebuild_from_kept_units_reproduces_the_coupled_removal():
    torch.manual_seed(0)
    model = realistic_bn(SEMini(), SHAPE)
    _, groups = channel_groups(model, torch.zeros(1, *SHAPE), {"expand.0": 0.5, "fc1": 0.5}, "groups")
    masks = half_masks(groups, seed=3)
    removed = remove_pruned(model, masks, groups).eval()
    rebuilt = rebuild_pruned(SEMini(), kept_indices(masks), torch.zeros(1, *SHAPE))
    rebuilt.load_state_dict(removed.state_dict())
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), removed(x))


def test_coupled_layers_matched_together_are_one_group_with_one_ratio():
    model = ResMini()
    x = torch.zeros(1, *SHAPE)
    ratios = resolve_layers(model, {"c*2": 0.5, "stem": 0.5}, coupling="groups")
    roots, groups = channel_groups(model, x, ratios, "groups")
    assert list(roots) == ["c12"] and roots["c12"] == 0.5  # c22 and stem are in c12's group
    with pytest.raises(ValueError, match=r"'stem' and 'c12' are one channel group .* different ratios"):
        channel_groups(model, x, {"c12": 0.5, "stem": 0.3}, "groups")


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("block,layer,message", [
    ("residual", "c12", r"tied \(e\.g\. by a residual sum\) to the outputs of .*coupling: groups"),
    ("depthwise", "expand.0", r"feeds the depthwise convolution 'dw\.0' \(its channels go with its input\)"),
    ("grouped", "a.0", r"feeds the grouped convolution 'b\.0'.*coupling: groups"),
])
def test_the_papers_mode_names_the_tie_and_the_fix(block, layer, message):
    make, _, _ = BLOCKS[block]
    with pytest.raises(ValueError, match=message) as e:
        find_followers(make(), torch.zeros(1, *SHAPE), [layer], coupling="none")
    assert "\n" not in str(e.value)


def test_glob_patterns_skip_grouped_convs_in_the_papers_mode_and_explicit_names_fail():
    model = DepthwiseMini()
    assert sorted(resolve_layers(model, {"*": 0.5, "fc": 0.0})) == ["expand.0", "fc", "project.0"]
    assert "dw.0" in resolve_layers(model, {"*": 0.5, "fc": 0.0}, coupling="groups")
    with pytest.raises(ValueError, match=r"'dw\.0' is a grouped convolution \(groups=8\).*coupling: groups"):
        resolve_layers(model, {"dw.0": 0.5})


class NormedMini(nn.Module):
    """Channels normalised together by a LayerNorm (ConvNeXt style)."""

    def __init__(self):
        super().__init__()
        self.a, self.norm = nn.Conv2d(3, 8, 1), nn.LayerNorm(8)
        self.b, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.norm(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.b(x).mean((2, 3)))


@pytest.mark.parametrize("model,layer,message", [
    (NormedMini, "a", r"normalised together by 'norm' \(LayerNorm\).*could not be exact"),
    (ResMini, "fc", "final classifier"),
])
def test_unsupported_groups_are_one_line_errors(model, layer, message):
    with pytest.raises(ValueError, match=message) as e:
        find_followers(model(), torch.zeros(1, *SHAPE), [layer], coupling="groups")
    assert "\n" not in str(e.value)


def test_a_channel_shuffle_that_torch_pruning_maps_wrongly_is_caught_before_any_work():
    torch.manual_seed(0)
    model = realistic_bn(ShuffleMini(), SHAPE)
    x = torch.randn(4, *SHAPE)
    # Inside a branch the group is plain and exact:
    _, inner = channel_groups(model, torch.zeros(1, *SHAPE), {"block.branch2.0": 0.5}, "groups")
    masks = half_masks(inner)
    assert verify_removal(model, masks, inner, x) <= 1e-6
    assert removal_errors(model, masks, inner, x)["masked"] <= 1e-5
    # Across the shuffle torch_pruning maps the channels as if it were the identity: caught, one line.
    _, crossing = channel_groups(model, torch.zeros(1, *SHAPE), {"block.branch2.5": 0.5}, "groups")
    with pytest.raises(ValueError, match=r"'block\.branch2\.5' would change the model's outputs") as e:
        verify_removal(model, half_masks(crossing), crossing, x)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ penalty
def gram_by_loops(w: torch.Tensor, pruned_rows: torch.Tensor) -> torch.Tensor:
    """The paper's L_gram of one weight, one filter pair at a time (float64)."""
    rows = w.reshape(w.shape[0], -1).double()
    n, total = rows.shape[0], torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            g = torch.dot(rows[i], rows[j])
            target = g.detach() if not (pruned_rows[i] or pruned_rows[j]) else 0.0
            total = total + (g - target) ** 2
    return total / n**2


def test_coupled_penalty_acts_on_every_member_of_the_group():
    torch.manual_seed(0)
    model = realistic_bn(SEMini(), SHAPE).train()
    _, groups = channel_groups(model, torch.zeros(1, *SHAPE), {"expand.0": 0.5}, "groups")
    masks = half_masks(groups, seed=1)
    reg = PruneRegularizer(model, masks, groups, gram=True, bn=True, lw=10.0)
    modules = dict(model.named_modules())
    # gram term: one per filter member (expand, depthwise, the SE gate's fc2), each with its pruned rows
    members = [modules[n].weight for n in ("expand.0", "dw.0", "fc2")]
    loss = reg.loss(0.5)
    ref_w = [w.detach().double().requires_grad_() for w in members]
    ref = 10.0 * 0.5 * sum(gram_by_loops(w, masks["expand.0"]) for w in ref_w)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(torch.autograd.grad(loss, members), torch.autograd.grad(ref, ref_w), strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)
    # L2 and BatchNorm terms: factor * w on the pruned rows of every filter member and BatchNorm
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.add_l2_grads(0.25)
    p = masks["expand.0"]
    penalised = {"expand.0.weight", "dw.0.weight", "fc2.weight", "fc2.bias", "expand.1.weight",
                 "expand.1.bias",
                 "dw.1.weight", "dw.1.bias"}
    for name, param in model.named_parameters():
        expected = torch.zeros_like(param)
        if name in penalised:
            expected[p] = 0.25 * param.detach()[p]
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=1e-7, msg=name)
    # the consumers' columns (fc1, project) are zeroed with the group, never penalised
    assert {(s.module, s.role) for s in pruned_slots(model, "expand.0", p, groups["expand.0"])
            if s.role == "consumer"} == {("fc1", "consumer"), ("project.0", "consumer")}
