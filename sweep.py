"""Sweeps: one RunConfig per combination of the swept values, run-name prefixes, what to do with each run folder that
already exists (train, continue, skip, or refuse), and running the runs in this process or in --jobs workers."""
from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from config import DEFAULTS, FLAGS, RunConfig
from data import RawData
from runs import (CheckpointError, ResumeError, RunConflict, RunFiles, RunLock, check_checkpoint_resumable,
                  check_resumable, is_number, load_checkpoint, load_model, saved_config, state_error,
                  well_formed_history)
from models import build_model
from train import Runtime, build_optimizer, train_run
from utils import CLIError, first_line, rng_state, set_rng_state, setup_for_distributed

def expand(values: dict, given: Collection[str] = ()) -> list[RunConfig]:
    """The configs of a sweep: `values` holds every flag of RunConfig, a list of values for each sweepable one;
    every combination of the swept values of the model's family is a run, in the order of RunConfig's fields.
    A flag that no run of the sweep would use (the other model family's, SGD's momentum for Adam, a shortcut kind
    without shortcuts) is a ValueError when it is among the flags `given` or away from its default (a preset's)."""
    model = values["model_name"]
    swept = [name for name, flag in FLAGS.items() if flag.sweep]
    applies = [name for name in swept if FLAGS[name].family in (None, model)]
    unused = {name: f"{'an' if FLAGS[name].family == 'MLP' else 'a'} {FLAGS[name].family} setting" for name in FLAGS
              if FLAGS[name].family not in (None, model)}
    if values["optimizer"] != "sgd":
        unused["momentum"] = "SGD's (Adam has none)"
    if not any(values["residual_step"]):
        unused["shortcut"] = "the kind of residual shortcut and every run is plain (--residual_step 0)"
    for name, what in unused.items():
        default = DEFAULTS[name]
        if name in given or values[name] != ([default] if FLAGS[name].sweep else default):
            raise ValueError(f"--{name} is {what}: no run of this {model} sweep uses it; leave it out")
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


# what the plan does with each run, and how it says so before anything trains
ACTIONS = {"new": "new run", "resume": "continues from its checkpoint",
           "replace": "trains from the start; its old files are removed first",
           "skip": "already finished with these settings, skipped"}


@dataclass
class PlannedRun:
    """A run of the sweep, its files, what the plan does with it (one of ACTIONS), and the finished history of a
    run it skips."""
    config: RunConfig
    files: RunFiles
    action: str
    finished: dict | None = None


@dataclass
class Plan:
    """The runs of a sweep, what the command does with existing run folders (plan's `existing`), and the locks of
    their folders that this process holds, by run index."""
    runs: list[PlannedRun]
    existing: str
    locks: dict[int, RunLock] | None  # None: this process writes nothing (a torchrun rank but 0)

    def lock_new_runs(self) -> None:
        """Make and lock the folders of the runs that had none when planned, once nothing can refuse the command
        any more; a folder that another process wrote meanwhile is a RunConflict."""
        for i, run in enumerate(self.runs):
            if self.locks is not None and i not in self.locks:
                self.locks[i] = run.files.lock()
                if run.action == "new" and run.files.exist():
                    raise RunConflict(f"{run.files.run_dir} was written by another process while this one "
                                      "planned; run the command again")

    def release(self) -> None:
        for lock in (self.locks or {}).values():
            lock.release()


def plan(configs: list[RunConfig], out_dir: Path, checkpoint: Path | None, existing: str, lock: bool = True) -> Plan:
    """Decide for every run before anything trains what to do with its folder: an action of ACTIONS, or a refusal
    (RunConflict, ResumeError) that stops the command: existing files unless `existing` is "resume" or
    "overwrite", or a run that cannot continue with these settings.
    With `lock`, every existing run folder (with the folder of an existing --checkpoint) is locked for this process
    before it is read, so that a run another process trains is refused (RunLocked); new runs are locked by
    Plan.lock_new_runs."""
    if checkpoint is not None and len(configs) > 1:
        raise RunConflict(f"--checkpoint names one file but the sweep has {len(configs)} runs; leave it out")
    sweep = Plan([], existing, {} if lock else None)
    try:
        for i, config in enumerate(configs):
            files = RunFiles(out_dir / config.run_name, checkpoint)
            check_checkpoint_path(config, files)  # before its folder is locked: a refused command makes no folder
            if lock and (files.run_dir.exists() or files.checkpoint.exists()):
                sweep.locks[i] = files.lock()
            sweep.runs.append(plan_run(config, files, existing, lock))
    except BaseException:
        sweep.release()
        raise
    return sweep


