"""Sweep planning: one RunConfig per combination of the swept values, run names, and what to do with each run
folder that already exists (train, continue, skip, or refuse)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from config import RunConfig
from data import RawData
from models import build_model
from train import RunFiles, train_run

# the flags that take several values, per model family; the order is the order of the runs
SWEEP_FLAGS = {"MLP": ("num_hidden_layers", "residual_step", "width", "seed"),
               "ResNet": ("num_conv_per_level", "residual_step", "seed")}
MODEL_FIELDS = {"MLP": ("num_hidden_layers", "width"), "ResNet": ("num_conv_per_level", "out_channels", "num_levels",
                                                                  "stem")}


class RunConflict(ValueError):
    """A run folder holds something the command would silently replace or misreport."""


def expand(settings: dict, sweep: dict[str, list]) -> list[RunConfig]:
    """The configs of a sweep: `settings` holds every single-valued field, `sweep` each swept flag's values.

    A swept flag that does not apply to the model may have one value (ignored) but not several."""
    model = settings["model_name"]
    for flag, values in sweep.items():
        if flag not in SWEEP_FLAGS[model] and len(set(values)) > 1:
            raise ValueError(f"--{flag} does not apply to the {model}; give it one value or leave it out")
    unused = {f for fields in MODEL_FIELDS.values() for f in fields} - set(MODEL_FIELDS[model])
    base = {**settings, **{flag: values[0] for flag, values in sweep.items()}, **dict.fromkeys(unused)}
    flags = SWEEP_FLAGS[model]
    configs = []
    for values in itertools.product(*(list(dict.fromkeys(sweep[flag])) for flag in flags)):
        fields = dict(base, **dict(zip(flags, values)))
        model_nn = build_model(RunConfig(**dict(fields, depth=0, num_params=0, run_name="")))
        config = RunConfig(**dict(fields, depth=model_nn.depth, run_name="",
                                  num_params=sum(p.numel() for p in model_nn.parameters())))
        configs.append(replace(config, run_name=run_name(config)))
    return configs


def run_name(config: RunConfig) -> str:
    """A run folder name that states the model, dataset, depth, width, shortcuts and seed; the MLP's depth is its
    hidden-layer count (h22 = --num_hidden_layers 22), the CNN's its weight layers (d20)."""
    shortcuts = f"res{config.residual_step}" if config.residual_step else "plain"
    if config.model_name == "MLP":
        shape = f"h{config.num_hidden_layers}_w{config.width}"
    else:
        shape = f"d{config.depth}_c{config.out_channels}x{config.num_levels}" + (
            "_in" if config.stem == "imagenet" else "")
    return f"{config.model_name.lower()}_{config.dataset.lower()}_{shape}_{shortcuts}_s{config.seed}"


def with_prefix(configs: list[RunConfig], name: str | None) -> list[RunConfig]:
    """--run_name: the folder name of a single run, a prefix of each name in a sweep."""
    if name is None:
        return configs
    if len(configs) == 1:
        return [replace(configs[0], run_name=name)]
    return [replace(c, run_name=f"{name}_{c.run_name}") for c in configs]


@dataclass
class PlannedRun:
    """A run of the sweep, its files, and its finished history when it is to be skipped."""
    config: RunConfig
    files: RunFiles
    finished: dict | None = None


def plan(configs: list[RunConfig], out_dir: Path, checkpoint: Path | None, resume: bool,
         overwrite: bool) -> list[PlannedRun]:
    """Decide for every run before anything trains: new, continued, skipped (finished with these settings), or
    refused with a RunConflict (existing files without --resume/--overwrite, or finished with other settings)."""
    if checkpoint is not None and len(configs) > 1:
        raise RunConflict(f"--checkpoint names one file but the sweep has {len(configs)} runs; leave it out")
    planned = []
    for config in configs:
        files = RunFiles(out_dir / config.run_name, checkpoint)
        run = PlannedRun(config, files)
        if files.exist() and not (resume or overwrite):
            raise RunConflict(f"{files.run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                              "replace it, or --run_name/--out_dir to keep both")
        if resume and not overwrite:
            run.finished = finished_history(config, files)
        planned.append(run)
    return planned


def finished_history(config: RunConfig, files: RunFiles) -> dict | None:
    """The history of a finished run that is exactly what `config` asks for, None for an unfinished one; a
    finished run of other settings is a RunConflict."""
    history = files.read_history()
    if history is None or "test" not in history:
        return None
    saved = files.read_config()
    if saved is None:
        raise RunConflict(f"{files.config} is missing or unreadable beside a finished history; pass --overwrite "
                          "to train the run again")
    changed = saved.differences(config)
    if changed:
        name = changed[0]
        raise RunConflict(f"{files.run_dir} finished with --{name} {getattr(saved, name)}, not "
                          f"{getattr(config, name)}; pass --overwrite to replace it, or --run_name/--out_dir to "
                          "keep both")
    epochs = len(history["epochs"])
    if epochs > config.num_epochs:
        raise RunConflict(f"{files.run_dir} finished {epochs} epochs, more than --num_epochs {config.num_epochs}; "
                          "pass --overwrite to replace it, or --run_name/--out_dir to keep both")
    return history if epochs == config.num_epochs else None


def run_planned(run: PlannedRun, raw: RawData, resume: bool) -> dict:
    """Train one planned run (replacing what an --overwrite'd folder held first); return its history."""
    if not resume and run.files.exist():
        run.files.remove()
    return train_run(run.config, raw, run.files, resume)
