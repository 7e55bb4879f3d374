"""Sweeps: one RunConfig per combination of the swept values, run names, what to do with each run folder that
already exists (train, continue, skip, or refuse), and running the runs in this process or in --jobs workers."""
from __future__ import annotations

import itertools
import os
import queue
import signal
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from config import RunConfig
from data import RawData
from models import build_model
from tracking import TrackingOptions
from runs import (CheckpointError, RunFiles, RunLock, check_checkpoint_resumable, check_resumable, load_checkpoint,
                  saved_config)
from train import train_run
from utils import CLIError, first_line

# the flags that take several values, per model family; the order is the order of the runs
SWEEP_FLAGS = {"MLP": ("num_hidden_layers", "residual_step", "width", "seed"),
               "ResNet": ("num_conv_per_level", "residual_step", "seed")}
MODEL_FIELDS = {"MLP": ("num_hidden_layers", "width"), "ResNet": ("num_conv_per_level", "out_channels", "num_levels",
                                                                  "stem", "shortcut")}


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
        if not fields["residual_step"]:
            fields["shortcut"] = None  # a plain network has none
        network = build_model(RunConfig(**dict(fields, depth=0, num_params=0, run_name="")))
        config = RunConfig(**dict(fields, depth=network.depth, run_name="",
                                  num_params=sum(p.numel() for p in network.parameters())))
        configs.append(replace(config, run_name=run_name(config)))
    return configs


def run_name(config: RunConfig) -> str:
    """A run folder name that states the model, dataset, depth, width, shortcuts and seed; the MLP's depth is its
    hidden-layer count (h22 = --num_hidden_layers 22), the CNN's its weight layers (d20); res2proj marks projection
    shortcuts."""
    shortcuts = f"res{config.residual_step}" if config.residual_step else "plain"
    if config.shortcut == "projection":
        shortcuts += "proj"
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


@dataclass
class Plan:
    """The runs of a sweep, and the locks of their folders that this process holds, by run index."""
    runs: list[PlannedRun]
    locks: dict[int, RunLock] | None  # None: this process writes nothing (a torchrun rank but 0)

    def lock_new_runs(self) -> None:
        """Make and lock the folders of the runs that had none when planned, once nothing can refuse the command
        any more; a folder that another process wrote meanwhile is a RunConflict."""
        for i, run in enumerate(self.runs):
            if self.locks is not None and i not in self.locks:
                self.locks[i] = run.files.lock()
                if run.files.exist():
                    raise RunConflict(f"{run.files.run_dir} was written by another process while this one "
                                      "planned; run the command again")

    def release(self) -> None:
        for lock in (self.locks or {}).values():
            lock.release()


def plan(configs: list[RunConfig], out_dir: Path, checkpoint: Path | None, resume: bool, overwrite: bool,
         lock: bool = True) -> Plan:
    """Decide for every run before anything trains: new, continued, skipped (finished with these settings), or
    refused with a RunConflict (existing files without --resume/--overwrite, or finished with other settings).
    With `lock`, every existing run folder is locked for this process before it is read, so that a run another
    process trains is refused (RunLocked); new runs are locked by Plan.lock_new_runs."""
    if checkpoint is not None and len(configs) > 1:
        raise RunConflict(f"--checkpoint names one file but the sweep has {len(configs)} runs; leave it out")
    sweep = Plan([], {} if lock else None)
    try:
        for i, config in enumerate(configs):
            files = RunFiles(out_dir / config.run_name, checkpoint)
            if lock and files.run_dir.is_dir():
                sweep.locks[i] = files.lock()
            sweep.runs.append(plan_run(config, files, resume, overwrite, lock))
    except BaseException:
        sweep.release()
        raise
    return sweep


