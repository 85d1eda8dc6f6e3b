"""Architectures by name: CIFAR ResNets, VGG19, torchvision ResNets and efficient/grouped nets, MLPs,
a small ViT; plus pruning presets and each model's default coupling."""

# Importing the model modules registers the built-ins.
from tpp.models import cifar_resnet, imagenet, mlp, torchvision_models, vgg, vit  # noqa: F401
from tpp.models.cifar_resnet import BasicBlock, CifarResNet, ShortcutA
from tpp.models.imagenet import RESNET50_SPEEDUPS, resnet50_speedup_preset
from tpp.models.mlp import MLP
from tpp.models.registry import (
    ModelSpec,
    build_model,
    list_models,
    model_prune_preset,
    register_model,
    resolve_coupling,
)
from tpp.models.vgg import VGG
from tpp.models.vit import ViT

__all__ = [
    "MLP", "RESNET50_SPEEDUPS", "VGG", "BasicBlock", "CifarResNet", "ModelSpec", "ShortcutA", "ViT",
    "build_model", "list_models", "model_prune_preset", "register_model", "resnet50_speedup_preset",
    "resolve_coupling",
]