def plan_run(config: RunConfig, files: RunFiles, existing: str, writes: bool) -> PlannedRun:
    """What to do with one run folder (see plan) whose --checkpoint path has been checked (check_checkpoint_path);
    a process that `writes` repairs what it can."""
    if not files.exist():
        return PlannedRun(config, files, "new")
    if existing == "overwrite":
        return PlannedRun(config, files, "replace")
    if existing != "resume":
        raise RunConflict(f"{files.run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                          "replace it, or --run_name/--out_dir to keep both")
    finished = finished_history(config, files, writes)
    if finished is not None:
        check_model_kept(files)
        return PlannedRun(config, files, "skip", finished)
    if files.checkpoint.is_file():
        try:
            checkpoint = load_checkpoint(files.checkpoint)
        except CheckpointError as e:
            raise ResumeError(f"{e}; the run cannot continue: pass --overwrite to train it again, or move its folder "
                              "away") from None
        check_checkpoint_resumable(checkpoint, config, files.checkpoint)
        check_restorable(checkpoint, config, files.checkpoint)
        return PlannedRun(config, files, "resume")
    history = files.read_history()
    if history is not None and history["epochs"]:  # epochs trained, and nothing to continue them from
        raise ResumeError(f"{files.run_dir} holds {len(history['epochs'])} trained epochs but no checkpoint at "
                          f"{files.checkpoint} to continue from; pass --checkpoint with the path it was saved to, "
                          "--overwrite to train it again from the start, or move its folder away")
    return PlannedRun(config, files, "replace")  # files of a run that saved no epoch: nothing to continue


def check_restorable(checkpoint: dict, config: RunConfig, path: Path) -> None:
    """A ResumeError, before the plan says that a run continues, when a checkpoint's entries are not the state that
    restore loads into `config`'s run; each is loaded into a fresh one of its kind (restore_problem)."""
    try:
        problem = restore_problem(checkpoint, config)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        problem = state_error(e)
    if problem:
        raise ResumeError(f"{path} cannot be resumed ({problem}); pass --overwrite to train the run again, or move "
                          "its folder away")


def restore_problem(checkpoint: dict, config: RunConfig) -> str | None:
    """What of a checkpoint restore could not load into `config`'s run, in words (or an exception), else None: the
    history of the epochs it has trained, the weights, the optimizer's settings and state (tensors of its weights'
    shapes: a fused step on others crashes the process), that the schedule's state is a dict (torch's schedulers load
    any dict without a word), the loss scale, the moving average, the W&B run id and the random generators' states."""
    for key in ("model", "optimizer", "lr_scheduler", "history", "rng"):
        if not isinstance(checkpoint.get(key), dict):  # before indexing it: torch warns on a tensor indexed by text
            return f"its {key} is {type(checkpoint.get(key)).__name__}, not the dict of a state"
    epochs = checkpoint["history"]["epochs"]
    if not (isinstance(epochs, list) and len(epochs) == checkpoint["epoch"]
            and well_formed_history({"epochs": epochs})):
        return f"its history does not hold the {checkpoint['epoch']} epochs it has trained"
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])
    optimizer = build_optimizer(model, config)
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for expected, group in zip(settings, optimizer.param_groups):
        for key, value in expected.items():
            if not same_kind(value, group.get(key)):
                return f"its optimizer's {key} is {group.get(key)!r}"
        for weight in group["params"]:
            for name, value in optimizer.state[weight].items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != weight.shape:
                    return f"its optimizer's {name} has shape {tuple(value.shape)}, its weight {tuple(weight.shape)}"
    if checkpoint.get("grad_scaler"):
        torch.amp.GradScaler("cpu").load_state_dict(checkpoint["grad_scaler"])
    if config.ema:
        AveragedModel(model, use_buffers=True).load_state_dict(checkpoint["ema"])
    if not isinstance(checkpoint.get("wandb_run_id"), (str, type(None))):
        return f"its W&B run id is {checkpoint['wandb_run_id']!r}"
    current = rng_state()
    try:
        set_rng_state(checkpoint["rng"])
        torch.Generator().set_state(checkpoint["rng"]["data"])
    finally:
        set_rng_state(current)
    return None


