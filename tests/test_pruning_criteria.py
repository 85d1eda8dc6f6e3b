"""Selection criteria against references computed another way: torch_pruning's importance classes
where the definitions agree, float64 loops where they do not; coupled aggregation against explicit
gathering; global ranking and its per-layer floor."""

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from test_pruning_groups import SEMini, realistic_bn
from torch import nn

from tpp.pruning import (
    ScoreInputs,
    find_followers,
    masks_from_scores,
    register_criterion,
    score_units,
    select_l1,
)
from tpp.pruning.criteria import CRITERIA, lamp_normalise

SHAPE = (3, 8, 8)


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


def batches(n: int = 12, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *SHAPE, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


def inputs(model: nn.Module, layers: list[str], coupling: str = "none", seed: int = 0) -> ScoreInputs:
    groups = find_followers(model, torch.zeros(1, *SHAPE), layers, coupling)
    return ScoreInputs(model, groups, coupling, seed, batches)


def tp_group(model: nn.Module, layer: str):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *SHAPE), verbose=False)
    module = dict(model.named_modules())[layer]
    return dg.get_pruning_group(module, tp.prune_conv_out_channels, list(range(module.out_channels)))


# ------------------------------------------------------------------------------------ per layer
def test_l1_is_the_papers_mean_absolute_weight_and_selects_like_select_l1():
    model = realistic_bn(conv_net(), SHAPE)
    scores = score_units("l1", inputs(model, ["0", "3"]))
    for name in ("0", "3"):
        w = dict(model.named_modules())[name].weight.detach().double()
        ref = torch.tensor([w[i].abs().sum().item() / w[i].numel() for i in range(w.shape[0])],
                           dtype=torch.float64)
        torch.testing.assert_close(scores[name].double(), ref, rtol=1e-6, atol=0)
    ratios = {"0": 0.5, "3": 0.4}
    masks = masks_from_scores(scores, ratios)
    assert all(torch.equal(masks[n], m) for n, m in select_l1(model, ratios).items())


@pytest.mark.parametrize("criterion", ["l2", "bn_scale", "lamp"])
def test_magnitude_criteria_equal_torch_pruning_importance(criterion):
    model = realistic_bn(conv_net(), SHAPE)
    ours = score_units(criterion, inputs(model, ["0"]))["0"]
    group = tp_group(model, "0")
    magnitude = tp.importance.GroupMagnitudeImportance
    if criterion == "l2":  # theirs: Σ w² of the root's filters; ours: the norm
        theirs = magnitude(p=2, group_reduction="first", normalizer=None)(group).sqrt()
    elif criterion == "bn_scale":
        theirs = tp.importance.BNScaleImportance(normalizer=None)(group)
    else:
        theirs = magnitude(p=2, group_reduction="first", normalizer="lamp")(group)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-7)


def test_lamp_normalisation_by_its_definition():
    s = torch.tensor([4.0, 1.0, 3.0, 2.0])
    # each score over the sum of the scores ranked at or above it
    assert lamp_normalise(s).tolist() == pytest.approx([4 / 4, 1 / 10, 3 / 7, 2 / 9])


def test_taylor_equals_torch_pruning_multivariable_taylor_squared():
    model = realistic_bn(conv_net(), SHAPE)
    ours = score_units("taylor", inputs(model, ["3"]))["3"]
    model.eval()
    total = sum(len(y) for _, y in batches())
    for x, y in batches():
        (F.cross_entropy(model(x), y, reduction="sum") / total).backward()
    theirs = tp.importance.GroupTaylorImportance(group_reduction="first", normalizer=None,
                                                 multivariable=True)(tp_group(model, "3"))
    torch.testing.assert_close(ours, theirs.pow(2).float(), rtol=1e-4, atol=1e-12)


def test_hessian_is_obd_with_the_per_sample_fisher_by_loops():
    model = realistic_bn(conv_net(), SHAPE).double()
    layer = model[3]
    groups = find_followers(model, torch.zeros(1, *SHAPE).double(), ["3"])
    double = [(x.double(), y) for x, y in batches()]
    ours = score_units("hessian", ScoreInputs(model, groups, "none", 0, lambda: double))["3"]
    fisher = torch.zeros_like(layer.weight)
    samples = [(x[i], y[i]) for x, y in batches() for i in range(len(y))]
    for x, y in samples:  # one backward per sample
        g, = torch.autograd.grad(F.cross_entropy(model(x.double()[None]), y[None]), [layer.weight])
        fisher += g.pow(2) / len(samples)
    ref = (0.5 * layer.weight.detach().pow(2) * fisher).flatten(1).sum(1)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-10)


