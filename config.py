"""A run's configuration: named, typed fields, written to config.json and into every checkpoint. Each field that is a
flag of pipeline.py declares it here once (help, section, whether it sweeps, the model family it applies to, its
range): the parser, the sweep and the checks are made from these declarations."""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from data import DATASETS, check_split_sizes, num_batches
from utils import name_problem

MODEL, DATA, OPTIMISATION, RUN_FOLDER, TRACKING, SCALING = (
    "model", "data", "optimisation", "run folder", "tracking", "scaling")
SHORTCUTS = ("identity", "projection")
MAX_PARAMS = 100_000_000  # 1.6 GB of float32 weights, gradients and Adam state: 20x the lab's largest network
MAX_CHANNELS = 65536  # of an MLP layer or a CNN level
MAX_CONVS = 1200  # 3x3 convolutions of a CNN: He et al.'s deepest CIFAR network (1202 layers) has 1200
SEED_RANGE = 2 ** 32  # numpy's seeds are 0 .. 2**32 - 1, the narrowest of python's, numpy's and torch's


@dataclass(frozen=True)
class Check:
    """A range a flag's value must lie in, as a predicate and the words that state it."""
    ok: Callable[[typing.Any], bool]
    words: str


def integer(low: int, high: int) -> Check:
    """An integer in [low, high]."""
    return Check(lambda v: low <= v <= high, f"an integer from {low} to {high:,}")


def real(low: float, high: float = math.inf, below_high: bool = False) -> Check:
    """A finite number in [low, high] (or [low, high) when `below_high`)."""
    return Check(lambda v: math.isfinite(v) and low <= v and (v < high if below_high else v <= high),
                 f"a finite number of at least {low:g}" + (f" and below {high:g}" if high < math.inf else ""))


# at most this many bytes, so that the file names made from a run's name (gradient_heatmap_<run name>.png, written
# through a temporary file of 35 bytes more) fit the file system's 255
RUN_NAME_BYTES = 200


def folder_name_problem(name: str) -> str | None:
    """Why `name` is not one folder name for a run (. or .., a separator, or name_problem's), or None."""
    if name in (".", "..") or any(c in name for c in "/\\"):
        return "must be one folder name (not . or .., no / or \\)"
    return name_problem(name, RUN_NAME_BYTES)


POSITIVE = Check(lambda v: v > 0, "positive")


@dataclass(frozen=True)
class Flag:
    """How a config field is a flag: its help, its section of -h, whether several values sweep it, the model family
    it applies to (None: both), its range and choices."""
    help: str
    group: str
    sweep: bool = False
    family: str | None = None
    check: Check | None = None
    choices: tuple | None = None
    cli_default: str | None = None  # the flag's default where it is not the field's (device: auto)