def same_kind(expected: object, value: object) -> bool:
    """Whether an optimizer setting loaded from a checkpoint is of the kind a fresh optimizer's is: a finite number
    for a number, the same length of such for a tuple, else the same type."""
    if isinstance(expected, (tuple, list)):
        return (isinstance(value, (tuple, list)) and len(value) == len(expected)
                and all(map(same_kind, expected, value)))
    if is_number(expected):
        return is_number(value)
    return type(value) is type(expected)


def check_checkpoint_path(config: RunConfig, files: RunFiles) -> None:
    """A RunConflict when the run's --checkpoint path is where it keeps another file, or holds a file that is not
    this run's checkpoint."""
    if clash := files.checkpoint_clash():
        raise RunConflict(clash)
    if files.checkpoint_elsewhere() and files.checkpoint.exists():
        check_checkpoint_owner(files.checkpoint, config)


def check_checkpoint_owner(path: Path, config: RunConfig) -> None:
    """An existing --checkpoint file is resumed or replaced only when it holds this run's checkpoint; anything else
    (a file of the user's, another run's model) is a RunConflict, whatever --resume or --overwrite say."""
    try:
        saved = saved_config(load_checkpoint(path), path)
    except CheckpointError as e:
        raise RunConflict(f"{e}; it is left as it is: choose another --checkpoint path") from None
    if saved.run_name != config.run_name:
        changed = saved.changed_flag(config)
        raise RunConflict(f"--checkpoint {path} holds the checkpoint of run {saved.run_name}"
                          f"{f' (trained with {changed})' if changed else ''}, not of {config.run_name}; it is left "
                          "as it is: choose another --checkpoint path")


def finished_history(config: RunConfig, files: RunFiles, writes: bool) -> dict | None:
    """The history of a finished run that is exactly what `config` asks for, None for an unfinished one or one
    that may train more epochs; a finished run that cannot continue as `config` is a ResumeError. A missing or
    unreadable config.json is restored from the checkpoint (written when this process `writes`). The checkpoint says
    how far the run has trained: a history of another number of epochs is None too, rebuilt by the resume."""
    history = files.read_history()
    if history is None or "test" not in history:
        return None
    trained = trained_epochs(files)
    if trained is not None and trained != len(history["epochs"]):
        print(f"{files.history}: its {len(history['epochs'])} epochs are not the {trained} that {files.checkpoint} "
              "has trained; it is rebuilt from the checkpoint", flush=True)
        return None
    saved = files.read_config()
    if saved is None:
        saved = restored_config(files, writes)
    epochs = len(history["epochs"])
    check_resumable(saved, epochs, config, files.run_dir)
    return history if epochs == config.num_epochs else None


def trained_epochs(files: RunFiles) -> int | None:
    """How many epochs a run's checkpoint has trained, or None when it has no usable checkpoint."""
    try:
        epochs = load_checkpoint(files.checkpoint).get("epoch")
    except CheckpointError:
        return None
    return epochs if isinstance(epochs, int) else None


def check_model_kept(files: RunFiles) -> None:
    """Say on stderr when the checkpoint of a finished run it skips cannot give back its model: the run's results
    stand (history.json), but nothing can evaluate or explain it until it is trained again."""
    try:
        load_model(files.checkpoint)
    except CheckpointError as e:
        print(f"warning: {files.run_dir.name} has finished but its model is lost ({e}); its results are kept, but "
              "--no-train and cam.py cannot use it until it is trained again (--overwrite)", file=sys.stderr)


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


