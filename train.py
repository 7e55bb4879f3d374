"""One training run: its setup, the epoch loop, evaluation, checkpoints and resume, and the files it writes."""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import RunConfig
from data import DATASETS, RawData, Split, augment, batch_indices, make_splits, num_batches
from models import build_model
from tracking import TrackingOptions, start_trackers
from utils import first_line, load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state, write_json

FINITE_CHECK_EVERY = 10  # steps between checks that the loss is finite (each check waits for the device)
DEFAULT_THREADS = torch.get_num_threads()


class NonFiniteLoss(ArithmeticError):
    """The training or validation loss became NaN or infinite."""


class ResumeError(ValueError):
    """A checkpoint cannot continue the run asked for."""


def logged_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight tensors whose gradient norms are logged: every parameter with more than one dimension."""
    return {name: p for name, p in model.named_parameters() if p.ndim > 1}


def cpu_threads(config: RunConfig, jobs: int = 1) -> int:
    """Torch CPU threads for a run: --threads, or 1 for the MLP and, for CNNs, every core shared among `jobs`
    worker processes.

    The MLP's 16-wide matmuls are too small to split; a second thread only adds synchronisation, and when another
    process holds the other core it spin-waits for it (measured: 8 ms a step on 1 thread, 55 ms on 2).
    """
    if config.threads:
        return config.threads
    return 1 if config.model_name == "MLP" else max(1, DEFAULT_THREADS // jobs)


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # float32: no autocast


def amp_precision(device: torch.device) -> str:
    """What --amp trains in on `device`, as torch reports the hardware: bfloat16 on CUDA devices of compute capability
    8.0+ and on CPUs with AVX512-BF16 or AMX; float16 (with a GradScaler) on older CUDA GPUs; float32 on other CPUs,
    which have no bfloat16 arithmetic and would only convert back and forth."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
    return "bfloat16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "float32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast to `precision` ("bfloat16" or "float16") on `device`; off for "float32"."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES)


def use_cudnn_benchmark(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest (a run's batches
    share one shape), unless deterministic algorithms are asked for: the timing may choose differently in another
    process."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()


def uses_channels_last(config: RunConfig) -> bool:
    """Whether a run keeps images and weights channels_last (faster convolutions): CNNs, except on the CPU below
    16 channels, where oneDNN's weight gradient of the channels_last 1x1 stride-2 shortcut convolution hangs or
    is wrong (uxlfoundation/oneDNN#6035)."""
    return config.model_name == "ResNet" and (config.device.startswith("cuda") or config.out_channels >= 16)


def build_run_model(config: RunConfig) -> nn.Module:
    """The seeded, freshly initialised model of a run, on its device and in its memory format."""
    seed_everything(config.seed)
    memory_format = torch.channels_last if uses_channels_last(config) else torch.preserve_format
    return build_model(config).to(config.device, memory_format=memory_format)


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """Adam or SGD as one fused kernel per step; weight decay on conv and linear weights only (not on biases or
    batch-norm parameters, as timm's param_groups_weight_decay does)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, fused=True)
    return torch.optim.Adam(groups, lr=config.lr, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped after every batch: a linear warm-up of `warmup_epochs`, then constant,
    cosine to zero, or divided by 10 at 50% and 75% of training; `onecycle` is OneCycleLR rising for
    `warmup_epochs` from lr/25 and annealing to lr/25e4."""
    from torch.optim import lr_scheduler
    total = config.num_epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.lr_schedule == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                       pct_start=max(warmup, 1) / total, cycle_momentum=False)
    if config.lr_schedule == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif config.lr_schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    elif config.lr_schedule == "step":
        main = lr_scheduler.MultiStepLR(optimizer, [total // 2 - warmup, total * 3 // 4 - warmup], gamma=0.1)
    else:
        raise ValueError(f"unknown learning-rate schedule {config.lr_schedule!r}")
    if warmup == 0:
        return main
    rise = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [rise, main], milestones=[warmup])


@dataclass
class RunSetup:
    """Everything one run trains with: its splits on the device, a fresh model, loss, optimizer and schedule,
    the data-order generator and the batch augmentation (or None). Under torchrun, `net` is the model wrapped in
    DistributedDataParallel and this process trains on its `rank`'s share of every batch."""
    config: RunConfig
    train: Split
    val: Split
    test: Split
    model: nn.Module
    net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    augment_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    rank: int = 0
    world_size: int = 1
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))


