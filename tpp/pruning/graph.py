"""Channel groups: every parameter entry that carries a pruned layer's output channels.

Removing an output channel of a layer (a *unit*) drags along the BatchNorm channel that normalises
it and the input channels that consume it downstream (one per channel, or H*W of them after a
flatten). With `coupling="groups"` it also drags every channel *tied* to it, as torch_pruning's
DependencyGraph defines them: the outputs of other layers added to it by a residual sum, a depthwise
convolution (its channels go with its input), a squeeze-excitation product, concatenations, and the
equal per-group positions a grouped convolution needs. `coupling="none"` is the paper's per-layer
mode: such ties are errors, so a layer prunes exactly its own filters.

The trace records, for each member, which of its positions come from which unit (`Link`), so later
steps (selection, the penalty, zeroing, removal) need no further tracing and work on any copy of the
model with the same module names. When torch_pruning cannot trace the whole model (ShuffleNet's
channel shuffle), a layer is traced inside the smallest enclosing module that contains its whole
group. Modules may also declare their groups (`declared_groups`, e.g. attention heads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops

from tpp.pruning.layers import PRUNABLE

COUPLINGS = ("none", "groups")
_NORM = nn.modules.batchnorm._BatchNorm
# Normalisations whose statistics mix channels: removing a channel changes the others' outputs.
_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_CONV = nn.modules.conv._ConvNd


@dataclass(frozen=True)
class Link:
    """Positions `index` (along the member's channel dim) of module `name` fed by units `root`.

    `index[i]` carries unit `root[i]`; a unit can own several positions (a flatten of an H x W map
    feeds H*W input features; a grouped convolution's unit is one position in every group).
    """

    name: str
    index: tuple[int, ...]
    root: tuple[int, ...]

    def positions(self, pruned: torch.Tensor) -> torch.Tensor:
        """Long tensor of the positions carrying the units where the bool mask `pruned` is True."""
        index = torch.tensor(self.index, dtype=torch.long)
        root = torch.tensor(self.root, dtype=torch.long)
        return index[pruned.cpu()[root]]


@dataclass(frozen=True)
class Followers:
    """One channel group: what a pruned layer's units are, and every parameter entry they reach.

    filters: output rows (weight dim 0, bias) of every Conv/Linear whose outputs are the group's
    channels -- the pruned layer itself first, then tied layers (residual sums, depthwise convs);
    norms: BatchNorm channels; consumers: input columns (weight dim 1) of downstream layers;
    units: how many units the group has (the pruned layer's filters, fewer when grouped
    convolutions tie positions, its heads for attention).
    """

    filters: tuple[Link, ...]
    norms: tuple[Link, ...]
    consumers: tuple[Link, ...]
    units: int

    @property
    def bn(self) -> str | None:
        """Name of the BatchNorm that normalises the layer's outputs (None if there is none)."""
        return self.norms[0].name if self.norms else None

    def members(self) -> list[str]:
        """Names of the layers whose output rows belong to the group (the pruned layer first)."""
        return [link.name for link in self.filters]


def declared_groups(model: nn.Module) -> dict[str, Followers]:
    """{layer: its group} for modules that declare theirs with `tpp_channel_groups(prefix)`.

    A module whose structure a trace cannot express (the heads of an attention block: the q, k and v
    rows of a head go together with that head's input columns of the output projection) returns
    {qualified root name: Followers}; declared groups take precedence over tracing.
    """
    out: dict[str, Followers] = {}
    for name, module in model.named_modules():
        declare = getattr(module, "tpp_channel_groups", None)
        if callable(declare):
            out.update(declare(f"{name}." if name else ""))
    return out


# ------------------------------------------------------------------------------------------ tracing
@dataclass(frozen=True)
class _Item:
    """One member of a traced torch_pruning group, reduced to what classification needs."""

    target: object  # an nn.Module of the model, or one of torch_pruning's op nodes / parameters
    kind: str  # "out" (output channels), "in" (input channels), "dw" (depthwise: both) or "op"
    idxs: tuple[int, ...]
    root_idxs: tuple[int | None, ...]


def _out_fn(module: nn.Module):
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _kind(dg: tp.DependencyGraph, handler) -> str:
    if handler in (tp.prune_depthwise_conv_out_channels, tp.prune_depthwise_conv_in_channels):
        return "dw"
    if dg.is_out_channel_pruning_fn(handler) and dg.is_in_channel_pruning_fn(handler):
        return "op"  # parameter-free ops and norms: in and out are the same channels
    return "out" if dg.is_out_channel_pruning_fn(handler) else "in"


def _group_items(dg: tp.DependencyGraph, module: nn.Module) -> list[_Item]:
    n = int(module.weight.shape[0])
    group = dg.get_pruning_group(module, _out_fn(module), list(range(n)))
    return [_Item(item.dep.target.module, _kind(dg, item.dep.handler), tuple(int(i) for i in item.idxs),
                  tuple(None if r is None else int(r) for r in item.root_idxs)) for item in group]


def _build_graph(model: nn.Module, x: torch.Tensor) -> tp.DependencyGraph:
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=(x,), verbose=False)


class _Scope(nn.Module):
    """`body` behind an identity `entry` layer, so a group that reaches the body's input shows it."""

    def __init__(self, body: nn.Module, x: torch.Tensor):
        super().__init__()
        c = int(x.shape[1]) if x.dim() > 2 else int(x.shape[-1])
        if x.dim() in (3, 4, 5) and not _is_tokens(body, x):
            conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[x.dim()]
            self.entry: nn.Module = conv(c, c, 1, groups=c, bias=False)
            nn.init.ones_(self.entry.weight)
        else:
            self.entry = nn.Linear(c, c, bias=False)
            nn.init.eye_(self.entry.weight)
        self.entry.to(device=x.device, dtype=x.dtype)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.entry(x))