def plan_run(config: RunConfig, files: RunFiles, resume: bool, overwrite: bool, writes: bool) -> PlannedRun:
    """What to do with one run folder (see plan); a process that `writes` repairs what it can."""
    run = PlannedRun(config, files)
    if files.exist() and not (resume or overwrite):
        raise RunConflict(f"{files.run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                          "replace it, or --run_name/--out_dir to keep both")
    if resume and not overwrite:
        run.finished = finished_history(config, files, writes)
        if run.finished is None and files.checkpoint.is_file():
            check_checkpoint_resumable(load_checkpoint(files.checkpoint), config, files.checkpoint)
    return run


def finished_history(config: RunConfig, files: RunFiles, writes: bool) -> dict | None:
    """The history of a finished run that is exactly what `config` asks for, None for an unfinished one or one
    that may train more epochs; a finished run that cannot continue as `config` is a ResumeError. A missing or
    unreadable config.json is restored from the checkpoint (written when this process `writes`)."""
    history = files.read_history()
    if history is None or "test" not in history:
        return None
    saved = files.read_config()
    if saved is None:
        saved = restored_config(files, writes)
    epochs = len(history["epochs"])
    check_resumable(saved, epochs, config, files.run_dir)
    return history if epochs == config.num_epochs else None


def restored_config(files: RunFiles, writes: bool) -> RunConfig:
    """The config of a finished run whose config.json is missing or unreadable, from its checkpoint; written back
    to config.json when this process `writes`. Without a usable checkpoint, a RunConflict that says how to restore
    it (never --overwrite, which would discard the finished run)."""
    try:
        saved = saved_config(load_checkpoint(files.checkpoint), files.checkpoint)
    except CheckpointError as e:
        raise RunConflict(f"{files.config} is missing or unreadable beside a finished run, and its checkpoint cannot "
                          f"restore it ({e}); put back the run's config.json (from a backup or a copy of the run), "
                          "or move the folder away to train it again") from None
    if writes:
        files.write_config(saved)
        print(f"{files.config}: restored from {files.checkpoint}", flush=True)
    return saved


def run_planned(run: PlannedRun, raw: RawData, resume: bool, progress: bool | None = None, rank: int = 0,
                world_size: int = 1, tracking: TrackingOptions = TrackingOptions()) -> dict:
    """Train one planned run (replacing what an --overwrite'd folder held first); return its history."""
    if not resume and rank == 0 and run.files.exist():
        run.files.remove()
    return train_run(run.config, raw, run.files, resume, progress, rank, world_size, tracking)


@dataclass
class SweepResult:
    """The (config, history) of every run that finished or was skipped, and (run name, error) of those that
    failed."""
    runs: list[tuple[RunConfig, dict]]
    failures: list[tuple[str, str]]


def cost(config: RunConfig) -> int:
    """A run's relative training time, for scheduling the longest first."""
    return config.depth * config.num_epochs


def execute(sweep: Plan, raw: RawData, resume: bool, jobs: int = 1,
            devices: tuple[str, ...] = ("cpu",), threads: int = 1, rank: int = 0,
            world_size: int = 1, tracking: TrackingOptions = TrackingOptions()) -> SweepResult:
    """Train the planned runs: in this process one after another, or in `jobs` spawned workers (longest first,
    worker w on devices[w % len(devices)] with `threads` CPU threads, the data shared with them through shared
    memory), each tracked as `tracking` asks. A failed run does not stop the others."""
    planned = sweep.runs
    todo = [i for i, run in enumerate(planned) if run.finished is None]
    for run in planned:
        if run.finished is not None:
            print(f"{run.config.run_name}: already finished with these settings, skipped", flush=True)
    histories: dict[int, dict] = {i: run.finished for i, run in enumerate(planned) if run.finished is not None}
    failures: dict[int, str] = {}
    if jobs == 1:
        for i in todo:
            try:
                histories[i] = run_planned(planned[i], raw, resume, None, rank, world_size, tracking)
            except KeyboardInterrupt:
                run = planned[i]
                saved = (f"the last finished epoch of {run.config.run_name} is saved in {run.files.checkpoint}"
                         if run.files.checkpoint.is_file() else f"{run.config.run_name} had finished no epoch")
                raise KeyboardInterrupt(f"{saved}; run the same command with --resume to continue") from None
            except Exception as e:  # noqa: BLE001 -- one run's failure is reported; the sweep goes on
                failures[i] = report_failure(planned[i], e, announce=len(planned) > 1)
    elif todo:
        sweep.release()  # each worker locks the run it trains
        histories.update(run_in_workers(planned, todo, raw, resume, jobs, devices, threads, failures, tracking))
    return SweepResult([(planned[i].config, histories[i]) for i in sorted(histories)],
                       [(planned[i].config.run_name, failures[i]) for i in sorted(failures)])


def report_failure(run: PlannedRun, error: Exception, announce: bool = True) -> str:
    """Print a traceback for what is not one of our own errors and, when `announce` (a sweep goes on with other
    runs), one line saying the run failed; return that line."""
    if not isinstance(error, (ArithmeticError, ValueError, OSError, CLIError)):
        traceback.print_exception(error)
    line = first_line(error)
    if announce:
        print(f"{run.config.run_name}: failed: {line}", file=sys.stderr, flush=True)
    return line


def run_in_workers(planned: list[PlannedRun], todo: list[int], raw: RawData, resume: bool, jobs: int,
                   devices: tuple[str, ...], threads: int, failures: dict[int, str],
                   tracking: TrackingOptions) -> dict[int, dict]:
    """Train runs `todo` in `jobs` spawned worker processes; Ctrl-C or SIGTERM stops every worker after its
    last checkpoint. Return the histories of the runs that finished, recording failures in `failures`."""
    context = torch.multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    for i in sorted(todo, key=lambda i: -cost(planned[i].config)):
        tasks.put(i)
    workers = [context.Process(target=worker, daemon=True,
                               args=(planned, raw, resume, devices[w % len(devices)], threads, tasks, results,
                                     tracking))
               for w in range(min(jobs, len(todo)))]
    for process in workers:
        tasks.put(None)
        process.start()
    histories: dict[int, dict] = {}
    bar = tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True)
    try:
        while len(histories) + len(failures) < len(todo):
            try:
                i, history, error = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in workers):
                    for i in set(todo) - histories.keys() - failures.keys():
                        failures[i] = "its worker process died"
                continue
            if error is None:
                histories[i] = history
            else:
                failures[i] = error
            bar.update()
    except KeyboardInterrupt:
        for process in workers:
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in workers:
            process.join(timeout=60)
        raise KeyboardInterrupt("every run keeps its last finished epoch; run the same command with --resume to "
                                "continue") from None
    finally:
        bar.close()
    for process in workers:
        process.join()
    return histories


def worker(planned: list[PlannedRun], raw: RawData, resume: bool, device: str, threads: int, tasks,
           results, tracking: TrackingOptions) -> None:
    """A worker process: take run indices from `tasks` until None, train each, and put (index, history, error)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        torch.set_num_threads(threads)
        while (i := tasks.get()) is not None:
            run = replace(planned[i], config=replace(planned[i].config, device=device))
            try:
                with run.files.lock():
                    results.put((i, run_planned(run, raw, resume, progress=False, tracking=tracking), None))
            except Exception as e:  # noqa: BLE001 -- reported to the sweep, which goes on
                results.put((i, None, report_failure(run, e)))
    except KeyboardInterrupt:
        pass
