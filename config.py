"""A run's configuration: named, typed fields, written to config.json and into every checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what one training run computes, and where it runs."""
    run_name: str
    model_name: str  # MLP or ResNet
    dataset: str  # MNIST or CIFAR10
    in_channels: int
    input_size: int
    num_classes: int
    # the model: MLP fields are None for a ResNet and ResNet fields None for an MLP
    num_hidden_layers: int | None
    width: int | None
    num_conv_per_level: int | None
    out_channels: int | None
    num_levels: int | None
    stem: str | None
    shortcut: str | None  # where a residual CNN's shape changes: identity (He et al.'s option A) or projection (B)
    residual_step: int  # layers per residual block, 0 = plain
    depth: int  # weight layers (He et al.'s count): hidden layers + 2 for the MLP
    num_params: int
    # the data
    val_size: int
    limit_train: int | None
    augment: bool
    seed: int
    # the optimisation
    num_epochs: int
    batch_size: int
    optimizer: str  # adam or sgd
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float  # on conv and linear weights only
    lr_schedule: str  # constant, onecycle, cosine or step; stepped every batch
    warmup_epochs: float  # linear warm-up (onecycle: the rising part of the cycle)
    label_smoothing: float
    sync_bn: bool
    amp: bool  # --amp: autocast in what the device does well
    precision: str  # what --amp chose here (train.amp_precision): float32, bfloat16, or float16 with a GradScaler
    grad_log_every: int
    # where it runs: may change when a run is resumed
    device: str
    threads: int

    RESUMABLE_CHANGES = ("device", "threads", "precision")  # --amp's precision follows the device

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """The config a dict (config.json, a checkpoint) describes; missing or unknown keys are a ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"a run config is a dict, not {type(values).__name__}")
        values = upgrade(values)
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - values.keys()), sorted(values.keys() - names)
        if missing or unknown:
            problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
            raise ValueError(f"not a run config of this version of the suite ({problem})")
        return cls(**values)

    def to_dict(self) -> dict:
        """The config as a plain dict (for JSON and checkpoints)."""
        return dataclasses.asdict(self)

    def changed_flag(self, asked: RunConfig) -> str | None:
        """How `asked` differs from this (saved) config in a field a resumed run may not change, as the first such
        flag with both values ("--lr 0.0003, not 0.1"); None when it may continue this run."""
        mine, theirs = self.to_dict(), asked.to_dict()
        changeable = set(self.RESUMABLE_CHANGES)
        if self.lr_schedule == "constant" and asked.lr_schedule == "constant":
            changeable.add("num_epochs")  # a constant rate does not depend on the length of training
        changed = [k for k in mine if k not in changeable and mine[k] != theirs[k]]
        return f"--{changed[0]} {mine[changed[0]]}, not {theirs[changed[0]]}" if changed else None


def upgrade(values: dict) -> dict:
    """A config written by an earlier version of the suite, in today's fields: before --shortcut existed every
    residual CNN used projection shortcuts where the shape changes; before the precision was recorded, --amp meant
    bfloat16."""
    if "shortcut" not in values and "model_name" in values:
        residual_cnn = values["model_name"] == "ResNet" and values.get("residual_step")
        values = dict(values, shortcut="projection" if residual_cnn else None)
    if "precision" not in values and "amp" in values:
        values = dict(values, precision="bfloat16" if values["amp"] else "float32")
    return values
