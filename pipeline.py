"""Build, train, evaluate, sweep and plot the lab's MLPs and CNNs.

    python pipeline.py --model_name MLP --dataset MNIST --num_hidden_layers 2 10 18 26 34 --num_epochs 10
    python pipeline.py --model_name ResNet --dataset CIFAR10 --num_conv_per_level 1 3 5 --residual_step 0 2
    python pipeline.py --no-train --checkpoint runs/<run>/checkpoint.pt
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from config import RunConfig
from data import DATASETS, DatasetError, check_split_sizes, load_dataset, to_split
from models import load_model
from plots import plot_sweep
from sweep import SWEEP_FLAGS, RunConflict, execute, expand, plan, with_prefix
from tracking import DEFAULT_PROJECT, TrackingOptions, log_sweep_figures
from train import ResumeError, amp_precision, cpu_threads, evaluate
from utils import (ArgumentParser, CheckpointError, CLIError, UsageError, check_writable, distributed_world,
                   init_distributed, load_checkpoint, resolve_device, run_cli)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The pipeline's flags; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = ArgumentParser(description="Depth, residual connections and convolutions: train, evaluate, "
                            "sweep and plot.", add_help=add_help)

    sweep = "; several values run every combination"
    parser.add("--model_name", choices=["MLP", "ResNet"], default="MLP", help="model family")
    parser.add("--dataset", choices=list(DATASETS), default="MNIST", help="dataset")
    parser.add("--data_root", default="data", help="folder holding MNIST/raw and cifar-10-batches-py")
    parser.add("--download", action=argparse.BooleanOptionalAction, default=True,
               help="download the dataset through torchvision when it is missing")
    parser.add("--val_size", type=int, default=5000, help="validation images held out of the training set")
    parser.add("--limit_train", type=int, default=None,
               help="train on the first N images of the training split only (default: all)")
    parser.add("--num_epochs", type=int, default=1, help="training epochs")
    parser.add("--lr", type=float, default=3e-4, help="learning rate")
    parser.add("--batch_size", type=int, default=128, help="training batch size")
    parser.add("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer")
    parser.add("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov momentum (SGD)")
    parser.add("--weight_decay", type=float, default=0.0, help="weight decay of conv and linear weights (biases and "
               "batch norm are not decayed)")
    parser.add("--lr_schedule", choices=["constant", "onecycle", "cosine", "step"], default="constant",
               help="learning-rate schedule, stepped every batch: onecycle rises from lr/25 to --lr over the "
                    "warm-up and anneals to lr/25e4; cosine decays to 0; step divides by 10 at 50%% and 75%%")
    parser.add("--warmup_epochs", type=float, default=None,
               help="epochs of warm-up: onecycle's rise (along a cosine), a linear rise for the other schedules "
                    "(default: 30%% of training for onecycle, none otherwise)")
    parser.add("--label_smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    parser.add("--augment", action=argparse.BooleanOptionalAction, default=False,
               help="random 4-pixel-padded crops and horizontal flips (CIFAR-10 only)")
    parser.add("--num_classes", type=int, default=10, help="output classes")
    parser.add("--residual_step", type=int, nargs="+", default=[0],
               help="layers per residual block, 0 = plain (no shortcuts)" + sweep)
    parser.add("--width", type=int, nargs="+", default=[16], help="MLP hidden width" + sweep)
    parser.add("--num_hidden_layers", type=int, nargs="+", default=[4], help="MLP hidden layers" + sweep)
    parser.add("--in_channels", type=int, default=None, help="input channels (default: the dataset's)")
    parser.add("--input_size", type=int, default=None, help="input height and width (default: the dataset's)")
    parser.add("--out_channels", type=int, default=64, help="CNN channels of the first level (doubling per level)")
    parser.add("--num_levels", type=int, default=4, help="CNN levels")
    parser.add("--num_conv_per_level", type=int, nargs="+", default=[4], help="CNN 3x3 convolutions per level" + sweep)
    parser.add("--stem", choices=["cifar", "imagenet"], default="cifar",
               help="CNN stem: cifar = 3x3 conv at full resolution, imagenet = 7x7/2 conv + 3x3/2 max-pool")
    parser.add("--shortcut", choices=["identity", "projection"], default=None,
               help="residual CNN shortcut where the shape changes: identity = He et al.'s option A (subsample, "
                    "zero-pad the new channels; no parameters), projection = option B (1x1 conv + batch norm) "
                    "(default: identity for the cifar stem, projection for imagenet)")
    parser.add("--seed", type=int, nargs="+", default=[0], help="random seed" + sweep)
    parser.add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add("--threads", type=int, default=0,
               help="CPU threads; 0 = 1 for the MLP (its tiny matmuls only lose to a second thread), every core "
                    "for CNNs")
    parser.add("--jobs", type=int, default=1,
               help="train a sweep's runs in N worker processes, longest first; on the CPU each gets cores // N "
                    "threads (or --threads), on CUDA its own device (round robin)")
    parser.add("--sync_bn", action=argparse.BooleanOptionalAction, default=False,
               help="under torchrun: synchronise batch-norm statistics across processes (CUDA only)")
    parser.add("--amp", action=argparse.BooleanOptionalAction, default=False,
               help="mixed precision where the device has it: bfloat16 autocast on CUDA GPUs of compute capability "
                    "8.0+ and on CPUs with AVX512-BF16 or AMX, float16 autocast with a GradScaler on older GPUs; on "
                    "other CPUs a warning and float32. Each run's config records the precision")
    parser.add("--grad_log_every", type=int, default=1, help="log gradient norms every N steps (0 = never)")
    parser.add("--train", action=argparse.BooleanOptionalAction, default=True,
               help="train; --no-train evaluates --checkpoint on the test set")
    parser.add("--checkpoint", "--load_model_as", "--save_model_as", "--load-model-as", "--save-model-as",
               help="checkpoint to write (default: <out_dir>/<run_name>/checkpoint.pt), or to evaluate with --no-train")
    parser.add("--out_dir", default="runs", help="folder for run folders")
    parser.add("--plots_dir", default=None, help="folder for plots (default: <out_dir>/plots)")
    parser.add("--run_name", default=None,
               help="run folder name (default: derived from the config; a prefix in sweeps)")
    parser.add("--resume", action="store_true", default=False,
               help="continue unfinished runs from their checkpoints and skip finished ones")
    parser.add("--overwrite", action="store_true", default=False, help="replace existing run folders")
    parser.add("--wandb", choices=["disabled", "offline", "online"], nargs="?", const="online", default="disabled",
               help="track every run in Weights & Biases, grouped by --out_dir's name: offline writes "
                    "<run folder>/wandb to upload later with wandb sync; online uploads as it trains (after wandb "
                    "login); a bare --wandb, as in the original lab, means online")
    parser.add("--wandb_proj_name", default=DEFAULT_PROJECT, help="W&B project (ignored without --wandb)")
    parser.add("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
               help="write TensorBoard event files to <run folder>/tensorboard (tensorboard --logdir <out_dir>)")
    return parser


SINGLE_VALUED = ("model_name", "dataset", "num_classes", "out_channels", "num_levels", "stem", "shortcut", "val_size",
                 "limit_train", "augment", "num_epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                 "weight_decay", "lr_schedule", "label_smoothing", "sync_bn", "amp", "grad_log_every", "threads")


def check_args(args: argparse.Namespace) -> None:
    """Reject bad flag values before anything is loaded or written."""
    for flag in ("val_size", "num_epochs", "batch_size", "num_classes", "out_channels", "num_levels",
                 "limit_train", "in_channels", "input_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag} must be a positive integer, got {value}")
    for flag in ("num_hidden_layers", "width", "num_conv_per_level"):
        if any(v <= 0 for v in getattr(args, flag)):
            raise UsageError(f"--{flag} must be positive integers, got {getattr(args, flag)}")
    if any(k < 0 for k in args.residual_step):
        raise UsageError(f"--residual_step must be 0 (plain) or a positive block size, got {args.residual_step}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.weight_decay < 0 or args.momentum < 0:
        raise UsageError("--weight_decay and --momentum must not be negative")
    if args.nesterov and (args.optimizer != "sgd" or args.momentum == 0):
        raise UsageError("--nesterov needs --optimizer sgd and a positive --momentum")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.warmup_epochs is not None and not 0 <= args.warmup_epochs < args.num_epochs:
        raise UsageError(f"--warmup_epochs must be at least 0 and below --num_epochs {args.num_epochs}, "
                         f"got {args.warmup_epochs}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be a positive integer, got {args.jobs}")
    if args.jobs > 1 and distributed_world() > 1:
        raise UsageError("--jobs runs a sweep in worker processes and torchrun spreads one run over processes; "
                         "use one of them")
    if args.sync_bn and distributed_world() == 1:
        raise UsageError("--sync_bn synchronises batch norm across torchrun's processes; start with torchrun")
    if args.sync_bn and not args.device.startswith("cuda") and not (args.device == "auto" and
                                                                   torch.cuda.is_available()):
        raise UsageError("--sync_bn needs CUDA: torch's SyncBatchNorm does not run on the CPU")
    if distributed_world() > 1 and args.batch_size % distributed_world():
        raise UsageError(f"--batch_size {args.batch_size} must be a multiple of torchrun's {distributed_world()} "
                         "processes: each trains on an equal share of every batch")
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (automatic) or positive, got {args.threads}")
    if args.wandb != "disabled" and (not args.wandb_proj_name or len(args.wandb_proj_name) > 128
                                     or any(c in args.wandb_proj_name for c in "/\\#?%:")):
        raise UsageError(f"--wandb_proj_name {args.wandb_proj_name!r} is not a W&B project name (1 to 128 "
                         "characters, none of / \\ # ? % :)")
    if args.grad_log_every < 0:
        raise UsageError(f"--grad_log_every must be 0 (off) or positive, got {args.grad_log_every}")
    info = DATASETS[args.dataset]
    for flag in ("in_channels", "input_size"):
        if getattr(args, flag) not in (None, getattr(info, flag)):
            raise UsageError(f"--{flag} {getattr(args, flag)} does not match {args.dataset} "
                             f"({getattr(info, flag)}); leave it out to derive it")
    if args.num_classes < len(info.classes):
        raise UsageError(f"--num_classes {args.num_classes} is smaller than {args.dataset}'s {len(info.classes)}")
    check_split_sizes(info.num_train, args.val_size, args.limit_train)  # again once the files are read
    if args.augment and args.dataset != "CIFAR10":
        raise UsageError("--augment (crops and flips) is for CIFAR10 only")
    if args.model_name == "MLP":
        for n, k in itertools.product(args.num_hidden_layers, args.residual_step):
            if k > 0 and n % k:
                raise UsageError(f"--num_hidden_layers {n} is not a multiple of --residual_step {k}; "
                                 "choose depths that the block size divides")
    check_writable(Path(args.out_dir), "--out_dir")
    if args.plots_dir is not None:
        check_writable(Path(args.plots_dir), "--plots_dir")


def run_configs(args: argparse.Namespace, device: torch.device) -> list[RunConfig]:
    """The sweep's run configs from the flags, with the dataset's shape and the warm-up filled in."""
    info = DATASETS[args.dataset]
    warmup = args.warmup_epochs
    if warmup is None:
        warmup = 0.3 * args.num_epochs if args.lr_schedule == "onecycle" else 0.0
    settings = {flag: getattr(args, flag) for flag in SINGLE_VALUED}
    shortcut = args.shortcut or ("identity" if args.stem == "cifar" else "projection")
    settings.update(in_channels=info.in_channels, input_size=info.input_size, warmup_epochs=warmup,
                    shortcut=shortcut, device=str(device), precision=amp_precision(device) if args.amp else "float32")
    sweep = {flag: getattr(args, flag) for flag in {f for flags in SWEEP_FLAGS.values() for f in flags}}
    try:
        configs = expand(settings, sweep)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return with_prefix(configs, args.run_name)


def evaluate_checkpoint(args: argparse.Namespace, device: torch.device) -> None:
    """--no-train: evaluate a saved model on its dataset's test set."""
    if args.checkpoint is None:
        raise UsageError("--no-train needs --checkpoint PATH (a checkpoint.pt written by a training run)")
    checkpoint = load_checkpoint(args.checkpoint)
    config, model = load_model(checkpoint, args.checkpoint)
    model.to(device)
    info = DATASETS[config.dataset]
    raw = load_dataset(config.dataset, args.data_root, args.download)
    test = to_split(raw.test_images, raw.test_labels, info, device)
    test_loss, test_acc = evaluate(model, test)
    print(f"{config.run_name} ({config.model_name}, depth {config.depth}) on the {config.dataset} "
          f"test set ({len(test)} images): loss {test_loss:.4f}, accuracy {test_acc:.2%}")