def setting(default, help: str, group: str, **flag) -> typing.Any:
    """A config field that is a flag of pipeline.py."""
    return field(default=default, metadata={"flag": Flag(help, group, **flag)})


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what one training run computes, and where it runs. Left as None, in_channels,
    input_size, warmup_epochs, shortcut and run_name are derived from the other fields; fields of the other model
    family are None. An impossible combination is a ValueError naming the flag."""
    # the model
    model_name: str = setting("MLP", "model family", MODEL, choices=("MLP", "ResNet"))
    num_hidden_layers: int | None = setting(4, "MLP hidden layers", MODEL, sweep=True, family="MLP",
                                            check=integer(1, 1000))
    num_conv_per_level: int | None = setting(4, "CNN 3x3 convolutions per level", MODEL, sweep=True,
                                             family="ResNet", check=integer(1, MAX_CONVS))
    residual_step: int = setting(0, "layers per residual block, 0 = plain (no shortcuts)", MODEL, sweep=True,
                                 check=integer(0, MAX_CONVS))
    width: int | None = setting(16, "MLP hidden width", MODEL, sweep=True, family="MLP", check=integer(1, MAX_CHANNELS))
    out_channels: int | None = setting(64, "CNN channels of the first level (doubling per level)", MODEL,
                                       family="ResNet", check=integer(1, MAX_CHANNELS))
    num_levels: int | None = setting(4, "CNN levels", MODEL, family="ResNet", check=integer(1, 16))
    stem: str | None = setting("cifar", "CNN stem: cifar = 3x3 conv at full resolution, imagenet = 7x7/2 conv + "
                               "3x3/2 max-pool", MODEL, family="ResNet", choices=("cifar", "imagenet"))
    shortcut: str | None = setting(None, "residual CNN shortcut where the shape changes: identity = He et al.'s "
                                   "option A (subsample, zero-pad the new channels; no parameters), projection = "
                                   "option B (1x1 conv + batch norm) (default: identity for the cifar stem, "
                                   "projection for imagenet)", MODEL, family="ResNet", choices=SHORTCUTS)
    num_classes: int = setting(10, "output classes", MODEL, check=integer(1, 100_000))
    in_channels: int | None = setting(None, "input channels (default: the dataset's)", MODEL, check=POSITIVE)
    input_size: int | None = setting(None, "input height and width (default: the dataset's)", MODEL,
                                     check=POSITIVE)
    # the data
    dataset: str = setting("MNIST", "dataset", DATA, choices=tuple(DATASETS))
    val_size: int = setting(5000, "validation images held out of the training set; 0 = train on every image (as "
                            "He et al. did for their tables): no validation exists, and each epoch is scored on the "
                            "test set instead, recorded as such", DATA, check=integer(0, 1_000_000_000))
    limit_train: int | None = setting(None, "train on the first N images of the training split only (default: all)",
                                      DATA, check=POSITIVE)
    augment: bool = setting(False, "random 4-pixel-padded crops and horizontal flips (CIFAR-10 only)", DATA)
    seed: int = setting(0, "random seed of the split, the data order and the initialisation", DATA, sweep=True,
                        check=integer(0, SEED_RANGE - 1))
    # the optimisation
    num_epochs: int = setting(1, "training epochs", OPTIMISATION, check=integer(1, 100_000))
    batch_size: int = setting(128, "training batch size", OPTIMISATION, check=integer(1, 10_000_000))
    optimizer: str = setting("adam", "optimizer", OPTIMISATION, choices=("adam", "sgd"))
    lr: float = setting(3e-4, "learning rate", OPTIMISATION,
                        check=Check(lambda v: math.isfinite(v) and v > 0, "a positive finite number"))
    momentum: float = setting(0.9, "SGD momentum", OPTIMISATION, check=real(0))
    nesterov: bool = setting(False, "Nesterov momentum (SGD)", OPTIMISATION)
    weight_decay: float = setting(0.0, "weight decay of conv and linear weights (biases and batch norm are not "
                                  "decayed)", OPTIMISATION, check=real(0))
    lr_schedule: str = setting("constant", "learning-rate schedule, stepped every batch: onecycle rises from lr/25 "
                               "to --lr over the warm-up and anneals to lr/25e4; cosine decays to 0; step divides by "
                               "10 at 50%% and 75%%", OPTIMISATION, choices=("constant", "onecycle", "cosine", "step"))
    warmup_epochs: float | None = setting(None, "epochs of warm-up: onecycle's rise, along a cosine and at least 2 "
                                          "steps; linear for the other schedules (default: 30%% of training for "
                                          "onecycle, none otherwise)", OPTIMISATION, check=real(0))
    label_smoothing: float = setting(0.0, "label smoothing of the training loss", OPTIMISATION,
                                     check=real(0, 1, below_high=True))
    ema: float = setting(0.0, "exponential moving average of the weights and batch-norm statistics, updated every "
                         "step with this decay (0 = off); validation, test, --no-train and cam.py use the averaged "
                         "weights, and the test accuracy of the trained weights is recorded beside theirs",
                         OPTIMISATION, check=real(0, 1, below_high=True))
    tta: str = setting("none", "test-time augmentation of the final test: flip = each image scored by the mean of "
                       "its and its mirror image's softmax (needs --augment); the plain test accuracy is recorded "
                       "too", OPTIMISATION, choices=("none", "flip"))
    # where and how it runs: device and threads may change when a run is resumed
    device: str = setting("cpu", "auto (cuda when available), cpu, cuda or cuda:N", SCALING, cli_default="auto")
    threads: int = setting(0, "CPU threads; 0 = 1 for the MLP (its tiny matmuls only lose to a second thread), "
                           "every core for CNNs", SCALING, check=integer(0, 1_000_000))
    sync_bn: bool = setting(False, "under torchrun: synchronise batch-norm statistics across processes (CUDA only)",
                            SCALING)
    amp: bool = setting(False, "mixed precision in what the device does well: bfloat16 autocast on CUDA devices of "
                        "compute capability 8.0+ and on CPUs with AVX512-BF16 or AMX, float16 autocast with a "
                        "GradScaler on older GPUs; on other CPUs a warning and float32. Each run's config records "
                        "the precision", SCALING)
    precision: str = "float32"  # what --amp chose on this device (train.amp_precision): float32, bfloat16 or float16
    grad_log_every: int = setting(1, "log gradient norms every N steps (0 = never)", TRACKING,
                                  check=integer(0, 2 ** 62))
    run_name: str | None = None  # the run folder's name (None: default_run_name(); replace() keeps the old one)

    RESUMABLE_CHANGES = ("device", "threads", "precision")  # --amp's precision follows the device
    DERIVED = ("depth", "num_params")  # written with the fields (config.json, checkpoints), computed on reading

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        info = DATASETS[self.dataset]
        family = FAMILY_FIELDS[self.model_name]
        derived = {name: None for fields in FAMILY_FIELDS.values() for name in fields if name not in family}
        derived.update(in_channels=self.in_channels or info.in_channels, input_size=self.input_size or info.input_size)
        if self.warmup_epochs is None:
            derived["warmup_epochs"] = 0.3 * self.num_epochs if self.lr_schedule == "onecycle" else 0.0
        if self.model_name == "ResNet" and self.residual_step:
            derived["shortcut"] = self.shortcut or ("identity" if self.stem == "cifar" else "projection")
        else:
            derived["shortcut"] = None  # a plain network has none; an MLP's are always the identity
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        self.check_combination()
        if self.run_name is None:
            object.__setattr__(self, "run_name", self.default_run_name())

    def check_combination(self) -> None:
        """Settings that are each in range but do not fit together are a ValueError."""
        info = DATASETS[self.dataset]
        family = FAMILY_FIELDS[self.model_name]
        missing = [name for name in family if getattr(self, name) is None and name != "shortcut"]
        if missing:
            raise ValueError(f"a {self.model_name} needs --{missing[0]}")
        for name in ("in_channels", "input_size"):
            if getattr(self, name) != getattr(info, name):
                raise ValueError(f"--{name} {getattr(self, name)} does not match {self.dataset} "
                                 f"({getattr(info, name)}); leave it out to derive it")
        rules = [
            (self.num_classes >= len(info.classes),
             f"--num_classes {self.num_classes} is smaller than {self.dataset}'s {len(info.classes)}"),
            (not self.augment or self.dataset == "CIFAR10", "--augment (crops and flips) is for CIFAR10 only"),
            (self.tta == "none" or self.augment, "--tta flip needs --augment: a model trained without mirror images "
             "has not learned that they are the same class"),
            (self.precision in ("float32", "bfloat16", "float16"), f"unknown precision {self.precision!r}"),
            (not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "--nesterov needs --optimizer sgd and a positive --momentum"),
            (self.warmup_epochs < self.num_epochs, f"--warmup_epochs must be at least 0 and below --num_epochs "
             f"{self.num_epochs}, got {self.warmup_epochs}"),
            (self.model_name != "MLP" or not self.residual_step or self.num_hidden_layers % self.residual_step == 0,
             f"--num_hidden_layers {self.num_hidden_layers} is not a multiple of --residual_step "
             f"{self.residual_step}; choose depths that the block size divides"),
            (self.model_name != "ResNet" or self.num_levels * self.num_conv_per_level <= MAX_CONVS,
             f"--num_levels x --num_conv_per_level must be at most {MAX_CONVS:,} convolutions"),
            (self.model_name != "ResNet" or self.out_channels * 2 ** (self.num_levels - 1) <= MAX_CHANNELS,
             f"--out_channels x 2**(--num_levels - 1) must be at most {MAX_CHANNELS:,} channels"),
        ]
        for ok, problem in rules:
            if not ok:
                raise ValueError(problem)
        train_images = check_split_sizes(info.num_train, self.val_size, self.limit_train)  # again once read
        self.check_schedule_length(num_batches(train_images, self.batch_size))
        if self.num_params > MAX_PARAMS:
            raise ValueError(f"the model would have {self.num_params:,} parameters; this suite trains at most "
                             f"{MAX_PARAMS:,}: lower --width, --out_channels or the depth")

    def check_schedule_length(self, steps_per_epoch: int) -> None:
        """A ValueError when the run is too short for its schedule: OneCycleLR's rise ends at step warmup - 1 and
        divides by its length, so it takes 2 steps, and the fall at least 1."""
        total = self.num_epochs * steps_per_epoch
        if self.lr_schedule == "onecycle" and total < 3:
            raise ValueError(f"--lr_schedule onecycle needs at least 3 training steps; this run has {total} "
                             f"({self.num_epochs} epoch(s) of {steps_per_epoch} batch(es)): lower --batch_size, "
                             "train more epochs or use another --lr_schedule")

    @cached_property
    def network_size(self) -> tuple[int, int]:
        """(depth, parameters) of the model, built on the meta device: no memory, no random numbers drawn."""
        import torch

        from models import build_model  # models imports this module
        with torch.device("meta"):
            network = build_model(self)
        return network.depth, sum(p.numel() for p in network.parameters())

    @property
    def depth(self) -> int:
        """Weight layers (He et al.'s count): hidden layers + 2 for the MLP, its 3x3 convolutions + 2 for the CNN."""
        return self.network_size[0]

    @property
    def num_params(self) -> int:
        """Trainable parameters of the model."""
        return self.network_size[1]

    def default_run_name(self) -> str:
        """A run folder name that states the model, dataset, depth, width, shortcuts and seed; the MLP's depth is its
        hidden-layer count (h22 = --num_hidden_layers 22), the CNN's its weight layers (d20); res2proj marks
        projection shortcuts."""
        shortcuts = f"res{self.residual_step}" if self.residual_step else "plain"
        if self.shortcut == "projection":
            shortcuts += "proj"
        if self.model_name == "MLP":
            shape = f"h{self.num_hidden_layers}_w{self.width}"
        else:
            shape = f"d{self.depth}_c{self.out_channels}x{self.num_levels}" + (
                "_in" if self.stem == "imagenet" else "")
        return f"{self.model_name.lower()}_{self.dataset.lower()}_{shape}_{shortcuts}_s{self.seed}"

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """The config a dict (config.json, a checkpoint) describes; missing, unknown or impossible settings are a
        ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"a run config is a dict, not {type(values).__name__}")
        values = {k: v for k, v in upgrade(values).items() if k not in cls.DERIVED}
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - values.keys()), sorted(values.keys() - names)
        if missing or unknown:
            problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
            raise ValueError(f"not a run config of this version of the suite ({problem})")
        return cls(**values)

    def to_dict(self) -> dict:
        """The config as a plain dict (for JSON and checkpoints), with its derived depth and parameter count."""
        return dict(dataclasses.asdict(self), **{name: getattr(self, name) for name in self.DERIVED})

    def changed_flag(self, asked: RunConfig, more_epochs: bool = True) -> str | None:
        """How `asked` differs from this (saved) config in a field a resumed run may not change, as the first such
        flag with both values ("--lr 0.0003, not 0.1"), the model before the name; None when it may continue this
        run. With `more_epochs`, a constant schedule may be given another number of epochs."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(asked)
        changeable = set(self.RESUMABLE_CHANGES)
        if more_epochs and self.lr_schedule == "constant" and asked.lr_schedule == "constant":
            changeable.add("num_epochs")  # a constant rate does not depend on the length of training
        changed = [k for k in mine if k not in changeable and mine[k] != theirs[k]]
        return f"--{changed[0]} {mine[changed[0]]}, not {theirs[changed[0]]}" if changed else None


FLAGS = {f.name: f.metadata["flag"] for f in dataclasses.fields(RunConfig) if "flag" in f.metadata}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}
FAMILY_FIELDS = {family: tuple(name for name, flag in FLAGS.items() if flag.family == family)
                 for family in ("MLP", "ResNet")}
