"""One training run: its setup, the epoch loop, evaluation, checkpoints and resume, and the files it writes."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from config import RunConfig
from data import DATASETS, RawData, Shard, Split, TrainLoader, make_splits
from models import build_model
from runs import HELD_OUT, RunFiles, build_checkpoint, held_out_key, restore, save_checkpoint
from tracking import TrackedRun, TrackingOptions, start_trackers
from utils import machine_description, seed_everything

LOSS_CHECK_EVERY = 10  # steps between checks that the loss has not diverged (each check waits for the device)
# a cross-entropy loss above this has diverged (chance is ln 10 = 2.3): the weights have overflowed, or soon will
LOSS_LIMIT = 1e6
DEFAULT_THREADS = torch.get_num_threads()


class DivergedLoss(ArithmeticError):
    """The training or validation loss became NaN, infinite or larger than LOSS_LIMIT."""


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
    cosine to zero, or divided by 10 at 50% and 75% of training; `onecycle` is OneCycleLR rising along a cosine for
    `warmup_epochs` (at least 2 steps) from lr/25 and annealing to lr/25e4."""
    from torch.optim import lr_scheduler
    config.check_schedule_length(steps_per_epoch)  # a copy of the data may hold fewer images than the config
    total = config.num_epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.lr_schedule == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                       pct_start=max(warmup, 2) / total, cycle_momentum=False)
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
    """Everything one run trains with: its training data in its seeded order (this process's share of every batch
    under torchrun), validation and test splits on the device, a fresh model, loss, optimizer and schedule. Under
    torchrun, `net` is the model wrapped in DistributedDataParallel."""
    config: RunConfig
    train: TrainLoader
    val: Split
    test: Split
    model: nn.Module
    net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    ema: AveragedModel | None = None  # --ema: the moving average of the weights and batch-norm statistics

    @property
    def scored_model(self) -> nn.Module:
        """The weights that validation, the test and the saved model's users score: the average with --ema."""
        return self.model if self.ema is None else self.ema.module


def prepare_run(config: RunConfig, raw: RawData, rank: int = 0, world_size: int = 1) -> RunSetup:
    """Set up a run from its config: data order and augmentation, splits, model, loss, optimizer, schedule;
    with `world_size` > 1 (torchrun) the model is wrapped in DistributedDataParallel."""
    info = DATASETS[config.dataset]
    use_cudnn_benchmark(torch.device(config.device))  # here, so that --jobs workers and torchrun ranks set it too
    train, val, test = (split.normalized(info, config.device, uses_channels_last(config))
                        for split in make_splits(raw, config.val_size, config.seed, config.limit_train))
    model = build_run_model(config)
    net = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        if config.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device = torch.device(config.device)
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    loader = TrainLoader(train, config.batch_size, config.seed, info if config.augment else None,
                         Shard(rank, world_size))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(loader))
    scaler = torch.amp.GradScaler(torch.device(config.device).type, enabled=config.precision == "float16")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    return RunSetup(config, loader, val, test, model, net,
                    nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), optimizer, scheduler, scaler, ema)


@dataclass(frozen=True)
class Runtime:
    """How runs are executed, whatever they compute: this process's torchrun rank and world size, the sweep's
    --jobs worker processes and the devices they take in turn, CPU threads per process, the trackers, and the
    progress bar (None: shown when stderr is a terminal, on rank 0)."""
    rank: int = 0
    world_size: int = 1
    jobs: int = 1
    devices: tuple[str, ...] = ("cpu",)
    threads: int = 1
    tracking: TrackingOptions = TrackingOptions()
    progress: bool | None = None

    @property
    def writes(self) -> bool:
        """Whether this process writes the run folder and tracks: rank 0 (torchvision's save_on_master)."""
        return self.rank == 0


@dataclass
class EpochResult:
    """What one epoch of training produced: mean loss over samples and the logged gradient norms."""
    loss: float
    steps: int
    grad_norms: torch.Tensor  # (logged steps, logged weights), on the CPU
    grad_steps: list[int]