def tracking_hints(tracking: TrackingOptions, out_dir: Path, plots_dir: Path) -> list[str]:
    """How to look at a tracked sweep: the command that uploads W&B's offline runs, and TensorBoard's."""
    hints = []
    if tracking.wandb == "offline":
        folders = [f"{out_dir}/*/wandb/offline-run-*"]
        if plots_dir.parent != out_dir:
            folders.append(f"{plots_dir}/wandb/offline-run-*")
        hints.append(f"W&B runs are saved offline; upload them with: wandb sync {' '.join(folders)}")
    if tracking.tensorboard:
        hints.append(f"TensorBoard: tensorboard --logdir {out_dir}")
    return hints


def main(args: argparse.Namespace) -> list[tuple[RunConfig, dict]]:
    """Train and evaluate every config of the sweep, then plot; return (config, history) per finished run."""
    try:
        return sweep_main(args)
    except (RunConflict, ResumeError, CheckpointError, DatasetError) as e:
        raise UsageError(str(e)) from None


def sweep_main(args: argparse.Namespace) -> list[tuple[RunConfig, dict]]:
    """main() without the translation of library errors into CLI messages; torch's thread count is restored."""
    threads = torch.get_num_threads()
    try:
        return plan_and_train(args)
    finally:
        torch.set_num_threads(threads)