def prepare_run(config: RunConfig, raw: RawData, rank: int = 0, world_size: int = 1) -> RunSetup:
    """Set up a run from its config: splits, model, loss, optimizer, schedule, data order and augmentation;
    with `world_size` > 1 (torchrun) the model is wrapped in DistributedDataParallel."""
    info = DATASETS[config.dataset]
    use_cudnn_benchmark(torch.device(config.device))  # here, so that --jobs workers and torchrun ranks set it too
    train, val, test = make_splits(raw, info, config.val_size, config.seed, config.limit_train, config.device,
                                   uses_channels_last(config))
    model = build_run_model(config)
    net = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        if config.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device = torch.device(config.device)
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, num_batches(len(train), config.batch_size))
    return RunSetup(config, train, val, test, model, net,
                    nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), optimizer, scheduler,
                    torch.Generator().manual_seed(config.seed),
                    partial(augment, info=info) if config.augment else None, rank, world_size,
                    torch.amp.GradScaler(torch.device(config.device).type, enabled=config.precision == "float16"))


@dataclass
class EpochResult:
    """What one epoch of training produced: mean loss over samples and the logged gradient norms."""
    loss: float
    steps: int
    grad_norms: torch.Tensor  # (logged steps, logged weights), on the CPU
    grad_steps: list[int]


def train_one_epoch(run: RunSetup, epoch: int, start_step: int, progress: bool = False) -> EpochResult:
    """Train for one epoch over seeded shuffled batches, stepping the schedule every batch; log each weight's
    gradient L2 norm every `grad_log_every` steps with one fused call, kept on the device until the epoch ends.
    The loss is checked every FINITE_CHECK_EVERY steps: a NaN stops training within that many steps.

    Under torchrun every rank draws the same global batch (same generator, same augmentation) and trains on every
    world_size-th image of it, its loss weighted so that DDP's gradient average is the global batch's gradient."""
    model, optimizer, config = run.model, run.optimizer, run.config
    run.net.train()
    device = run.train.images.device
    batches = batch_indices(len(run.train), config.batch_size, run.generator)
    weights = list(logged_weights(model).values())
    every = config.grad_log_every
    grad_steps = [s for s in range(start_step, start_step + len(batches)) if every > 0 and s % every == 0]
    grad_norms = torch.zeros(len(grad_steps), len(weights), device=device)
    losses = torch.zeros(len(batches), device=device)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float32)
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    row = 0
    for i, index in enumerate(bar):
        index = index.to(device, non_blocking=True)
        # indexing keeps the split's channels_last layout (index_select would return a contiguous NCHW batch)
        images, labels = run.train.images[index], run.train.labels.index_select(0, index)
        if run.augment_fn is not None:
            images = run.augment_fn(images, run.generator)
        if run.world_size > 1:
            images, labels = images[run.rank::run.world_size], labels[run.rank::run.world_size]
        with autocast(device, config.precision):
            loss = run.criterion(run.net(images), labels)
        if run.world_size > 1:
            loss = loss * (len(labels) * run.world_size / len(index))
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()  # the scaler does nothing unless float16
        if row < len(grad_steps) and grad_steps[row] == start_step + i:
            run.scaler.unscale_(optimizer)  # the norms of the true gradients
            grad_norms[row] = torch.stack(torch._foreach_norm([w.grad for w in weights]))
            row += 1
        run.scaler.step(optimizer)
        run.scaler.update()
        run.scheduler.step()
        losses[i] = loss.detach()
        if (i + 1) % FINITE_CHECK_EVERY == 0 or i + 1 == len(batches):
            first = i - i % FINITE_CHECK_EVERY
            check_finite(losses[first:i + 1], f"training loss at epoch {epoch}", start_step + first)
        if progress and i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    if run.world_size > 1:
        torch.distributed.all_reduce(losses)
        losses /= run.world_size
    losses = losses.cpu()
    mean_loss = (losses * sizes).sum().item() / sizes.sum().item()
    return EpochResult(mean_loss, len(batches), grad_norms.cpu(), grad_steps)


def check_finite(losses: torch.Tensor, what: str, first_step: int) -> None:
    """Raise NonFiniteLoss naming the first step (counted from `first_step`) whose loss is NaN or infinite."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = first_step + bad[0, 0].item()
        raise NonFiniteLoss(f"the {what} became {losses[bad[0, 0]].item()} at step {step}")


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000,
             precision: str = "float32") -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy over every image of a split, the model autocast to `precision`."""
    model.eval()
    device = split.images.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(split), batch_size):
        images, labels = split.images[start:start + batch_size], split.labels[start:start + batch_size]
        with autocast(device, precision):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    return total_loss.item() / len(split), correct.item() / len(split)


