"""Experiment tracking besides a run's own files: Weights & Biases and TensorBoard, each imported only when asked for.

A tracker that fails to start or to log is dropped with one warning line; training never stops for it.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from utils import first_line

DEFAULT_PROJECT = "depth-residual-convolutions"
# from each epoch record that has them (test_: --val_size 0 scores every epoch on the test set), against "epoch"
EPOCH_SCALARS = ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "lr")
GRAD_NORM = "grad_norm/"  # prefix of each logged weight's gradient norm, plotted against the training step
STEP = "train/step"  # W&B's x-axis of the gradient norms (TensorBoard uses its own global step)


@dataclass(frozen=True)
class TrackingOptions:
    """Where runs are tracked besides their run folders. Not part of RunConfig: a tracked run computes the same."""
    wandb: str = "disabled"  # disabled, offline or online
    project: str = DEFAULT_PROJECT
    tensorboard: bool = False
    group: str | None = None  # the sweep (its --out_dir's name): W&B groups its runs by it


@dataclass(frozen=True)
class TrackedRun:
    """A run as its trackers see it: its name, the folder of its files, its config, W&B's job type ("train" or a
    sweep's "summary" of figures) and the id that continues an earlier tracked run."""
    name: str
    folder: Path
    config: dict | None = None
    job_type: str = "train"
    run_id: str | None = None


class Tracker(Protocol):
    """One experiment tracker of one run (a training run, or a sweep's summary of figures)."""
    title: str
    run_id: str | None  # what resumes the same tracked run (W&B's run id), kept in the checkpoint

    def start(self, run: TrackedRun) -> None:
        """Begin tracking `run`."""

    def log_epoch(self, record: dict, grad_steps: list[int], grad_norms: torch.Tensor, names: list[str]) -> None:
        """One finished epoch: its record's scalars and each weight's gradient norm at each logged step."""

    def log_summary(self, values: dict[str, float], epoch: int) -> None:
        """The run's final results (the test loss and accuracy), after `epoch` epochs."""

    def log_images(self, paths: list[Path]) -> None:
        """Figures (PNG files), named after their file names."""

    def finish(self, success: bool) -> None:
        """End the tracked run, marked failed unless `success`."""


class WandbTracker:
    """A Weights & Biases run with its offline files (or its local copy) under `<folder>/wandb`."""
    title = "W&B"

    def __init__(self, mode: str, project: str, group: str | None):
        self.mode, self.project, self.group = mode, project, group
        self.run = None
        self.run_id: str | None = None

    def start(self, run: TrackedRun) -> None:
        import wandb
        folder = run.folder
        folder.mkdir(parents=True, exist_ok=True)  # W&B falls back to a temporary folder when `dir` is missing
        # silent: W&B's own banners from every run of a sweep would bury the epoch lines; we print one line instead.
        # allow_val_change: a resumed run may have a larger --num_epochs or another --device
        self.run = wandb.init(mode=self.mode, project=self.project, group=self.group, job_type=run.job_type,
                              name=run.name, dir=folder, config=run.config, id=run.run_id,
                              resume="allow" if run.run_id else None,
                              allow_val_change=True, settings=wandb.Settings(silent=True))
        self.run_id = self.run.id
        # two x-axes: W&B's own step only counts log calls, so epochs and training steps each get their own
        self.run.define_metric("epoch")
        self.run.define_metric(STEP)
        for key in EPOCH_SCALARS:
            self.run.define_metric(key, step_metric="epoch")
        self.run.define_metric(GRAD_NORM + "*", step_metric=STEP)
        where = self.run.url if self.mode == "online" else f"{folder / 'wandb'}, to upload with wandb sync"
        print(f"{run.name}: W&B {self.mode} run {self.run_id} ({where})", flush=True)

    def log_epoch(self, record: dict, grad_steps: list[int], grad_norms: torch.Tensor, names: list[str]) -> None:
        # W&B has no call that logs several steps: one call per logged step carries every weight's norm
        keys = [GRAD_NORM + name for name in names]
        for step, row in zip(grad_steps, grad_norms.tolist()):
            self.run.log({STEP: step, **dict(zip(keys, row))})
        self.run.log({"epoch": record["epoch"], **epoch_scalars(record)})

    def log_summary(self, values: dict[str, float], epoch: int) -> None:
        self.run.summary.update(values)

    def log_images(self, paths: list[Path]) -> None:
        import wandb
        self.run.log({f"figures/{path.stem}": wandb.Image(str(path)) for path in paths})

    def finish(self, success: bool) -> None:
        self.run.finish(exit_code=0 if success else 1)


def epoch_scalars(record: dict) -> dict[str, float]:
    """The EPOCH_SCALARS an epoch record holds."""
    return {key: record[key] for key in EPOCH_SCALARS if key in record}