def plan_and_train(args: argparse.Namespace) -> list[tuple[RunConfig, dict]]:
    """Evaluate a checkpoint, or plan the sweep, train it and draw its figures."""
    if not args.train:
        evaluate_checkpoint(args, resolve_device(args.device))
        return []
    check_args(args)
    rank, world_size = 0, distributed_world()
    if world_size > 1:
        rank, world_size, device_name = init_distributed(args.device)
        device = torch.device(device_name)
    else:
        device = resolve_device(args.device)
    configs = run_configs(args, device)
    if args.amp and configs[0].precision == "float32":
        print("warning: --amp: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX); training in float32",
              file=sys.stderr)
    out_dir = Path(args.out_dir)
    planned = plan(configs, out_dir, Path(args.checkpoint) if args.checkpoint else None, args.resume,
                   args.overwrite)
    if world_size > 1:
        torch.distributed.barrier()  # every rank has planned before rank 0 replaces any file
    raw = load_dataset(args.dataset, args.data_root, args.download)
    check_split_sizes(len(raw.train_labels), args.val_size, args.limit_train)  # a copy may hold fewer images
    threads = cpu_threads(configs[0], args.jobs)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    devices = (str(device),)
    if device.type == "cuda" and device.index is None:
        devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    tracking = TrackingOptions(args.wandb, args.wandb_proj_name, args.tensorboard, out_dir.resolve().name)
    result = execute(planned, raw, args.resume and not args.overwrite, args.jobs, devices, threads, rank,
                     world_size, tracking)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if rank == 0 and result.runs:
        plots_dir = Path(args.plots_dir) if args.plots_dir else out_dir / "plots"
        files = {run.config.run_name: run.files for run in planned}
        figures = [(config, history, files[config.run_name].read_grad_norms()) for config, history in result.runs]
        paths = plot_sweep(figures, plots_dir)
        for path in paths:
            print(f"wrote {path}")
        log_sweep_figures(tracking, plots_dir, paths)
        for line in tracking_hints(tracking, out_dir, plots_dir):
            print(line)
    if result.failures:
        failed = "; ".join(f"{name}: {error}" for name, error in result.failures)
        raise CLIError(f"{len(result.failures)} of {len(planned)} runs failed ({failed})" if len(planned) > 1
                       else f"{result.failures[0][0]} failed: {result.failures[0][1]}")
    return result.runs


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
