"""Build, train, evaluate, sweep and plot the lab's MLPs and CNNs.

    python pipeline.py --model_name MLP --dataset MNIST --num_hidden_layers 2 10 18 26 34 --num_epochs 10
    python pipeline.py --model_name ResNet --dataset CIFAR10 --num_conv_per_level 1 3 5 --residual_step 0 2
    python pipeline.py --no-train --checkpoint runs/<run>/checkpoint.pt
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from data import DATASETS, RawData, Split, augment, load_dataset, make_splits, to_split
from models import build_model
from train import evaluate, logged_weights, train_one_epoch
from utils import (ArgumentParser, UsageError, check_writable, first_line, load_checkpoint, load_model, plot_curves,
                   plot_grad_norms, resolve_device, rng_state, run_cli, save_checkpoint, seed_everything,
                   set_rng_state, write_json)

SWEEP_FLAGS = ("num_hidden_layers", "num_conv_per_level", "residual_step", "width", "seed")
GRAD_PLOT_LAYERS = 5
DEFAULT_THREADS = torch.get_num_threads()


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
    parser.add("--weight_decay", type=float, default=0.0, help="weight decay")
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
    parser.add("--seed", type=int, nargs="+", default=[0], help="random seed" + sweep)
    parser.add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add("--threads", type=int, default=0,
               help="CPU threads; 0 = 1 for the MLP (its tiny matmuls only lose to a second thread), every core "
                    "for CNNs")
    parser.add("--amp", action=argparse.BooleanOptionalAction, default=False, help="bfloat16 autocast")
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
    return parser


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
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (automatic) or positive, got {args.threads}")
    if args.grad_log_every < 0:
        raise UsageError(f"--grad_log_every must be 0 (off) or positive, got {args.grad_log_every}")
    info = DATASETS[args.dataset]
    for flag in ("in_channels", "input_size"):
        if getattr(args, flag) not in (None, getattr(info, flag)):
            raise UsageError(f"--{flag} {getattr(args, flag)} does not match {args.dataset} "
                             f"({getattr(info, flag)}); leave it out to derive it")
    if args.num_classes < len(info.classes):
        raise UsageError(f"--num_classes {args.num_classes} is smaller than {args.dataset}'s {len(info.classes)}")
    if args.val_size >= info.num_train:
        raise UsageError(f"--val_size {args.val_size} must be smaller than {args.dataset}'s {info.num_train} "
                         "training images")
    if args.limit_train is not None and args.limit_train > info.num_train - args.val_size:
        raise UsageError(f"--limit_train {args.limit_train} is larger than the training split "
                         f"({info.num_train - args.val_size} images after --val_size {args.val_size})")
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


def sweep_configs(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One config per combination of the sweep flags' values, with the derived settings filled in."""
    info = DATASETS[args.dataset]
    mlp = args.model_name == "MLP"
    base = {k: v for k, v in vars(args).items() if k not in SWEEP_FLAGS + ("train", "resume", "overwrite")}
    base.update(in_channels=info.in_channels, input_size=info.input_size, device=str(device))
    configs = []
    depths = args.num_hidden_layers if mlp else args.num_conv_per_level
    for layers, step, width, seed in itertools.product(depths, args.residual_step, args.width if mlp else [None],
                                                       args.seed):
        config = dict(base, residual_step=step, seed=seed, width=width,
                      num_hidden_layers=layers if mlp else None, num_conv_per_level=None if mlp else layers)
        config["depth"] = build_model(config).depth
        config["run_name"] = derive_run_name(config)
        configs.append(config)
    if args.run_name is not None:
        for config in configs:
            config["run_name"] = args.run_name if len(configs) == 1 else f"{args.run_name}_{config['run_name']}"
    return configs


def derive_run_name(config: dict) -> str:
    """A run folder name that states the model, dataset, depth, width, shortcuts and seed."""
    shortcuts = f"res{config['residual_step']}" if config["residual_step"] else "plain"
    if config["model_name"] == "MLP":
        shape = f"w{config['width']}"
    else:
        shape = f"c{config['out_channels']}x{config['num_levels']}" + ("_in" if config["stem"] == "imagenet" else "")
    return (f"{config['model_name'].lower()}_{config['dataset'].lower()}_d{config['depth']}_{shape}_{shortcuts}"
            f"_s{config['seed']}")


def curve_label(config: dict) -> str:
    """How a run is named in plot legends: depth, width and plain/residual."""
    shortcuts = f"residual (step {config['residual_step']})" if config["residual_step"] else "plain"
    width = f", width {config['width']}" if config["model_name"] == "MLP" else ""
    return f"depth {config['depth']}{width}, {shortcuts}"


def build_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.Optimizer:
    """Adam or SGD with the config's learning rate, momentum and weight decay, as one fused kernel per step."""
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                               weight_decay=config["weight_decay"], fused=True)
    return torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], fused=True)