def replanned(run: PlannedRun, existing: str) -> PlannedRun:
    """A queued run planned again, under its lock, by the --jobs worker that takes it: another process may have
    written its folder since the sweep planned it (and released it to the workers), and the run is then skipped,
    continued or refused as a fresh command with the same flags would decide, never trained over."""
    check_checkpoint_path(run.config, run.files)
    again = plan_run(run.config, run.files, existing, writes=True)
    if again.action != run.action:
        print(f"{run.config.run_name}: written by another process since the sweep planned it; now: "
              f"{ACTIONS[again.action]}", flush=True)
    return again


def run_planned(run: PlannedRun, raw: RawData, runtime: Runtime) -> dict:
    """Train one planned run (removing the old files of one it replaces first); return its history."""
    if run.action == "replace" and runtime.writes:
        run.files.remove()
    return train_run(run.config, raw, run.files, run.action == "resume", runtime)


@dataclass
class SweepResult:
    """The (config, history) of every run that finished or was skipped, (run name, error) of those that failed, and
    how many were handed on to train elsewhere without waiting for them."""
    runs: list[tuple[RunConfig, dict]]
    failures: list[tuple[str, str]]
    handed_on: int = 0  # runs that train where nothing waits for them (--no-wait)


def cost(config: RunConfig) -> int:
    """A run's relative training time, for scheduling the longest first."""
    return config.depth * config.num_epochs


# trains the runs of a plan that are to train (their indices) elsewhere, once it has released their locks: their
# histories and failures by run index, or None when they were handed on and nothing waits for them
Launcher = Callable[[Plan, list[int]], tuple[dict[int, dict], dict[int, str]] | None]


def execute(sweep: Plan, raw: RawData, runtime: Runtime, launcher: Launcher | None = None) -> SweepResult:
    """Say what the plan does with every run, then train the runs it does not skip: in this process one after
    another, in `runtime.jobs` spawned workers (longest first, the data shared with them through shared memory), or
    through `launcher`. A failed run does not stop the others."""
    planned = sweep.runs
    for run in planned:
        print(f"{run.config.run_name}: {ACTIONS[run.action]}", flush=True)
    todo = [i for i, run in enumerate(planned) if run.action != "skip"]
    histories = {i: run.finished for i, run in enumerate(planned) if run.action == "skip"}
    outcome: tuple[dict[int, dict], dict[int, str]] | None = ({}, {})
    if launcher is not None:
        outcome = launcher(sweep, todo) if todo else outcome
    elif runtime.jobs == 1:
        outcome = run_here(planned, todo, raw, runtime)
    elif todo:
        sweep.release()  # each worker locks the run it trains
        outcome = run_in_workers(planned, todo, raw, runtime, sweep.existing)
    trained, failures = outcome or ({}, {})
    histories.update(trained)
    return SweepResult([(planned[i].config, histories[i]) for i in sorted(histories)],
                       [(planned[i].config.run_name, failures[i]) for i in sorted(failures)],
                       0 if outcome else len(todo))


def run_here(planned: list[PlannedRun], todo: list[int], raw: RawData,
             runtime: Runtime) -> tuple[dict[int, dict], dict[int, str]]:
    """Train runs `todo` in this process, one after another; return the histories of those that finished and the
    error line of those that failed, by run index."""
    histories: dict[int, dict] = {}
    failures: dict[int, str] = {}
    for i in todo:
        run = planned[i]
        try:
            histories[i] = run_planned(run, raw, runtime)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or a StdoutGone that says why
            saved = (f"the last finished epoch of {run.config.run_name} is saved in {run.files.checkpoint}"
                     if run.files.checkpoint.is_file() else f"{run.config.run_name} had finished no epoch")
            raise KeyboardInterrupt(f"{f'{e}: ' if str(e) else ''}{saved}; run the same command with --resume to "
                                    "continue") from None
        except Exception as e:  # noqa: BLE001 -- one run's failure is reported; the sweep goes on
            failures[i] = report_failure(run, e, announce=len(planned) > 1)
    return histories, failures


def report_failure(run: PlannedRun, error: Exception, announce: bool = True) -> str:
    """Print a traceback for what is not one of our own errors and, when `announce` (a sweep goes on with other
    runs), one line saying the run failed, on every rank; return that line."""
    if not isinstance(error, (ArithmeticError, ValueError, OSError, CLIError)):
        traceback.print_exception(error)
    line = first_line(error)
    if announce:
        print(f"{run.config.run_name}: failed: {line}", file=sys.stderr, flush=True, force=True)
    return line