def _is_tokens(body: nn.Module, x: torch.Tensor) -> bool:
    """A 3-D input whose channels are last ([batch, tokens, width]) rather than second."""
    first = next((m for m in body.modules() if isinstance(m, (nn.Linear, _CONV))), None)
    return x.dim() == 3 and isinstance(first, nn.Linear)


def _scope_inputs(model: nn.Module, x: torch.Tensor, scopes: list[str]) -> dict[str, torch.Tensor]:
    """The input each module of `scopes` receives in one forward of `model` on `x` (single-tensor
    calls only; a module called twice or with several inputs cannot be a scope)."""
    modules = dict(model.named_modules())
    seen: dict[str, list] = {s: [] for s in scopes}
    hooks = [modules[s].register_forward_pre_hook(
        lambda _m, args, s=s: seen[s].append(args)) for s in scopes]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {s: calls[0][0] for s, calls in seen.items()
            if len(calls) == 1 and len(calls[0]) == 1 and isinstance(calls[0][0], torch.Tensor)}


class _Tracer:
    """Traces groups on `model` once: the whole model if torch_pruning can, else enclosing scopes."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x
        self.modules = dict(model.named_modules())
        self.names = {m: n for n, m in self.modules.items()}
        self._graphs: dict[str, tp.DependencyGraph | Exception] = {}

    def _graph(self, scope: str) -> tuple[tp.DependencyGraph | Exception, nn.Module | None]:
        """The dependency graph of module `scope` ("" = the model), or the error tracing it raised."""
        if scope not in self._graphs:
            try:
                if scope == "":
                    self._graphs[scope] = _build_graph(self.model, self.x)
                else:
                    inputs = _scope_inputs(self.model, self.x, [scope])
                    if scope not in inputs:
                        raise ValueError("it is not called once on a single tensor")
                    wrapper = _Scope(self.modules[scope], inputs[scope].detach())
                    self._graphs[scope] = _build_graph(wrapper, inputs[scope].detach())
                    self._graphs[scope].tpp_entry = wrapper.entry
            except Exception as e:  # torch_pruning raises assorted errors on graphs it cannot trace
                self._graphs[scope] = e
        graph = self._graphs[scope]
        return graph, getattr(graph, "tpp_entry", None)

    def items(self, name: str) -> list[_Item]:
        """The traced group of layer `name`: from the whole model, or from the smallest enclosing
        module the group does not leave. A ValueError (one line) if neither can trace it."""
        graph, _ = self._graph("")
        if not isinstance(graph, Exception):
            return _group_items_or_error(graph, name, self.modules[name])
        parts = name.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            scope = ".".join(parts[:depth])
            sub, entry = self._graph(scope)
            if isinstance(sub, Exception):
                continue
            items = _group_items_or_error(sub, name, self.modules[name])
            if not any(i.target is entry or isinstance(i.target, tp_ops._OutputOp) for i in items):
                return items
        raise ValueError(f"find_followers: cannot trace the dependencies of {name!r}: torch_pruning cannot "
                         f"trace the model ({type(graph).__name__}: {graph}) and the channels of {name!r} "
                         "leave every module that encloses it")


def _group_items_or_error(dg: tp.DependencyGraph, name: str, module: nn.Module) -> list[_Item]:
    try:
        return _group_items(dg, module)
    except Exception as e:  # torch_pruning raises assorted errors on graphs it cannot map
        raise ValueError(f"find_followers: cannot trace the dependencies of {name!r}: "
                         f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------- classification
class _Units:
    """Union-find over a layer's output channels: channels that must be pruned together are one unit."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def tie(self, channels: Iterable[int]) -> None:
        channels = list(channels)
        for c in channels[1:]:
            a, b = self.find(channels[0]), self.find(c)
            if a != b:
                self.parent[max(a, b)] = min(a, b)

    def ids(self) -> list[int]:
        """Unit of every channel, numbered 0.. in the order of each unit's first channel."""
        number: dict[int, int] = {}
        return [number.setdefault(self.find(c), len(number)) for c in range(len(self.parent))]


