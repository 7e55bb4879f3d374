"""Sweeps: one RunConfig per combination of the swept values, run-name prefixes, what to do with each run folder that
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

from config import FLAGS, RunConfig
from data import RawData
from tracking import TrackingOptions
from train import RunFiles, check_resumable, train_run
from utils import CLIError, first_line, load_checkpoint


class RunConflict(ValueError):
    """A run folder holds something the command would silently replace or misreport."""


def expand(values: dict) -> list[RunConfig]:
    """The configs of a sweep: `values` holds every flag of RunConfig, a list of values for each sweepable one;
    every combination of the swept values of the model's family is a run, in the order of RunConfig's fields.

    A swept flag that does not apply to the model may have one value (ignored) but not several."""
    model = values["model_name"]
    swept = [name for name, flag in FLAGS.items() if flag.sweep]
    applies = [name for name in swept if FLAGS[name].family in (None, model)]
    for name in swept:
        if name not in applies and len(set(values[name])) > 1:
            raise ValueError(f"--{name} does not apply to the {model}; give it one value or leave it out")
    base = {**values, **{name: values[name][0] for name in swept}}
    return [RunConfig(**dict(base, **dict(zip(applies, combination))))
            for combination in itertools.product(*(list(dict.fromkeys(values[name])) for name in applies))]


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
            if run.finished is None and files.checkpoint.is_file():
                check_resumable(load_checkpoint(files.checkpoint), config, files.checkpoint)
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
    changed = saved.changed_flag(config)
    if changed:
        raise RunConflict(f"{files.run_dir} finished with {changed}; pass --overwrite to replace it, or "
                          "--run_name/--out_dir to keep both")
    epochs = len(history["epochs"])
    if epochs > config.num_epochs:
        raise RunConflict(f"{files.run_dir} finished {epochs} epochs, more than --num_epochs {config.num_epochs}; "
                          "pass --overwrite to replace it, or --run_name/--out_dir to keep both")
    return history if epochs == config.num_epochs else None


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


def execute(planned: list[PlannedRun], raw: RawData, resume: bool, jobs: int = 1,
            devices: tuple[str, ...] = ("cpu",), threads: int = 1, rank: int = 0,
            world_size: int = 1, tracking: TrackingOptions = TrackingOptions()) -> SweepResult:
    """Train the planned runs: in this process one after another, or in `jobs` spawned workers (longest first,
    worker w on devices[w % len(devices)] with `threads` CPU threads, the data shared with them through shared
    memory), each tracked as `tracking` asks. A failed run does not stop the others."""
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
                results.put((i, run_planned(run, raw, resume, progress=False, tracking=tracking), None))
            except Exception as e:  # noqa: BLE001 -- reported to the sweep, which goes on
                results.put((i, None, report_failure(run, e)))
    except KeyboardInterrupt:
        pass