def run_in_workers(planned: list[PlannedRun], todo: list[int], raw: RawData, runtime: Runtime,
                   existing: str) -> tuple[dict[int, dict], dict[int, str]]:
    """Train runs `todo` in `runtime.jobs` spawned worker processes, worker w on device w of `runtime.devices`
    (round robin), each run planned again under its lock as `existing` says (replanned); Ctrl-C or SIGTERM stops every
    worker after its last checkpoint. Return the histories of the runs that finished (or were found finished) and the
    error line of those that failed, by run index."""
    context = torch.multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    for i in sorted(todo, key=lambda i: -cost(planned[i].config)):
        tasks.put(i)
    devices = runtime.devices
    runtimes = [replace(runtime, devices=(devices[w % len(devices)],), progress=False)
                for w in range(min(runtime.jobs, len(todo)))]
    workers = [context.Process(target=worker, args=(planned, raw, r, existing, tasks, results), daemon=True)
               for r in runtimes]
    histories: dict[int, dict] = {}
    failures: dict[int, str] = {}
    bar = tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True)
    try:
        start_quietly(workers, tasks)
        while len(histories) + len(failures) < len(todo):
            try:
                i, history, error = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in workers):
                    failures.update(dict.fromkeys(set(todo) - histories.keys() - failures.keys(),
                                                  "its worker process died"))
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
            if process.pid is not None:
                process.join(timeout=60)
        raise KeyboardInterrupt("every run keeps its last finished epoch; run the same command with --resume to "
                                "continue") from None
    finally:
        bar.close()
    for process in workers:
        process.join()
    return histories, failures


def start_quietly(workers: list, tasks) -> None:
    """Start the worker processes with Ctrl-C blocked in them: one that arrives while a worker still imports torch
    waits until worker() can stop cleanly, instead of printing the import's traceback. Here it is held back until
    every worker has started (a start cut short leaves a worker without its instructions)."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # what the workers inherit
    try:
        for process in workers:
            tasks.put(None)
            process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def stop_once(signum: int, frame) -> None:
    """A worker's handler of Ctrl-C and SIGTERM: stop, and ignore those that follow. A terminal's Ctrl-C reaches
    the worker and the sweep's main process, which then sends one of its own; the second, landing while the worker
    exits, would print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


PR_SET_PDEATHSIG = 1  # prctl's option: the signal the kernel sends a process when its parent dies (linux/prctl.h)


def stop_with_parent() -> None:
    """Have the kernel send this worker SIGTERM when the sweep's main process dies, however it dies (Linux): it stops
    as on Ctrl-C, keeping its last finished epoch, instead of training the rest of the queue with nobody to draw the
    figures, and the same command with --resume then continues every run. KeyboardInterrupt when it died already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != multiprocessing.parent_process().pid:
        raise KeyboardInterrupt


def worker(planned: list[PlannedRun], raw: RawData, runtime: Runtime, existing: str, tasks, results) -> None:
    """A worker process on runtime.devices[0]: take run indices from `tasks` until None, plan each again and train
    it under its run folder's lock, and put (index, history, error line)."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, stop_once)
    try:
        stop_with_parent()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by start_quietly
        setup_for_distributed(True)
        torch.set_num_threads(runtime.threads)
        while (i := tasks.get()) is not None:
            try:
                results.put((i, train_locked(planned[i], raw, runtime, existing), None))
            except Exception as e:  # noqa: BLE001 -- reported to the sweep, which goes on
                results.put((i, None, report_failure(planned[i], e)))
    except KeyboardInterrupt:
        pass


def train_locked(run: PlannedRun, raw: RawData, runtime: Runtime, existing: str) -> dict:
    """What a worker process (or a cluster job) does with one run: under its run folder's lock, plan it again as
    `existing` says (replanned), then train it on runtime.devices[0], or take its history when it is now finished;
    return its history."""
    run = replace(run, config=replace(run.config, device=runtime.devices[0]))
    with run.files.lock():
        run = replanned(run, existing)
        return run.finished if run.action == "skip" else run_planned(run, raw, runtime)