class TensorBoardTracker:
    """TensorBoard event files in `<folder>/tensorboard`: epoch scalars at step = epoch, gradient norms at step =
    training step, so `tensorboard --logdir <out_dir>` shows a sweep's runs side by side."""
    title = "TensorBoard"
    run_id = None

    def __init__(self):
        self.writer = None

    def start(self, run: TrackedRun) -> None:
        from torch.utils.tensorboard import SummaryWriter
        # a summary's figures replace those of an earlier sweep command (purge_step 0); a training run needs no
        # purge: it logs an epoch only after that epoch's checkpoint, so a resumed run never logs a step twice
        purge_step = 0 if run.job_type == "summary" else None
        self.writer = SummaryWriter(log_dir=str(run.folder / "tensorboard"), purge_step=purge_step)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars at one global step in one event (add_scalar writes one event per value: 8x slower for a
        40-weight MLP, where it would add 40% to an epoch)."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        self.writer.file_writer.add_summary(Summary(value=values), step)

    def log_epoch(self, record: dict, grad_steps: list[int], grad_norms: torch.Tensor, names: list[str]) -> None:
        tags = [GRAD_NORM + name for name in names]
        for step, row in zip(grad_steps, grad_norms.tolist()):
            self.write_scalars(step, dict(zip(tags, row)))
        self.write_scalars(record["epoch"], epoch_scalars(record))

    def log_summary(self, values: dict[str, float], epoch: int) -> None:
        self.write_scalars(epoch, values)

    def log_images(self, paths: list[Path]) -> None:
        import numpy as np
        from PIL import Image
        for path in paths:
            with Image.open(path) as image:
                self.writer.add_image(f"figures/{path.stem}", np.asarray(image.convert("RGB")), 0, dataformats="HWC")

    def finish(self, success: bool) -> None:
        self.writer.close()


class Trackers:
    """The trackers of one run, called together; one that raises is dropped with a warning line."""

    def __init__(self, trackers: list[Tracker], name: str):
        self.active, self.name = list(trackers), name

    @property
    def run_id(self) -> str | None:
        """The W&B run id, for the checkpoint (None when W&B is off or failed)."""
        return next((t.run_id for t in self.active if t.run_id is not None), None)

    def call(self, method: str, *args) -> None:
        """Call `method` on every active tracker; one that raises is warned about, closed and dropped."""
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 -- tracking must never stop training
                self.active.remove(tracker)
                print(f"warning: {self.name}: {tracker.title} tracking stopped, the run goes on without it "
                      f"({method}: {first_line(e)})", file=sys.stderr, flush=True)
                if method != "finish":
                    with contextlib.suppress(Exception):  # already reported; a half-started tracker may not close
                        tracker.finish(False)

    def log_epoch(self, record: dict, grad_steps: list[int], grad_norms: torch.Tensor, names: list[str]) -> None:
        self.call("log_epoch", record, grad_steps, grad_norms, names)

    def log_summary(self, values: dict[str, float], epoch: int) -> None:
        self.call("log_summary", values, epoch)

    def log_images(self, paths: list[Path]) -> None:
        self.call("log_images", paths)

    def finish(self, success: bool) -> None:
        self.call("finish", success)
        self.active = []


def checked_online(options: TrackingOptions) -> TrackingOptions:
    """`options`, with --wandb online checked once for the whole command rather than by each run's wandb.init (which
    waits 90 s for a server it cannot reach, then goes on untracked): without credentials the server accepts (none,
    rejected, or no answer within WANDB_HTTP_TIMEOUT, 10 s), one warning and W&B offline instead, whose runs `wandb
    sync` uploads later. On a terminal, W&B asks for a key it lacks, once, as wandb.init would for every run."""
    if options.wandb != "online":
        return options
    try:
        import wandb
    except ImportError:
        return options  # each run's tracker says so
    try:
        if wandb.login(verify=True, prompt=sys.stdin is not None and sys.stdin.isatty()):
            return options
        reason = "no W&B API key (run wandb login, or set WANDB_API_KEY)"
    except Exception as e:  # noqa: BLE001 -- tracking must never stop training
        reason = first_line(e)
    print(f"warning: --wandb online: {reason}; the runs are tracked offline instead", file=sys.stderr, flush=True)
    return replace(options, wandb="offline")


def start_trackers(options: TrackingOptions, run: TrackedRun) -> Trackers:
    """The trackers `options` asks for, started for `run` (none, and nothing imported, when all are off)."""
    trackers: list[Tracker] = []
    if options.wandb != "disabled":
        trackers.append(WandbTracker(options.wandb, options.project, options.group))
    if options.tensorboard:
        trackers.append(TensorBoardTracker())
    started = Trackers(trackers, run.name)
    started.call("start", run)
    return started


def log_sweep_figures(options: TrackingOptions, folder: Path, paths: list[Path]) -> None:
    """The sweep's comparison figures, as a short run of their own (W&B job type "summary", in the sweep's group;
    TensorBoard's Images tab) tracked in `folder`, the plots folder. The W&B run's id is the folder's, so that a
    later command (a resumed sweep) continues it with its figures instead of leaving a stale summary beside them."""
    run_id = "summary-" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    trackers = start_trackers(options, TrackedRun(f"{options.group}_summary", folder, job_type="summary",
                                                  run_id=run_id))
    trackers.log_images(paths)
    trackers.finish(True)
