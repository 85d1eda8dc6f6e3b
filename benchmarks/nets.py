"""Building the models the benchmarks measure: a registry model plus its L1 masks at a pruning ratio.

The benchmarks time library code on the exact objects a run uses (registry models, the model's own
pruning preset, `select_l1` + `find_followers`), so the numbers say what a study would see.
Weights are random: none of the timed operations depends on their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpp.models import ModelSpec, build_model, model_prune_preset
from tpp.pruning import Followers, expand_preset, find_followers, remove_pruned, resolve_layers, select_l1


@dataclass
class Pruned:
    """A dense model with the masks (True = pruned) and followers of its preset layers at `pr`."""

    spec: ModelSpec
    model: nn.Module
    masks: dict[str, torch.Tensor]
    followers: dict[str, Followers]

    def removed(self) -> nn.Module:
        """The physically smaller copy (the dense model is left as it is)."""
        return remove_pruned(self.model, self.masks, self.followers)


def build(name: str, input_shape: tuple[int, ...], num_classes: int,
          seed: int = 0) -> tuple[ModelSpec, nn.Module]:
    torch.manual_seed(seed)
    spec = ModelSpec(name, num_classes, input_shape)
    return spec, build_model(spec)


def pruned(name: str, input_shape: tuple[int, ...], num_classes: int, pr: float, seed: int = 0) -> Pruned:
    """The model's preset layers at ratio `pr`, selected by L1 norm and traced for followers."""
    spec, model = build(name, input_shape, num_classes, seed)
    layers = resolve_layers(model, expand_preset(model_prune_preset(name), pr))
    ratios = {n: r for n, r in layers.items() if r > 0}
    masks = select_l1(model, ratios)
    followers = find_followers(model, torch.zeros(1, *input_shape), list(masks))
    return Pruned(spec, model, masks, followers)