def test_fpgm_is_the_sum_of_distances_to_the_layers_other_filters():
    model = conv_net()
    ours = score_units("fpgm", inputs(model, ["0"]))["0"]
    w = model[0].weight.detach().double().flatten(1)
    ref = torch.tensor([sum((w[i] - w[j]).norm().item() for j in range(len(w))) for i in range(len(w))],
                       dtype=torch.float64)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_random_is_seeded():
    model = conv_net()
    a = score_units("random", inputs(model, ["0"], seed=1))
    b = score_units("random", inputs(model, ["0"], seed=1))
    c = score_units("random", inputs(model, ["0"], seed=2))
    assert torch.equal(a["0"], b["0"]) and not torch.equal(a["0"], c["0"])


# ------------------------------------------------------------------------------------ coupled
def test_coupled_scores_average_every_conv_member_by_explicit_gathering():
    model = realistic_bn(SEMini(), SHAPE)
    group = find_followers(model, torch.zeros(1, *SHAPE), ["expand.0"], "groups")["expand.0"]
    ours = score_units("l1", ScoreInputs(model, {"expand.0": group}, "groups", 0, list))["expand.0"]
    modules = dict(model.named_modules())
    ref = torch.zeros(group.units, dtype=torch.float64)
    members = [(link, 0) for link in group.filters] + [(link, 1) for link in group.consumers]
    for u in range(group.units):
        per_member = []
        for link, dim in members:
            w = modules[link.name].weight.detach().double()
            positions = [p for p, r in zip(link.index, link.root, strict=True) if r == u]
            entries = torch.cat([w.select(dim, p).flatten() for p in positions])
            per_member.append(entries.abs().mean())
        ref[u] = torch.stack(per_member).mean()
    assert len(members) == 5  # expand, depthwise, SE fc2; SE fc1 and project consume
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c != "bn_scale"])
def test_every_criterion_scores_coupled_groups(criterion):
    model = realistic_bn(SEMini(), SHAPE)
    groups = find_followers(model, torch.zeros(1, *SHAPE), ["expand.0", "fc1"], "groups")
    scores = score_units(criterion, ScoreInputs(model, groups, "groups", 0, batches))
    assert scores["expand.0"].shape == (8,) and scores["fc1"].shape == (2,)


def test_a_missing_batchnorm_and_a_bad_user_criterion_are_named():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' has no norm to score"):
        score_units("bn_scale", inputs(plain, ["0"]))
    model = conv_net()

    @register_criterion("test-constant", description="a broken plug-in: one score for every layer")
    def constant(inp):
        return {root: torch.zeros(1) for root in inp.groups}

    try:
        with pytest.raises(ValueError, match=r"criterion 'test-constant': expected 6 scores for '0'"):
            score_units("test-constant", inputs(model, ["0"]))
    finally:
        del CRITERIA["test-constant"]


# ------------------------------------------------------------------------------------ global scope
def test_global_ranking_prunes_the_same_total_and_never_empties_a_layer():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0, 10.0])}
    ratios = {"a": 0.5, "b": 0.5}
    masks = masks_from_scores(scores, ratios, "global")
    assert int(masks["a"].sum()) + int(masks["b"].sum()) == 2 + 3  # the per-layer counts, in total
    assert masks["a"].tolist() == [True, True, True, False]  # a's lowest, but a keeps one
    assert masks["b"].tolist() == [True, True, False, False, False, False]
    # ties: the earlier layer, then the lower index, goes first
    tied = masks_from_scores({"a": torch.ones(3), "b": torch.ones(3)}, {"a": 0.4, "b": 0.0}, "global")
    assert tied["a"].tolist() == [True, True, False] and tied["b"].tolist() == [False, False, False]
    with pytest.raises(ValueError, match="scope: got 'world'; accepted: layer, global"):
        masks_from_scores(scores, ratios, "world")
