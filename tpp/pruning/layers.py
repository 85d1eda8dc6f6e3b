"""Which layers a run prunes: presets and glob patterns resolved to module names and ratios.

Patterns are matched against qualified module names (`layer1.0.conv1`) so the same preset works for
any model whose naming follows the registry's; errors name the pattern and show real module names,
because a typo otherwise silently prunes nothing.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

# Layers whose output filters can be selected and removed.
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of every Conv/Linear layer, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def out_channels(module: nn.Module) -> int:
    """Number of output filters (conv) or output features (linear)."""
    return int(module.weight.shape[0])


def expand_preset(preset: dict[str, str | float], pr: float) -> dict[str, float]:
    """Replace the placeholder "pr" of a model preset by the study's pruning ratio."""
    out: dict[str, float] = {}
    for pattern, ratio in preset.items():
        if isinstance(ratio, str):
            if ratio != "pr":
                raise ValueError(f"preset pattern {pattern!r}: ratio must be a number or 'pr', got {ratio!r}")
            out[pattern] = float(pr)
        else:
            out[pattern] = float(ratio)
    return out


def _check_ratio(pattern: str, ratio: float) -> float:
    r = float(ratio)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"prune_layers pattern {pattern!r}: ratio must lie in [0, 1), got {ratio!r}")
    return r


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_layers(model: nn.Module, patterns: dict[str, float], coupling: str = "none") -> dict[str, float]:
    """{module name: ratio} for the prunable modules matched by {glob pattern: ratio}.

    Later patterns override earlier ones for modules both match. A pattern that matches no prunable
    module is an error (it is almost always a typo), and so is a positive ratio on the model's last
    prunable layer: its outputs are the model's outputs (the classes) and cannot be removed. With
    coupling "none" a grouped (or depthwise) convolution cannot be pruned on its own: a glob pattern
    skips it, an explicit name is an error; with "groups" it is pruned with its channel group.
    """
    modules = prunable_modules(model)
    if not modules:
        raise ValueError("the model has no prunable layers (Conv1d/2d/3d or Linear)")
    names = list(modules)
    resolved: dict[str, float] = {}
    for pattern, ratio in patterns.items():
        r = _check_ratio(pattern, ratio)
        matched = [n for n in names if fnmatchcase(n, pattern)]
        if not matched:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"prune_layers pattern {pattern!r} matches no prunable (Conv/Linear) module; "
                             f"the model's prunable modules are: {shown}")
        for n in matched:
            resolved[n] = r
    if coupling == "none":
        explicit = {p for p in patterns if not _is_glob(p)}
        for n, r in list(resolved.items()):
            if _is_grouped(modules[n]) and r > 0:
                if n in explicit:
                    raise ValueError(f"prune_layers: {n!r} is a grouped convolution (groups="
                                     f"{modules[n].groups}); its filters go with their input channels: prune "
                                     "with coupling: groups")
                del resolved[n]
    last = names[-1]
    if resolved.get(last, 0.0) > 0:
        raise ValueError(f"prune_layers: {last!r} is the final classifier (the model's last prunable layer; "
                         "its outputs are the model's outputs) and cannot be pruned; narrow the pattern")
    return resolved