def cpu_threads(config: dict) -> int:
    """Torch CPU threads for a run: --threads, or 1 for the MLP and every physical core for CNNs.

    The MLP's 16-wide matmuls are too small to split; a second thread only adds synchronisation, and when another
    process holds the other core it spin-waits for it (measured: 8 ms a step on 1 thread, 55 ms on 2).
    """
    if config["threads"]:
        return config["threads"]
    return 1 if config["model_name"] == "MLP" else DEFAULT_THREADS


def uses_channels_last(config: dict) -> bool:
    """Whether a run keeps images and weights channels_last (faster convolutions): CNNs, except on the CPU below
    16 channels, where oneDNN's weight gradient of the channels_last 1x1 stride-2 shortcut convolution hangs or
    is wrong (uxlfoundation/oneDNN#6035)."""
    return config["model_name"] == "ResNet" and (config["device"].startswith("cuda") or config["out_channels"] >= 16)


@dataclass
class RunSetup:
    """Everything one run trains with: its splits on the device, a fresh model and optimizer, the data-order
    generator and the batch augmentation (or None)."""
    train: Split
    val: Split
    test: Split
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    augment_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None


def build_run_model(config: dict) -> torch.nn.Module:
    """The seeded, freshly initialised model of a run, on its device and in its memory format."""
    seed_everything(config["seed"])
    memory_format = torch.channels_last if uses_channels_last(config) else torch.preserve_format
    return build_model(config).to(config["device"], memory_format=memory_format)


def prepare_run(config: dict, raw: RawData) -> RunSetup:
    """Set up a run from its config: splits, model, optimizer, data order and augmentation."""
    info = DATASETS[config["dataset"]]
    train, val, test = make_splits(raw, info, config["val_size"], config["seed"], config["limit_train"],
                                   config["device"], uses_channels_last(config))
    model = build_run_model(config)
    return RunSetup(train, val, test, model, build_optimizer(model, config),
                    torch.Generator().manual_seed(config["seed"]),
                    partial(augment, info=info) if config["augment"] else None)


def train_run(config: dict, raw: RawData, checkpoint_path: Path, resume: bool) -> dict:
    """Train one config, checkpointing every epoch; return its history (with the test result)."""
    run_dir = Path(config["out_dir"]) / config["run_name"]
    run = prepare_run(config, raw)
    model, optimizer, generator = run.model, run.optimizer, run.generator
    config = dict(config, num_params=sum(p.numel() for p in model.parameters()))
    history = {"epochs": [], "grad_steps": [], "grad_norms": {name: [] for name in logged_weights(model)}}
    if resume and checkpoint_path.is_file():
        checkpoint = load_checkpoint(checkpoint_path)
        check_resumable(checkpoint["config"], config, checkpoint_path)
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            history = checkpoint["history"]
            set_rng_state(checkpoint["rng"])
            generator.set_state(checkpoint["rng"]["data"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UsageError(f"{checkpoint_path} cannot be resumed ({first_line(e)}); use --overwrite to start "
                             "again") from None
        history.pop("test", None)  # a finished run asked for more epochs goes on training
        print(f"{config['run_name']}: resuming after epoch {len(history['epochs'])}")
    write_json(run_dir / "config.json", config)
    progress = sys.stderr.isatty()
    for epoch in range(len(history["epochs"]) + 1, config["num_epochs"] + 1):
        start = time.perf_counter()
        steps_done = history["epochs"][-1]["steps"] if history["epochs"] else 0
        result = train_one_epoch(model, optimizer, run.train, config["batch_size"], generator, epoch, steps_done,
                                 config["grad_log_every"], run.augment_fn, config["amp"], progress)
        val_loss, val_acc = evaluate(model, run.val, amp=config["amp"])
        seconds = time.perf_counter() - start
        history["epochs"].append({"epoch": epoch, "train_loss": result.loss, "val_loss": val_loss,
                                  "val_acc": val_acc, "seconds": seconds,
                                  "steps": steps_done + result.steps})
        history["grad_steps"] += result.grad_steps
        for name, column in zip(history["grad_norms"], result.grad_norms.T.tolist()):
            history["grad_norms"][name] += column
        print(f"{config['run_name']} epoch {epoch}/{config['num_epochs']}: train loss {result.loss:.4f}, "
              f"val loss {val_loss:.4f}, val acc {val_acc:.2%}, {seconds:.1f} s", flush=True)
        save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "epoch": epoch, "config": config, "history": history,
                                          "rng": dict(rng_state(), data=generator.get_state())})
        # unindented: it holds every logged gradient norm and is rewritten each epoch (half the time of indent=2)
        write_json(run_dir / "history.json", history, indent=None)
    test_loss, test_acc = evaluate(model, run.test, amp=config["amp"])
    history["test"] = {"loss": test_loss, "acc": test_acc}
    write_json(run_dir / "history.json", history, indent=None)
    print(f"{config['run_name']}: depth {config['depth']}, test loss {test_loss:.4f}, test acc {test_acc:.2%}")
    return history