def _per_group(module: nn.Module, kind: str) -> int | None:
    """Channels per group of a grouped (not depthwise) convolution on the `kind` side, else None."""
    if not isinstance(module, _CONV) or module.groups == 1 or kind == "dw":
        return None
    return (module.in_channels if kind == "in" else module.out_channels) // module.groups


def _classify(name: str, items: list[_Item], coupling: str, names: dict[object, str]) -> Followers:
    """Turn a traced group into Followers, or a one-line ValueError naming why it cannot be pruned."""
    root_module = items[0].target
    n = int(root_module.weight.shape[0])
    units = _Units(n)
    members: list[tuple[str, str, _Item, int | None]] = []  # (role, member name, item, per-group size)
    coupled: list[str] = []
    for item in items:
        target = item.target
        if isinstance(target, tp_ops._OutputOp):
            raise ValueError(f"find_followers: no layer consumes the outputs of {name!r}: it is the final "
                             "classifier (its outputs are the model's outputs) and cannot be pruned")
        if target not in names:  # a parameter-free op of the trace (add, reshape, slice, cat, ...)
            if isinstance(target, nn.Parameter):
                raise ValueError(f"find_followers: the channels of {name!r} are scaled by a bare "
                                 f"nn.Parameter (shape {tuple(target.shape)}); not supported")
            continue
        other = names[target]
        if any(r is None for r in item.root_idxs):
            raise ValueError(f"find_followers: cannot map the channels of {name!r} into {other!r}")
        if isinstance(target, _MIXING_NORMS):
            raise ValueError(f"find_followers: the channels of {name!r} are normalised together by {other!r} "
                             f"({type(target).__name__}); removing some would change the others, so the "
                             "removal could not be exact (not supported)")
        if isinstance(target, _NORM):
            members.append(("norm", other, item, None))
            continue
        if not isinstance(target, PRUNABLE):
            raise ValueError(f"find_followers: the outputs of {name!r} flow into {other!r} "
                             f"({type(target).__name__}), which cannot be pruned with it; supported "
                             "followers are BatchNorm, Conv and Linear layers")
        size = _per_group(target, item.kind)
        if size == 1 and item.kind == "in" and target.out_channels != target.groups:
            raise ValueError(f"find_followers: {name!r} feeds {other!r}, a grouped convolution with one "
                             "input and several output channels per group (a channel multiplier); "
                             "not supported")
        if item.kind == "in":
            if size is not None and coupling == "none":
                raise ValueError(f"find_followers: {name!r} feeds the grouped convolution {other!r}; pruning "
                                 "it needs equal positions in every group (prune with coupling: groups)")
            members.append(("consumer", other, item, size))
        else:
            if target is not root_module and coupling == "none":
                if item.kind == "dw":
                    raise ValueError(f"find_followers: {name!r} feeds the depthwise convolution {other!r} "
                                     "(its channels go with its input); prune with coupling: groups")
                coupled.append(other)
                continue
            members.append(("filter", other, item, size))
        if size is not None:  # positions that share a column or row of a grouped conv form one unit
            by_position: dict[int, list[int]] = {}
            for i, r in zip(item.idxs, item.root_idxs, strict=True):
                by_position.setdefault(i % size, []).append(r)
            for channels in by_position.values():
                units.tie(channels)
    if coupled:
        shown = ", ".join(sorted(set(coupled))[:8])
        raise ValueError(f"find_followers: the outputs of {name!r} are tied (e.g. by a residual sum) to the "
                         f"outputs of {shown}; pruning them needs pruning those layers too: prune with "
                         "coupling: groups, or only layers whose outputs feed a single path")
    if not any(role == "consumer" for role, *_ in members):
        raise ValueError(f"find_followers: no layer consumes the outputs of {name!r}: it is the final "
                         "classifier (its outputs are the model's outputs) and cannot be pruned")
    unit_of = units.ids()
    links: dict[str, list[Link]] = {"filter": [], "norm": [], "consumer": []}
    for role, other, item, size in members:
        pairs = sorted({(i % size if size and role == "consumer" else i, unit_of[r])
                        for i, r in zip(item.idxs, item.root_idxs, strict=True)})
        links[role].append(Link(other, tuple(p for p, _ in pairs), tuple(u for _, u in pairs)))
    return Followers(tuple(links["filter"]), tuple(links["norm"]), tuple(links["consumer"]), max(unit_of) + 1)