FIELD_TYPES = typing.get_type_hints(RunConfig)


def value_type(name: str) -> type:
    """The type of a field's value (int for `int | None`)."""
    return next(t for t in typing.get_args(FIELD_TYPES[name]) or (FIELD_TYPES[name],) if t is not type(None))


def check_field(f: dataclasses.Field, value) -> None:
    """A field's value of the right type, among its choices and in its range, or a ValueError naming the flag."""
    if value is None and type(None) in typing.get_args(FIELD_TYPES[f.name]):
        return
    kind = value_type(f.name)
    if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            or kind is float and isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"--{f.name} must be {kind.__name__}, got {value!r}")
    flag = f.metadata.get("flag")
    if flag is None:
        if f.name == "run_name" and (problem := folder_name_problem(value)):
            raise ValueError(f"--run_name {value[:80]!r} {problem}")
        return
    if flag.choices is not None and value not in flag.choices:
        raise ValueError(f"--{f.name} {value!r} is not one of {', '.join(map(str, flag.choices))}")
    if flag.check is not None and not flag.check.ok(value):
        raise ValueError(f"--{f.name} must be {flag.check.words}, got {value}")


EXERCISE2_RECIPE = dict(augment=True, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                        label_smoothing=0.1, lr_schedule="onecycle", batch_size=128)
PRESETS = {  # akamaster's resnet8(), resnet20(), resnet38(): He et al.'s CIFAR ResNets, option A shortcuts
    **{f"resnet{2 + 6 * n}": dict(model_name="ResNet", dataset="CIFAR10", out_channels=16, num_levels=3,
                                  num_conv_per_level=[2 * n], residual_step=[2], stem="cifar")
       for n in (1, 3, 6)},
    # Exercise 1: width-16 MLPs on MNIST at 9 depths, plain and residual, seeds 0 to 4, 10 epochs (default Adam)
    "exercise1": dict(model_name="MLP", dataset="MNIST", width=[16],
                      num_hidden_layers=[2, 6, 10, 14, 18, 22, 26, 30, 34], residual_step=[0, 2], seed=[0, 1, 2, 3, 4],
                      num_epochs=10),
    # Exercise 2: those ResNets at depths 8, 20 and 38, plain and residual, seeds 0 to 2, 10 epochs of one-cycle SGD
    "exercise2": dict(model_name="ResNet", dataset="CIFAR10", out_channels=16, num_levels=3,
                      num_conv_per_level=[2, 6, 12], residual_step=[0, 2], seed=[0, 1, 2], **EXERCISE2_RECIPE,
                      num_epochs=10),
    # He et al.'s ResNet-20 toward their accuracy in about a million images: Exercise 2's recipe on all 50,000
    # training images (nothing held out) for 21 epochs, flip test-time augmentation (--ema tied on validation)
    "resnet20_fast": dict(model_name="ResNet", dataset="CIFAR10", out_channels=16, num_levels=3,
                          num_conv_per_level=[6], residual_step=[2], stem="cifar", seed=[0, 1, 2], **EXERCISE2_RECIPE,
                          val_size=0, num_epochs=21, tta="flip"),
}


def upgrade(values: dict) -> dict:
    """A config written by an earlier version of the suite, in today's fields: before --shortcut existed every
    residual CNN used projection shortcuts where the shape changes; before the precision was recorded, --amp meant
    bfloat16; before --ema and --tta, runs used neither."""
    if "shortcut" not in values and "model_name" in values:
        residual_cnn = values["model_name"] == "ResNet" and values.get("residual_step")
        values = dict(values, shortcut="projection" if residual_cnn else None)
    if "precision" not in values and "amp" in values:
        values = dict(values, precision="bfloat16" if values["amp"] else "float32")
    return {"ema": 0.0, "tta": "none", **values}  # before --ema and --tta: neither