def train_one_epoch(run: RunSetup, epoch: int, start_step: int, progress: bool = False) -> EpochResult:
    """Train for one epoch of the run's loader, stepping the schedule every batch; log each weight's gradient L2 norm
    every `grad_log_every` steps with one fused call, kept on the device until the epoch ends. The loss is checked
    every LOSS_CHECK_EVERY steps: a diverged loss (check_loss) stops training within that many steps.

    Under torchrun each rank trains on its share of the global batch, its loss weighted so that DDP's gradient
    average is the global batch's gradient."""
    model, optimizer, config = run.model, run.optimizer, run.config
    run.net.train()
    device = run.train.images.device
    steps, batch_sizes, world_size = len(run.train), run.train.batch_sizes(), run.train.shard.world_size
    weights = list(logged_weights(model).values())
    every = config.grad_log_every
    grad_steps = [s for s in range(start_step, start_step + steps) if every > 0 and s % every == 0]
    grad_norms = torch.zeros(len(grad_steps), len(weights), device=device)
    losses = torch.zeros(steps, device=device)
    sizes = torch.tensor(batch_sizes, dtype=torch.float32)
    bar = tqdm(run.train, total=steps, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    row = 0
    for i, (images, labels) in enumerate(bar):
        with autocast(device, config.precision):
            loss = run.criterion(run.net(images), labels)
        if world_size > 1:
            loss = loss * (len(labels) * world_size / batch_sizes[i])
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()  # the scaler does nothing unless float16
        if row < len(grad_steps) and grad_steps[row] == start_step + i:
            run.scaler.unscale_(optimizer)  # the norms of the true gradients
            grad_norms[row] = torch.stack(torch._foreach_norm([w.grad for w in weights]))
            row += 1
        run.scaler.step(optimizer)
        run.scaler.update()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(model)
        losses[i] = loss.detach()
        if (i + 1) % LOSS_CHECK_EVERY == 0 or i + 1 == steps:
            first = i - i % LOSS_CHECK_EVERY
            check_loss(losses[first:i + 1], f"training loss at epoch {epoch}", start_step + first)
        if progress and i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    if world_size > 1:
        torch.distributed.all_reduce(losses)
        losses /= world_size
    losses = losses.cpu()
    mean_loss = (losses * sizes).sum().item() / sizes.sum().item()
    return EpochResult(mean_loss, steps, grad_norms.cpu(), grad_steps)


def check_loss(losses: torch.Tensor, what: str, first_step: int) -> None:
    """Raise DivergedLoss naming the first step (counted from `first_step`) whose loss is NaN, infinite or above
    LOSS_LIMIT."""
    bad = (~(losses <= LOSS_LIMIT)).nonzero()  # NaN is not <= anything
    if len(bad):
        value = losses[bad[0, 0]].item()
        beyond = f" (above {LOSS_LIMIT:g}: it has diverged)" if math.isfinite(value) else ""
        raise DivergedLoss(f"the {what} became {value:g}{beyond} at step {first_step + bad[0, 0].item()}")


def divergence_advice(config: RunConfig) -> str:
    """What to change in a run whose loss diverged: a setting beyond any stable value, else the learning rate."""
    if config.optimizer == "sgd" and config.momentum >= 1:
        return f"lower --momentum below 1 (at {config.momentum:g} every step adds more than the one before)"
    if config.lr * config.weight_decay >= 1:
        return (f"lower --weight_decay (--lr x --weight_decay is {config.lr * config.weight_decay:g}; it must be far "
                "below 1)")
    return f"lower --lr (it is {config.lr:g})"


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000, precision: str = "float32",
             tta: str = "none") -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy over every image of a split, the model autocast to `precision`; with
    `tta` "flip", each image's prediction is the mean of its and its mirror image's softmax."""
    model.eval()
    device = split.images.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(split), batch_size):
        images, labels = split.images[start:start + batch_size], split.labels[start:start + batch_size]
        with autocast(device, precision):
            logits = model(images)
            if tta == "flip":
                mirrored = model(images.flip(3))
        log_probs = F.log_softmax(logits.float(), 1)
        if tta == "flip":
            log_probs = torch.logsumexp(torch.stack([log_probs, F.log_softmax(mirrored.float(), 1)]), 0) - math.log(2)
        total_loss += F.nll_loss(log_probs, labels, reduction="sum")
        correct += (log_probs.argmax(1) == labels).sum()
    return total_loss.item() / len(split), correct.item() / len(split)


def test_results(run: RunSetup) -> dict:
    """The test loss and accuracy of the run's scored weights, and, labelled apart, those with --tta and those of the
    trained weights when --ema averages them, and the seconds all of them took."""
    config = run.config
    start = time.perf_counter()
    loss, acc = evaluate(run.scored_model, run.test, precision=config.precision)
    results = {"loss": loss, "acc": acc}
    if config.tta != "none":
        results[f"loss_{config.tta}"], results[f"acc_{config.tta}"] = evaluate(
            run.scored_model, run.test, precision=config.precision, tta=config.tta)
    if run.ema is not None:
        results["loss_trained_weights"], results["acc_trained_weights"] = evaluate(
            run.model, run.test, precision=config.precision)
    results["seconds"] = time.perf_counter() - start
    return results


def train_run(config: RunConfig, raw: RawData, files: RunFiles, resume: bool, runtime: Runtime = Runtime()) -> dict:
    """Train one run, checkpointing every epoch (continuing its checkpoint when `resume`) and logging each
    checkpointed epoch to the trackers of `runtime`; return its history with the test result. Under torchrun every
    rank trains and only rank 0 writes and tracks."""
    run = prepare_run(config, raw, runtime.rank, runtime.world_size)
    names = list(logged_weights(run.model))
    writes = runtime.writes
    history: dict = {"epochs": []}
    wandb_run_id = None
    if resume and files.checkpoint.is_file():
        history, wandb_run_id = restore(run, files.checkpoint)
        if writes:
            files.heal_grad_norms(names, history["epochs"][-1]["steps"] if history["epochs"] else 0)
    elif writes:
        files.start_grad_norms(names)
    machine = machine_description(torch.device(config.device))
    if machine not in history.setdefault("machines", []):  # each machine it trained on, for its timings
        history["machines"].append(machine)
    begins = f"resuming after epoch {len(history['epochs'])}" if history["epochs"] else "starting"
    print(f"{config.run_name}: {begins} on {config.device} in {config.precision}", flush=True)
    if writes:
        files.write_config(config)
    trackers = start_trackers(runtime.tracking if writes else TrackingOptions(),
                              TrackedRun(config.run_name, files.run_dir, config.to_dict(), run_id=wandb_run_id))
    wandb_run_id = trackers.run_id or wandb_run_id
    progress = sys.stderr.isatty() and writes if runtime.progress is None else runtime.progress
    try:
        for epoch in range(len(history["epochs"]) + 1, config.num_epochs + 1):
            result = train_epoch(run, epoch, history, files, progress)
            if writes:
                # grad norms first, then the checkpoint: a resume drops rows the checkpoint has not trained
                files.append_grad_norms(result.grad_steps, result.grad_norms)
                save_checkpoint(files.checkpoint, build_checkpoint(run, history, wandb_run_id))
                files.write_history(history)
            # after the checkpoint: what a resumed run trains again was never logged, so no step is logged twice
            trackers.log_epoch(history["epochs"][-1], result.grad_steps, result.grad_norms, names)
            print(describe_epoch(config, history), flush=True)  # once saved: a stdout that fails stops the run here
        history["test"] = test_results(run)
        if writes:
            files.write_history(history)
        trackers.log_summary({f"test_{key}": value for key, value in history["test"].items() if key != "seconds"},
                             len(history["epochs"]))
    except BaseException:
        trackers.finish(False)
        raise
    trackers.finish(True)
    print(f"{config.run_name}: {describe_test(history['test'])}", flush=True)
    return history


def describe_epoch(config: RunConfig, history: dict) -> str:
    """The last epoch of a history in words: "<run> epoch 2/10: train loss 0.4425, val loss 0.4711, val acc 86.80%,
    12.3 s"."""
    record, held_out = history["epochs"][-1], held_out_key(history)
    return (f"{config.run_name} epoch {record['epoch']}/{config.num_epochs}: train loss {record['train_loss']:.4f}, "
            f"{held_out} loss {record[f'{held_out}_loss']:.4f}, {held_out} acc {record[f'{held_out}_acc']:.2%}, "
            f"{record['seconds']:.1f} s")


