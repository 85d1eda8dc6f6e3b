"""RunConfig: every knob of one pruning run, with the TPP authors' defaults, each tagged with its stage.

A run has stages -- model and data, dense training, the prune stage (filter selection + the penalty
schedule), finetuning -- plus I/O and device settings that are part of no result. Each field declares
its stage (and its help text, with the unit) once, here, in its metadata; everything else derives
from that declaration: which inputs the prune stage depends on (`tpp.run.prune_key`), which fields
finetune members of one pruned model may differ in, which flags `tpp pretrain` shows. A field added
without a stage fails `stage_of` and the test that walks every field.

The config stays flat so it can be logged as parameters, given as `tpp run` flags and a study's
`fixed:` keys, and round-tripped through JSON/YAML unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from tpp.methods import get_method, list_methods
from tpp.methods.registry import accepted_methods
from tpp.models.registry import COUPLING_CHOICES
from tpp.pruning.criteria import CRITERIA
from tpp.pruning.select import SCOPES
from tpp.schedules import SCHEDULES, WARMUP_SCHEDULES, PenaltySchedule

Stage = Literal["model", "data", "dense", "prune", "finetune", "run"]
STAGES: tuple[Stage, ...] = ("model", "data", "dense", "prune", "finetune", "run")
# Stages whose settings change the pruned model: a prune key hashes exactly these (plus the dense weights).
PRUNE_INPUT_STAGES: tuple[Stage, ...] = ("model", "data", "dense", "prune")


def setting(default: Any, stage: Stage, help: str, *, penalty_only: bool = False) -> Any:
    """A RunConfig field declared with its stage and help text.

    `penalty_only`: a prune-stage knob that only a method with a regularisation stage reads (the
    growth rate, ...); methods without one ignore it, so it is no part of their prune key.
    """
    meta = {"stage": stage, "help": help, "penalty_only": penalty_only}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # ------------------------------------------------------------------------------- model and data
    model: str = setting("mlp7_linear", "model", "architecture (see `tpp list`)")
    model_kwargs: dict[str, Any] = setting({}, "model", "JSON keyword arguments of the model factory")
    data: str = setting("digits", "data", "data set (see `tpp list`)")
    data_kwargs: dict[str, Any] = setting({}, "data", "JSON keyword arguments of the data loader "
                                          '(e.g. {"subset": 5000})')
    val_fraction: float = setting(0.0, "data", "fraction of the training set held out (seeded, class-"
                                  "balanced) to choose the finetuning epoch on; 0 = no validation split")
    # ---------------------------------------------------------------------------------------- dense
    dense_epochs: int = setting(30, "dense", "epochs of dense training (when no --dense checkpoint)")
    dense_lr: float = setting(0.05, "dense", "peak LR of dense training, cosine-annealed to 0 "
                              "(0.1 diverges for the deep linear MLP)")
    dense_batch_size: int = setting(128, "dense", "mini-batch size of dense training (samples)")
    dense_momentum: float = setting(0.9, "dense", "SGD momentum of dense training")
    dense_weight_decay: float = setting(5e-4, "dense", "L2 weight decay of dense training")
    # ---------------------------------------------------------------------------------------- prune
    method: str = setting("tpp", "prune", "pruning method (see `tpp list`)")
    pr: float = setting(0.5, "prune", "pruning ratio of the model preset's layers, in [0, 1)")
    prune_layers: dict[str, float] | None = setting(None, "prune", 'explicit JSON {"glob pattern": ratio} '
                                                    "instead of the model preset")
    criterion: str = setting("l1", "prune", "filter selection criterion of methods that select by criterion: "
                             f"{', '.join(CRITERIA)}")
    scope: str = setting("layer", "prune", "ranking scope of the selection: layer (each layer prunes its own "
                         "ratio, the paper's) or global (all pruned layers' units ranked together, the same "
                         "total count, every layer keeps at least one)")
    coupling: str = setting("auto", "prune", "channel coupling: none (each layer prunes its own "
                            "filters; layers tied by residual sums, depthwise or grouped convs are errors; "
                            "the paper's), groups (tied channels pruned together, as torch_pruning's "
                            "DependencyGraph defines them) or auto (the model's default)")
    criterion_samples: int = setting(256, "prune", "training samples (seeded, fixed) the data-driven "
                                     "criteria (taylor, hessian) score on")
    method_params: dict[str, Any] = setting({}, "prune", 'JSON parameters of the method (see `tpp list`), '
                                            'e.g. {"lw": 0.1}')
    seed: int = setting(0, "prune", "seed of every random choice (init, data order, augmentation) of the "
                        "prune stage and finetuning")
    growth: float = setting(1e-4, "prune", "penalty growth: added to the penalty factor every "
                            "--update-reg-interval iterations (the authors' reg_granularity)",
                            penalty_only=True)
    update_reg_interval: int = setting(10, "prune", "iterations between penalty increments",
                                       penalty_only=True)
    reg_upper_limit: float = setting(1.0, "prune", "penalty factor at which growth stops",
                                     penalty_only=True)
    stabilize_reg_interval: int = setting(10_000, "prune", "iterations at the penalty limit, during which "
                                          "pruned filters are zeroed layer by layer", penalty_only=True)
    reg_growth_epochs: float | None = setting(None, "prune", "size the growing phase in passes over the "
                                              "training set instead: the penalty reaches its limit after "
                                              "this many epochs (the increments spread evenly; replaces "
                                              "--update-reg-interval). The authors' CIFAR/MNIST recipes grow "
                                              "for ~167-256 passes", penalty_only=True)
    stabilize_reg_epochs: float | None = setting(None, "prune", "size the stabilising phase in passes over "
                                                 "the training set instead of --stabilize-reg-interval",
                                                 penalty_only=True)
    reg_mag_ratio_limit: float | None = setting(None, "prune", "the authors' MNIST-era early stop (MingSun-"
                                                "Tse/Smile-Pruning: option.py --mag_ratio_limit, used in "
                                                "pruner/orth_preserving_pruner.py): stop growing the penalty "
                                                "once every pruned layer's kept-to-pruned mean |w| ratio (an "
                                                "EMA, 0.9 old + 0.1 new, updated every --update-reg-interval "
                                                "iterations) reaches this; the stabilising phase follows. "
                                                "Off (null) by default, as in their later TPP code",
                                                penalty_only=True)
    lw_opp: float = setting(1000.0, "prune", "weight of the gram (trainability) term in the loss",
                            penalty_only=True)
    reg_lr: float = setting(1e-3, "prune", "constant SGD LR of the regularisation stage", penalty_only=True)
    reg_batch_size: int = setting(128, "prune", "mini-batch size of the regularisation stage (samples)",
                                  penalty_only=True)
    reg_momentum: float = setting(0.9, "prune", "SGD momentum of the regularisation stage",
                                  penalty_only=True)
    reg_weight_decay: float = setting(5e-4, "prune", "L2 weight decay of the regularisation stage",
                                      penalty_only=True)
    bf16: bool = setting(False, "prune", "bf16 autocast on CUDA (changes the numerics of every stage "
                         "run with it)")
    jsv_samples: int = setting(32, "prune", "test inputs the Jacobian singular values are measured on")
    # ------------------------------------------------------------------------------------- finetune
    lr: float = setting(1e-2, "finetune", "finetuning base learning rate")
    epochs: int = setting(120, "finetune", "finetuning epochs (the finetuning budget)")
    schedule: str = setting("step", "finetune", f"finetuning LR schedule: {', '.join(SCHEDULES)}")
    milestones: tuple[float, ...] = setting((0.5, 0.75), "finetune", "fractions of --epochs where the step "
                                            "schedule divides the LR by 10")
    warmup_epochs: int = setting(0, "finetune", "epochs of linear LR warmup (schedules "
                                 f"{', '.join(WARMUP_SCHEDULES)}; onecycle needs >= 1)")
    batch_size: int = setting(128, "finetune", "mini-batch size of finetuning (samples)")
    momentum: float = setting(0.9, "finetune", "SGD momentum of finetuning")
    weight_decay: float = setting(5e-4, "finetune", "L2 weight decay of finetuning")
    jsv_every: int = setting(0, "finetune", "measure the Jacobian singular values every N finetuning epochs "
                             "(0: only after removal and at the end)")
    # ------------------------------------------------------------------------------ I/O and device
    data_root: str | None = setting(None, "run", "folder of the data set (CIFAR/MNIST torchvision format, "
                                    "or train/ + val|test/ folders); default $TPP_DATA_ROOT, then ./data")
    device: str = setting("auto", "run", "auto | cpu | cuda | cuda:N")
    channels_last: bool = setting(False, "run", "channels-last memory format on CUDA")
    eval_batch_size: int = setting(512, "run", "mini-batch size of evaluation (samples)")
    control: bool = setting(True, "run", "also train the unpruned control of the prune stage: the dense "
                            "model through the stage's optimizer, LR, batch order and iterations without "
                            "penalty or mask (computed once per dense model, schedule and seed); each member "
                            "logs its JSV and accuracy (control_*) and jsv_retained = JSV after removal / "
                            "control JSV")

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it accepts."""
        def bad(name: str, accepted: str) -> None:
            raise ValueError(f"{name}: got {getattr(self, name)!r}; accepted: {accepted}")

        for f in dataclasses.fields(self):  # the declared type first: 2.5 epochs or an infinite decay
            v = getattr(self, f.name)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if f.type == "int" and not (number and isinstance(v, int)):
                bad(f.name, "an integer")
            if f.type in ("float", "float | None") and v is not None and not (number and math.isfinite(v)):
                bad(f.name, "a finite number" + (", or null" if "None" in f.type else ""))
            if f.type == "bool" and not isinstance(v, bool):
                bad(f.name, "true or false")

        if self.method not in list_methods():
            bad("method", accepted_methods())
        get_method(self.method).resolve_params(self.method_params)
        if self.criterion not in CRITERIA:
            bad("criterion", ", ".join(CRITERIA))
        if self.scope not in SCOPES:
            bad("scope", ", ".join(SCOPES))
        if self.coupling not in COUPLING_CHOICES:
            bad("coupling", ", ".join(COUPLING_CHOICES))
        if not 0.0 <= self.pr < 1.0:
            bad("pr", "a pruning ratio in [0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            bad("val_fraction", "a fraction of the training set in [0, 1)")
        for name in ("growth", "reg_upper_limit", "lr", "reg_lr", "dense_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                bad(name, "a number > 0")
        for name in ("momentum", "reg_momentum", "dense_momentum", "weight_decay", "reg_weight_decay",
                     "dense_weight_decay"):
            if not getattr(self, name) >= 0:
                bad(name, "a number >= 0")
        for name in ("update_reg_interval", "batch_size", "reg_batch_size", "dense_batch_size", "epochs",
                     "jsv_samples", "eval_batch_size", "criterion_samples"):
            if int(getattr(self, name)) < 1:
                bad(name, "an integer >= 1")
        for name in ("stabilize_reg_interval", "dense_epochs", "jsv_every", "warmup_epochs"):
            if int(getattr(self, name)) < 0:
                bad(name, "an integer >= 0")
        for name in ("reg_growth_epochs", "stabilize_reg_epochs", "reg_mag_ratio_limit"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                          and value > 0):
                bad(name, "a number > 0, or null (off)")
        if self.schedule not in SCHEDULES:
            bad("schedule", ", ".join(SCHEDULES))
        if any(not 0 < m < 1 for m in self.milestones):
            bad("milestones", "fractions of the epochs in (0, 1)")
        if self.warmup_epochs and self.schedule not in WARMUP_SCHEDULES:
            bad("warmup_epochs", f"0 for schedule {self.schedule!r}; warmup applies to "
                f"{', '.join(WARMUP_SCHEDULES)}")
        if self.schedule == "onecycle" and not 1 <= self.warmup_epochs < self.epochs:
            bad("warmup_epochs", "an integer in [1, epochs) for the onecycle schedule")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            bad("warmup_epochs", f"fewer than epochs ({self.epochs})")
        if self.prune_layers is not None and any(not 0 <= r < 1 for r in self.prune_layers.values()):
            bad("prune_layers", "a mapping of layer patterns to ratios in [0, 1)")

    # ----------------------------------------------------------------------------------- by stage
    def section(self, *stages: Stage) -> dict[str, Any]:
        """The fields of these stages, as a JSON-ready dict."""
        d = self.to_dict()
        return {f.name: d[f.name] for f in dataclasses.fields(self) if stage_of(f.name) in stages}

    def prune_inputs(self) -> dict[str, Any]:
        """Every setting the pruned model depends on (penalty knobs only for methods with a penalty)."""
        has_penalty = get_method(self.method).regularize
        return {k: v for k, v in self.section(*PRUNE_INPUT_STAGES).items()
                if has_penalty or not is_penalty_only(k)}

    def penalty_schedule(self, num_train: int) -> PenaltySchedule:
        """The growing penalty's schedule for a training set of `num_train` samples: in iterations, or in
        passes over the data when `reg_growth_epochs` / `stabilize_reg_epochs` are given."""
        per_epoch = math.ceil(max(num_train, 1) / self.reg_batch_size)
        stabilize = (self.stabilize_reg_interval if self.stabilize_reg_epochs is None
                     else round(self.stabilize_reg_epochs * per_epoch))
        growing = (None if self.reg_growth_epochs is None
                   else max(1, round(self.reg_growth_epochs * per_epoch)))
        return PenaltySchedule(self.growth, self.update_reg_interval, self.reg_upper_limit, stabilize,
                               growing)

    def to_dict(self) -> dict[str, Any]:
        # The fields are scalars but for a few JSON containers: copy those alone. dataclasses.asdict
        # deep-copies every value (46 us a call against 18), and a study's driver makes ~4 per member.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in d.items():
            if isinstance(v, (dict, list, tuple)):
                d[k] = copy.deepcopy(v)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown run setting; accepted: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def stage_of(name: str) -> Stage:
    """The stage a RunConfig field belongs to; a KeyError for a field declared without one."""
    try:
        stage = _FIELDS[name].metadata["stage"]
    except KeyError:
        raise KeyError(f"RunConfig field {name!r} declares no stage (use tpp.config.setting)") from None
    if stage not in STAGES:
        raise KeyError(f"RunConfig field {name!r} has an unknown stage {stage!r}")
    return stage


def is_penalty_only(name: str) -> bool:
    return bool(_FIELDS[name].metadata.get("penalty_only"))


def help_of(name: str) -> str:
    return str(_FIELDS[name].metadata["help"])


def fields_of(*stages: Stage) -> list[str]:
    """Names of the RunConfig fields of these stages, in declaration order."""
    return [name for name in _FIELDS if stage_of(name) in stages]