# ------------------------------------------------------------------------------------------- public
def _capture_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def _check_coupling(coupling: str) -> None:
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling: got {coupling!r}; accepted: {', '.join(COUPLINGS)}")


def find_followers(model: nn.Module, example_input: torch.Tensor, names: list[str],
                   coupling: str = "none") -> dict[str, Followers]:
    """{pruned layer: its channel group}, traced once on `example_input` (a batch of one is enough).

    The trace runs in eval mode (so BatchNorm running statistics are not touched) and restores every
    module's train/eval flag afterwards. With coupling "none", layers tied to other layers' outputs
    (residual sums, depthwise or grouped convolutions) are rejected; the final classifier always is.
    """
    _check_coupling(coupling)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not isinstance(modules[name], PRUNABLE):
            raise ValueError(f"find_followers: {name!r} is not a Conv/Linear module of the model")
    if not names:
        return {}
    declared = declared_groups(model)
    param = next(model.parameters())
    x = example_input.to(device=param.device, dtype=param.dtype)
    modes = _capture_modes(model)
    try:
        model.eval()  # no BatchNorm statistics change while tracing
        tracer = _Tracer(model, x)
        return {name: declared[name] if name in declared else
                _classify(name, tracer.items(name), coupling, tracer.names) for name in names}
    finally:
        _restore_modes(modes)


def channel_groups(model: nn.Module, example_input: torch.Tensor, ratios: dict[str, float],
                   coupling: str = "none") -> tuple[dict[str, float], dict[str, Followers]]:
    """({group root: ratio}, {group root: Followers}) for the layers of `ratios` (module name: ratio).

    With coupling "groups" several matched layers can be one group (e.g. the convs summed into one
    residual stream): the first of them in `ratios` is its root; they must ask for the same ratio.
    """
    followers = find_followers(model, example_input, list(ratios), coupling)
    roots: dict[str, float] = {}
    owner: dict[str, str] = {}
    for name, ratio in ratios.items():
        if name in owner:
            root = owner[name]
            if roots[root] != ratio:
                raise ValueError(f"prune_layers: {name!r} and {root!r} are one channel group (coupled) but "
                                 f"ask for different ratios ({ratio} and {roots[root]}); give them one ratio")
            continue
        roots[name] = ratio
        for member in followers[name].members():
            owner.setdefault(member, name)
    return roots, {root: followers[root] for root in roots}