def check_resumable(saved: dict, config: dict, path: Path) -> None:
    """A run resumes only with the settings it was started with (the epoch count and paths may change)."""
    changeable = {"num_epochs", "device", "threads", "data_root", "download", "out_dir", "plots_dir", "checkpoint",
                  "num_params"}
    changed = sorted(k for k in config.keys() - changeable if saved.get(k) != config[k])
    if changed:
        k = changed[0]
        raise UsageError(f"{path} was trained with --{k} {saved.get(k)}, not {config[k]}; resume with the same "
                         "flags, or pass --overwrite to start again")


def is_finished(history_path: Path, num_epochs: int) -> dict | None:
    """The history of a run that completed `num_epochs` epochs and its test evaluation, else None."""
    if not history_path.is_file():
        return None
    try:
        history = json.loads(history_path.read_text())
    except (OSError, ValueError):
        return None
    return history if "test" in history and len(history.get("epochs", [])) >= num_epochs else None


def plot_sweep(runs: list[tuple[dict, dict]], plots_dir: Path) -> list[Path]:
    """The lab's comparison plots over every run of a sweep; return the files written."""
    mlp = runs[0][0]["model_name"] == "MLP"
    loss_curves: dict[str, list[list[float]]] = {}
    acc_curves: dict[str, list[list[float]]] = {}
    for config, history in runs:
        label = curve_label(config)
        loss_curves.setdefault(label, []).append([e["train_loss"] for e in history["epochs"]])
        acc_curves.setdefault(label, []).append([e["val_acc"] for e in history["epochs"]])
    family = "MLP" if mlp else "CNN"
    paths = [plots_dir / ("mlp_training_loss.png" if mlp else "Conv_train_loss.png"),
             plots_dir / ("mlp_Val_acc.png" if mlp else "Conv_val_accuracy.png")]
    plot_curves(loss_curves, "training loss", f"{family} training loss", paths[0], logy=True)
    plot_curves(acc_curves, "validation accuracy", f"{family} validation accuracy", paths[1])
    if mlp:
        for config, history in runs:
            if not history["grad_steps"]:
                continue
            name = f"gradients_mlp_d{config['depth']}"
            if sum(c["depth"] == config["depth"] for c, _ in runs) > 1:
                name = f"gradients_{config['run_name']}"
            first = {n: history["grad_norms"][n] for n in list(history["grad_norms"])[:GRAD_PLOT_LAYERS]}
            paths.append(plots_dir / f"{name}.png")
            plot_grad_norms(history["grad_steps"], first,
                            f"gradients of the first layers, {curve_label(config)}", paths[-1])
    return paths


def evaluate_checkpoint(args: argparse.Namespace, device: torch.device) -> None:
    """--no-train: evaluate a saved model on its dataset's test set."""
    if args.checkpoint is None:
        raise UsageError("--no-train needs --checkpoint PATH (a checkpoint.pt written by a training run)")
    checkpoint = load_checkpoint(args.checkpoint)
    model = load_model(checkpoint, args.checkpoint, build_model).to(device)
    config = checkpoint["config"]
    info = DATASETS[config["dataset"]]
    raw = load_dataset(config["dataset"], args.data_root, args.download)
    test = to_split(raw.test_images, raw.test_labels, info, device)
    test_loss, test_acc = evaluate(model, test)
    print(f"{config['run_name']} ({config['model_name']}, depth {config['depth']}) on the {config['dataset']} "
          f"test set ({len(test)} images): loss {test_loss:.4f}, accuracy {test_acc:.2%}")


def main(args: argparse.Namespace) -> list[tuple[dict, dict]]:
    """Train and evaluate every config of the sweep, then plot; return (config, history) per run."""
    device = resolve_device(args.device)
    if not args.train:
        evaluate_checkpoint(args, device)
        return []
    check_args(args)
    configs = sweep_configs(args, device)
    if args.checkpoint is not None and len(configs) > 1:
        raise UsageError(f"--checkpoint names one file but the sweep has {len(configs)} runs; leave it out")
    out_dir = Path(args.out_dir)
    plan = []
    for config in configs:
        run_dir = out_dir / config["run_name"]
        checkpoint_path = Path(args.checkpoint) if args.checkpoint else run_dir / "checkpoint.pt"
        if (run_dir.exists() and any(run_dir.iterdir()) or checkpoint_path.exists()) and not (
                args.resume or args.overwrite):
            raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                             "replace it, or --run_name/--out_dir to keep both")
        plan.append((config, checkpoint_path))
    raw = load_dataset(args.dataset, args.data_root, args.download)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(configs[0]))
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest convolutions once
    runs = []
    for config, checkpoint_path in plan:
        finished = is_finished(out_dir / config["run_name"] / "history.json", config["num_epochs"])
        if args.resume and finished:
            print(f"{config['run_name']}: already finished, skipped")
            runs.append((config, finished))
            continue
        try:
            runs.append((config, train_run(config, raw, checkpoint_path, args.resume)))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the last finished epoch of {config['run_name']} is saved in "
                                    f"{checkpoint_path}; run the same command with --resume to continue") from None
    plots_dir = Path(args.plots_dir) if args.plots_dir else out_dir / "plots"
    for path in plot_sweep(runs, plots_dir):
        print(f"wrote {path}")
    return runs


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
