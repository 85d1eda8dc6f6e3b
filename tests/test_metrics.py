"""tpp.metrics against independent references: per-class autograd Jacobians, known matrices, known counts."""

import math

import pytest
import torch
from torch import nn

import tpp.metrics.jacobian as jacobian_module
from tpp.metrics import count_flops, count_params, jacobian_singular_values, jsv_summary
from tpp.models import ModelSpec, build_model


def explicit_jsv(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per sample, one torch.autograd.grad per class (the authors' way), then an SVD in float64."""
    model.eval()
    out = []
    for x in inputs:
        x = x.unsqueeze(0).clone().requires_grad_()
        logits = model(x)[0]
        rows = [torch.autograd.grad(logits[c], x, retain_graph=True)[0].flatten()
                for c in range(logits.numel())]
        out.append(torch.linalg.svdvals(torch.stack(rows).double()))
    return torch.stack(out)


@torch.no_grad()
def with_running_stats(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    model(torch.randn(16, *shape))
    return model


@pytest.mark.parametrize("name,shape,kwargs", [
    ("resnet20", (3, 16, 16), {}),
    ("vgg19", (3, 32, 32), {}),
    ("mlp", (1, 8, 8), {"depth": 4, "width": 24, "activation": "tanh"}),
], ids=["resnet20", "vgg19", "mlp"])
@pytest.mark.parametrize("strategy", ["vmap", "per_class", "auto"])
def test_jsv_equals_the_explicit_per_class_jacobian(name, shape, kwargs, strategy):
    torch.manual_seed(0)
    model = with_running_stats(build_model(ModelSpec(name, 10, shape, kwargs)), shape)
    x = torch.randn(3, *shape)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sv = jacobian_singular_values(model, x, strategy=strategy)
    assert sv.shape == (3, 10) and sv.dtype == torch.float32
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    ref = explicit_jsv(model, x)
    torch.testing.assert_close(sv.double(), ref, rtol=1e-4, atol=1e-6)


def test_jsv_of_a_linear_map_is_its_singular_values_and_chunking_changes_nothing(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(7, 4)
    sv = jacobian_singular_values(nn.Sequential(nn.Flatten(), lin), torch.randn(5, 7))
    expected = torch.linalg.svdvals(lin.weight.detach().double()).float()
    torch.testing.assert_close(sv, expected.expand(5, 4), rtol=1e-5, atol=1e-6)
    model = build_model(ModelSpec("mlp", 3, (1, 4, 4), {"depth": 3, "width": 8, "activation": "relu"}))
    x = torch.randn(6, 1, 4, 4)
    whole = jacobian_singular_values(model, x)
    monkeypatch.setattr(jacobian_module, "MAX_JACOBIAN_ELEMENTS", 2 * 3 * 16)  # two samples per chunk
    for strategy in ("vmap", "per_class"):
        torch.testing.assert_close(jacobian_singular_values(model, x, strategy=strategy), whole)
    with pytest.raises(ValueError, match="accepted: auto, vmap, per_class"):
        jacobian_singular_values(model, x, strategy="loop")


def test_jsv_summary_on_a_known_matrix():
    s = jsv_summary(torch.tensor([[3.0, 1.0], [2.0, 2.0]]))
    assert s["mean"] == pytest.approx(2.0)
    assert s["std"] == pytest.approx(math.sqrt(0.5))  # population std of 3, 1, 2, 2
    assert (s["min"], s["max"]) == (1.0, 3.0)
    assert s["cond"] == pytest.approx((3 / 1 + 2 / 2) / 2)
    assert s["iso"] == pytest.approx((4 + 0 + 1 + 1) / 4)  # mean (s - 1)^2
    assert jsv_summary(torch.ones(4, 3))["iso"] == 0.0 and jsv_summary(torch.ones(4, 3))["cond"] == 1.0


def test_counts_of_small_layers_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    assert count_params(model) == (4 * 2 * 9 + 4) + (100 * 3 + 3)
    # 2 FLOPs per multiply-accumulate: conv 4 out x 25 positions x 18 MACs; linear 100 x 3.
    assert count_flops(model, (2, 5, 5)) == 2 * (4 * 25 * 18 + 100 * 3)


def test_resnet56_params_and_flops():
    model = build_model(ModelSpec("resnet56", 10, (3, 32, 32))).train()
    assert count_params(model) == 853_018
    flops = count_flops(model, (3, 32, 32))
    print(f"ResNet56: {count_params(model)} params, {flops / 1e9:.4f} GFLOPs")
    assert flops == pytest.approx(0.25e9, rel=0.01)
    assert model.training  # restored after the eval-mode count


def test_latency_is_the_median_of_timed_forward_passes():
    """A module that sleeps 20 ms per call measures about 20 ms; warm-up calls are not counted."""
    import time

    from tpp.metrics import latency, latency_metrics

    class Slow(nn.Module):
        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds, self.calls, self.lin = seconds, 0, nn.Linear(4, 2)

        def forward(self, x):
            self.calls += 1
            time.sleep(self.seconds)
            return self.lin(x)

    slow = Slow(0.02).train()
    assert 0.019 <= latency(slow, (4,), 3, torch.device("cpu"), repeats=3, warmup=2) < 0.06
    assert slow.calls == 5 and slow.training  # 2 warm-up + 3 timed calls; train mode restored
    m = latency_metrics(Slow(0.03), Slow(0.01), (4,), 8, torch.device("cpu"))
    assert 2.0 < m["speedup_measured_b1"] < 4.0 and 2.0 < m["speedup_measured_batch"] < 4.0
    assert m["latency_dense_b1_ms"] == pytest.approx(30, rel=0.5)