def describe_test(test: dict) -> str:
    """A run's test results in words: "test loss 0.4425, test acc 86.80% (flip: 87.31%; trained weights: 86.52%)"."""
    others = [f"{key.removeprefix('acc_').replace('_', ' ')}: {value:.2%}" for key, value in test.items()
              if key.startswith("acc_")]
    return f"test loss {test['loss']:.4f}, test acc {test['acc']:.2%}" + (f" ({'; '.join(others)})" if others else "")


def train_epoch(run: RunSetup, epoch: int, history: dict, files: RunFiles, progress: bool) -> EpochResult:
    """Train and validate one epoch and append its record to `history`; a diverged loss says
    which epoch the checkpoint keeps."""
    config = run.config
    start = time.perf_counter()
    steps_done = history["epochs"][-1]["steps"] if history["epochs"] else 0
    lr = run.optimizer.param_groups[0]["lr"]
    try:
        result = train_one_epoch(run, epoch, steps_done, progress)
        held_out = "val" if len(run.val) else "test"  # --val_size 0: no validation; the test set, named as such
        loss, acc = evaluate(run.scored_model, run.val if held_out == "val" else run.test, precision=config.precision)
        check_loss(torch.tensor([loss]), f"{HELD_OUT[held_out]} loss after epoch {epoch}", steps_done + result.steps)
    except DivergedLoss as e:
        kept = f"{files.checkpoint} keeps epoch {epoch - 1}" if epoch > 1 else "no epoch had finished"
        raise DivergedLoss(f"{e}; {kept}; {divergence_advice(config)}") from None
    seconds = time.perf_counter() - start
    history["epochs"].append({"epoch": epoch, "train_loss": result.loss, f"{held_out}_loss": loss,
                              f"{held_out}_acc": acc, "lr": lr, "seconds": seconds, "steps": steps_done + result.steps})
    return result