class RunFiles:
    """A run folder's files: config.json, history.json (one entry per epoch and the test result), grad_norms.csv
    (one row per logged step, appended every epoch) and the checkpoint, which may live elsewhere."""

    def __init__(self, run_dir: Path, checkpoint: Path | None = None):
        self.run_dir = run_dir
        self.config = run_dir / "config.json"
        self.history = run_dir / "history.json"
        self.grad_norms = run_dir / "grad_norms.csv"
        self.checkpoint = checkpoint or run_dir / "checkpoint.pt"
        self.tracking = [run_dir / "tensorboard", run_dir / "wandb"]  # what --tensorboard and --wandb write

    def ours(self) -> list[Path]:
        """The files a run writes, the one that marks it finished first."""
        return [self.history, self.checkpoint, self.grad_norms, self.config]

    def exist(self) -> bool:
        return any(p.exists() for p in self.ours())

    def remove(self) -> None:
        """Delete the run's files (history first, so that no half-removed run reads as finished) and its tracking
        folders, and nothing else."""
        for path in self.ours():
            path.unlink(missing_ok=True)
        for folder in self.tracking:
            shutil.rmtree(folder, ignore_errors=True)

    def read_config(self) -> RunConfig | None:
        """The config.json of the run, or None when there is none or it is not readable."""
        try:
            return RunConfig.from_dict(json.loads(self.config.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def read_history(self) -> dict | None:
        """history.json, or None when there is none or it is not readable."""
        try:
            history = json.loads(self.history.read_text())
        except (OSError, ValueError):
            return None
        return history if isinstance(history, dict) and isinstance(history.get("epochs"), list) else None

    def start_grad_norms(self, names: list[str]) -> None:
        """A new grad_norms.csv holding only its header: step, then one column per logged weight."""
        self.grad_norms.parent.mkdir(parents=True, exist_ok=True)
        self.grad_norms.write_text(",".join(["step", *names]) + "\n")

    def append_grad_norms(self, steps: list[int], norms: torch.Tensor) -> None:
        """Append one epoch's logged steps (constant cost however long the run has been)."""
        rows = np.column_stack([np.asarray(steps, dtype=np.float64), norms.double().numpy()])
        with self.grad_norms.open("a") as f:
            np.savetxt(f, rows, fmt=["%d"] + ["%.9g"] * norms.shape[1], delimiter=",")

    def truncate_grad_norms(self, steps_done: int) -> None:
        """Keep only the rows of steps before `steps_done` (those a resumed checkpoint had trained)."""
        lines = self.grad_norms.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < steps_done]
        if len(kept) != len(lines):
            self.grad_norms.write_text("".join(kept))

    def read_grad_norms(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """The logged steps and, per weight, its gradient norm at each of them."""
        header, *lines = self.grad_norms.read_text().splitlines()
        names = header.split(",")[1:]
        rows = np.loadtxt(lines, delimiter=",", ndmin=2).reshape(-1, len(names) + 1) if lines else np.zeros(
            (0, len(names) + 1))
        return rows[:, 0].astype(int).tolist(), {name: rows[:, i + 1] for i, name in enumerate(names)}


def train_run(config: RunConfig, raw: RawData, files: RunFiles, resume: bool, progress: bool | None = None,
              rank: int = 0, world_size: int = 1, tracking: TrackingOptions = TrackingOptions()) -> dict:
    """Train one run, checkpointing every epoch (continuing its checkpoint when `resume`) and logging each
    checkpointed epoch to the trackers of `tracking`; return its history with the test result. Under torchrun every
    rank trains and only rank 0 writes and tracks."""
    run = prepare_run(config, raw, rank, world_size)
    names = list(logged_weights(run.model))
    writes = rank == 0
    history: dict = {"epochs": []}
    wandb_run_id = None
    if resume and files.checkpoint.is_file():
        history, wandb_run_id = restore(run, files.checkpoint)
        if writes:
            files.truncate_grad_norms(history["epochs"][-1]["steps"] if history["epochs"] else 0)
    elif writes:
        files.start_grad_norms(names)
    begins = f"resuming after epoch {len(history['epochs'])}" if history["epochs"] else "starting"
    print(f"{config.run_name}: {begins} on {config.device} in {config.precision}", flush=True)
    if writes:
        write_json(files.config, config.to_dict())
    trackers = start_trackers(tracking if writes else TrackingOptions(), config.run_name, files.run_dir,
                              config.to_dict(), run_id=wandb_run_id)
    wandb_run_id = trackers.run_id or wandb_run_id
    progress = sys.stderr.isatty() and writes if progress is None else progress
    try:
        for epoch in range(len(history["epochs"]) + 1, config.num_epochs + 1):
            result = train_epoch(run, epoch, history, files, progress)
            if writes:
                # grad norms first, then the checkpoint: a resume drops rows the checkpoint has not trained
                files.append_grad_norms(result.grad_steps, result.grad_norms)
                save_checkpoint(files.checkpoint, {
                    "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "lr_scheduler": run.scheduler.state_dict(), "grad_scaler": run.scaler.state_dict(),
                    "epoch": epoch, "config": config.to_dict(),
                    "history": history, "rng": dict(rng_state(), data=run.generator.get_state()),
                    "wandb_run_id": wandb_run_id})
                write_json(files.history, history)
            # after the checkpoint: what a resumed run trains again was never logged, so no step is logged twice
            trackers.log_epoch(history["epochs"][-1], result.grad_steps, result.grad_norms, names)
        test_loss, test_acc = evaluate(run.model, run.test, precision=config.precision)
        history["test"] = {"loss": test_loss, "acc": test_acc}
        if writes:
            write_json(files.history, history)
        trackers.log_summary({"test_loss": test_loss, "test_acc": test_acc}, len(history["epochs"]))
    except BaseException:
        trackers.finish(False)
        raise
    trackers.finish(True)
    print(f"{config.run_name}: test loss {test_loss:.4f}, test acc {test_acc:.2%}", flush=True)
    return history


def train_epoch(run: RunSetup, epoch: int, history: dict, files: RunFiles, progress: bool) -> EpochResult:
    """Train and validate one epoch, append its record to `history` and print it; a NaN or infinite loss says
    which epoch the checkpoint keeps."""
    config = run.config
    start = time.perf_counter()
    steps_done = history["epochs"][-1]["steps"] if history["epochs"] else 0
    lr = run.optimizer.param_groups[0]["lr"]
    try:
        result = train_one_epoch(run, epoch, steps_done, progress)
        val_loss, val_acc = evaluate(run.model, run.val, precision=config.precision)
        check_finite(torch.tensor([val_loss]), f"validation loss after epoch {epoch}", steps_done + result.steps)
    except NonFiniteLoss as e:
        kept = f"{files.checkpoint} keeps epoch {epoch - 1}" if epoch > 1 else "no epoch had finished"
        raise NonFiniteLoss(f"{e}; {kept}; lower --lr") from None
    seconds = time.perf_counter() - start
    history["epochs"].append({"epoch": epoch, "train_loss": result.loss, "val_loss": val_loss, "val_acc": val_acc,
                              "lr": lr, "seconds": seconds, "steps": steps_done + result.steps})
    print(f"{config.run_name} epoch {epoch}/{config.num_epochs}: train loss {result.loss:.4f}, "
          f"val loss {val_loss:.4f}, val acc {val_acc:.2%}, {seconds:.1f} s", flush=True)
    return result


def check_resumable(checkpoint: dict, config: RunConfig, path: Path) -> None:
    """A checkpoint continues a run only with the settings it was trained with, up to `config.num_epochs`;
    otherwise ResumeError."""
    try:
        saved = RunConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as e:
        raise ResumeError(f"{path}: {first_line(e)}; pass --overwrite to start again") from None
    changed = saved.changed_flag(config)
    if changed:
        raise ResumeError(f"{path} was trained with {changed}; resume with the same flags, or pass --overwrite to "
                          "start again")
    if checkpoint.get("epoch", 0) > config.num_epochs:
        raise ResumeError(f"{path} has trained {checkpoint['epoch']} epochs, more than --num_epochs "
                          f"{config.num_epochs}; pass --overwrite to start again")


def restore(run: RunSetup, path: Path) -> tuple[dict, str | None]:
    """Load a checkpoint of the same run into `run` (model, optimizer, schedule, random states); return the
    history of the epochs it holds and its W&B run id (None when it was not tracked in W&B)."""
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint, run.config, path)
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if checkpoint.get("grad_scaler"):  # a float16 run's loss scale; empty or absent otherwise
            run.scaler.load_state_dict(checkpoint["grad_scaler"])
        set_rng_state(checkpoint["rng"])
        run.generator.set_state(checkpoint["rng"]["data"])
        history = {"epochs": list(checkpoint["history"]["epochs"])}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ResumeError(f"{path} cannot be resumed ({first_line(e)}); use --overwrite to start again") from None
    return history, checkpoint.get("wandb_run_id")
