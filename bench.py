"""How fast the lab's training code is, against the loop most course code uses, on the same data in one process.

    python bench.py --data_root ../shared/datasets --quick    # a few minutes on 2 CPU cores
    python bench.py --data_root ../shared/datasets            # 10 to 15 minutes: the exercises run for real

Prints a table and writes the numbers to --out (JSON). Every rate is the best of a few timed repeats of a fixed number
of steps after a warm-up, the contenders interleaved so that a busy neighbour slows them alike; the clock is
time.perf_counter, with CUDA synchronised before it is read. The conventional loops below exist only to be measured
against: they are written plainly, the way course code writes them, and are not used anywhere else.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import pipeline
from data import (CIFAR10_FOLDER, CIFAR10_TRAIN_FILES, DATASETS, RawData, Split, batch_indices,
                  load_dataset, normalize, read_cifar10_batches)
from cam import class_activation_maps
from models import build_model
from train import evaluate, train_one_epoch
from utils import ArgumentParser, UsageError, resolve_device, run_cli, write_json

BATCH_SIZE = 128
MLP_FLAGS = ["--model_name", "MLP", "--dataset", "MNIST", "--width", "16", "--num_hidden_layers", "22",
             "--optimizer", "adam", "--lr", "3e-4", "--grad_log_every", "1"]
RESNET20_FLAGS = ["--model_name", "ResNet", "--dataset", "CIFAR10", "--num_levels", "3", "--out_channels", "16",
                  "--num_conv_per_level", "6", "--residual_step", "2", "--stem", "cifar", "--augment",
                  "--optimizer", "adam", "--lr", "3e-4", "--grad_log_every", "1"]
EXERCISE1_DEPTHS = (2, 6, 10, 14, 18, 22, 26, 30, 34)
BUSY_LOAD = 1.0  # a 1-minute load average this high before we start means other work shares the cores


@dataclass(frozen=True)
class Sizes:
    """How long each measurement runs: QUICK and FULL are the CLI's, tests pass tiny ones."""
    mlp_steps: int  # timed training steps per repeat
    cnn_steps: int
    warmup_steps: int
    repeats: int  # each rate is the best of this many timed repeats
    matmul_size: int
    matmul_count: int  # matmuls per timed repeat
    cam_images: int
    val_size: int  # images held out of training, as in the exercises
    exercise1_depths: tuple[int, ...]
    exercise1_epochs: int
    exercise1_sample_steps: int  # steps timed per depth to estimate Exercise 1; 0 runs it for real
    exercise2_real: bool  # time a real epoch of Exercise 2 rather than estimate it from the CNN rate
    eval_sample: int  # validation images evaluated to estimate an evaluation pass
    limit_train: int | None = None  # train the exercises on fewer images (tests only)
    batch_size: int = BATCH_SIZE  # of every training run here (smaller in tests only)


QUICK = Sizes(mlp_steps=100, cnn_steps=3, warmup_steps=3, repeats=5, matmul_size=2048, matmul_count=2,
              cam_images=256, val_size=5000, exercise1_depths=EXERCISE1_DEPTHS, exercise1_epochs=10,
              exercise1_sample_steps=30, exercise2_real=False, eval_sample=1000)
FULL = Sizes(mlp_steps=200, cnn_steps=8, warmup_steps=5, repeats=5, matmul_size=2048, matmul_count=5,
             cam_images=256, val_size=5000, exercise1_depths=EXERCISE1_DEPTHS, exercise1_epochs=10,
             exercise1_sample_steps=0, exercise2_real=True, eval_sample=1000)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The benchmark's flags; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = ArgumentParser(description="Benchmark the lab's training code against the conventional DataLoader "
                            "loop, the machine's matmul ceiling, CAM and whole exercises.", add_help=add_help)
    parser.add("--data_root", default="data",
               help="folder holding MNIST/raw and cifar-10-batches-py (nothing is downloaded)")
    parser.add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add("--quick", action="store_true", default=False,
               help="short run: fewer steps, and Exercise 1 and the Exercise 2 epoch estimated rather than run")
    parser.add("--out", default="bench_results/bench.json", help="JSON file for the results")
    parser.add("--threads", type=int, default=0, help="torch.set_num_threads for this process (0 = torch's default)")
    parser.add("--compile", action="store_true", default=False,
               help="torch.compile the model in our code's rows (the conventional loops and Exercise 1 stay eager)")
    parser.add("--amp", action="store_true", default=False,
               help="bfloat16 autocast in our code's rows and the exercises")
    return parser


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Call each function `repeats` times, interleaved, and keep each one's fastest wall time."""
    best = {name: math.inf for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def pipeline_config(flags: list[str], device: torch.device, sizes: Sizes, amp: bool = False) -> dict:
    """The run config pipeline.py builds from these flags, so that we time exactly what it trains."""
    args = pipeline.get_args_parser().parse_args(
        flags + ["--val_size", str(sizes.val_size), "--batch_size", str(sizes.batch_size), "--device", str(device)]
        + (["--amp"] if amp else []))
    return pipeline.sweep_configs(args, device)[0]


@dataclass
class Trainer:
    """Our training code set up and warmed up: `train_epoch()` trains one epoch over `train`."""
    train_epoch: Callable[[], object]
    model: nn.Module
    train: Split
    val: Split
    warmup_seconds: float  # includes compiling, with --compile


def our_trainer(config: dict, raw: RawData, device: torch.device, limit_train: int | None, warmup_steps: int,
                compile_model: bool = False) -> Trainer:
    """Our training code as pipeline.train_run drives it (pipeline.prepare_run, train_one_epoch) on the
    first `limit_train` training images, warmed up on `warmup_steps` batches."""
    run = pipeline.prepare_run(dict(config, limit_train=limit_train), raw)
    train, optimizer, generator = run.train, run.optimizer, run.generator
    net = torch.compile(run.model) if compile_model else run.model

    threads = pipeline.cpu_threads(config) if device.type == "cpu" else torch.get_num_threads()

    def train_epoch(split: Split = train):
        default = torch.get_num_threads()
        torch.set_num_threads(threads)  # what pipeline.py uses for this model
        try:
            return train_one_epoch(net, optimizer, split, config["batch_size"], generator, 1,
                                   grad_log_every=config["grad_log_every"], augment_fn=run.augment_fn,
                                   amp=config["amp"], progress=False)
        finally:
            torch.set_num_threads(default)

    warm = min(warmup_steps * config["batch_size"], len(train))
    warmup = best_seconds({"warmup": lambda: train_epoch(Split(train.images[:warm], train.labels[:warm]))}, 1,
                          device)["warmup"]
    return Trainer(train_epoch, net, train, run.val, warmup)


class CIFAR10Images(Dataset):
    """CIFAR-10 served the way torchvision.datasets.CIFAR10 serves it: one PIL image per item, transformed then."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.data = images.numpy().transpose(0, 2, 3, 1)  # (N, 32, 32, 3), as torchvision keeps it
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def conventional_mnist_loader(data_root: str | Path, batch_size: int) -> DataLoader:
    """MNIST as most course code loads it: torchvision's dataset, per-image transforms, a shuffling DataLoader."""
    info = DATASETS["MNIST"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    dataset = torchvision.datasets.MNIST(str(data_root), train=True, download=False, transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def conventional_cifar10_loader(data_root: str | Path, batch_size: int) -> DataLoader:
    """CIFAR-10 as most course code loads it: PIL images, per-image crop and flip, a DataLoader with 2 workers.

    The dataset is built from data.read_cifar10_batches because torchvision.datasets.CIFAR10 refuses copies of the
    pickles whose md5 differs from the official files (as the rebuilt ones in shared/datasets do).
    """
    info = DATASETS["CIFAR10"]
    images, labels = read_cifar10_batches(Path(data_root) / CIFAR10_FOLDER, CIFAR10_TRAIN_FILES)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    return DataLoader(CIFAR10Images(images, labels, transform), batch_size=batch_size, shuffle=True, num_workers=2)


def endless(loader: DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def conventional_trainer(config: dict, loader: DataLoader, device: torch.device, steps: int, warmup_steps: int,
                         log_grad_norms: bool) -> Callable[[], float]:
    """The usual course training loop over `loader`, warmed up; returns a function that trains `steps` steps."""
    model = build_model(config).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    batches = endless(loader)
    grad_norms = []

    def train_steps(count: int = steps) -> float:
        model.train()
        running_loss = 0.0
        for _ in range(count):
            images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            if log_grad_norms:
                grad_norms.append({name: p.grad.norm().item() for name, p in model.named_parameters() if p.ndim > 1})
            optimizer.step()
            running_loss += loss.item()
        return running_loss / count

    train_steps(warmup_steps)
    return train_steps


def with_one_thread_lever(runs: dict[str, Callable[[], object]], device: torch.device
                          ) -> dict[str, Callable[[], object]]:
    """`runs` plus "ours_1_thread": ours again under torch.set_num_threads(1), when we run on more CPU threads
    (tiny ops gain nothing from a second thread and lose much when a neighbour holds the other core)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return runs

    def one_thread() -> None:
        torch.set_num_threads(1)
        try:
            runs["ours"]()
        finally:
            torch.set_num_threads(threads)

    return dict(runs, ours_1_thread=one_thread)


def training_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward and backward pass over a batch, as torch.utils.flop_counter counts them
    (matmuls and convolutions; a multiply-add is 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(size: int, count: int, repeats: int, device: torch.device) -> float:
    """GFLOP/s of `count` float32 (size x size) @ (size x size) matmuls: what this machine can reach."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)

    def matmuls():
        for _ in range(count):
            torch.mm(a, b, out=out)

    matmuls()
    seconds = best_seconds({"matmul": matmuls}, repeats, device)["matmul"]
    return 2 * size ** 3 * count / seconds / 1e9


def bench_mlp(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes, amp: bool,
              compile_model: bool) -> dict:
    """Section 1: the 22-hidden-layer MLP on MNIST, ours with and without the gradient-norm log, and the
    conventional loop with a DataLoader and per-weight `.item()` norms."""
    print("MLP on MNIST ...", file=sys.stderr, flush=True)
    config = pipeline_config(MLP_FLAGS, device, sizes, amp)
    limit = sizes.mlp_steps * config["batch_size"]
    ours = our_trainer(config, raw, device, limit, sizes.warmup_steps, compile_model)
    quiet = our_trainer(dict(config, grad_log_every=0), raw, device, limit, sizes.warmup_steps, compile_model)
    conventional = conventional_trainer(config, conventional_mnist_loader(data_root, sizes.batch_size), device,
                                        sizes.mlp_steps, sizes.warmup_steps, log_grad_norms=True)
    runs = {"ours": ours.train_epoch, "ours_no_logging": quiet.train_epoch, "conventional": conventional}
    seconds = best_seconds(runs, sizes.repeats, device)  # ours already runs on pipeline.py's one thread
    rate = {name: limit / s for name, s in seconds.items()}
    return {"config": {k: config[k] for k in ("num_hidden_layers", "width", "batch_size", "optimizer", "lr")},
            "steps": sizes.mlp_steps, "images_per_s": rate, "step_ms": {k: 1e3 * s / sizes.mlp_steps
                                                                        for k, s in seconds.items()},
            "speedup": rate["ours"] / rate["conventional"],
            "logging_cost": 1 - seconds["ours_no_logging"] / seconds["ours"], "warmup_s": ours.warmup_seconds}


def bench_cnn(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes, amp: bool,
              compile_model: bool) -> dict:
    """Section 2: the ResNet-20-shaped CNN on CIFAR-10 with crops and flips, ours against the conventional
    DataLoader loop, in images/s and GFLOP/s next to a large matmul."""
    print("ResNet on CIFAR-10 ...", file=sys.stderr, flush=True)
    config = pipeline_config(RESNET20_FLAGS, device, sizes, amp)
    limit = sizes.cnn_steps * config["batch_size"]
    ours = our_trainer(config, raw, device, limit, sizes.warmup_steps, compile_model)
    flops = training_flops(pipeline.build_run_model(config), ours.train.images[:config["batch_size"]],
                           ours.train.labels[:config["batch_size"]])
    conventional = conventional_trainer(config, conventional_cifar10_loader(data_root, sizes.batch_size), device,
                                        sizes.cnn_steps, sizes.warmup_steps, log_grad_norms=False)
    runs = {"ours": ours.train_epoch, "conventional": conventional}
    seconds = best_seconds(with_one_thread_lever(runs, device), sizes.repeats, device)
    print("matmul ceiling ...", file=sys.stderr, flush=True)
    ceiling = matmul_gflops(sizes.matmul_size, sizes.matmul_count, sizes.repeats, device)
    gflops = {name: flops * sizes.cnn_steps / s / 1e9 for name, s in seconds.items()}
    rate = {name: limit / s for name, s in seconds.items()}
    return {"config": {k: config[k] for k in ("num_levels", "out_channels", "num_conv_per_level", "residual_step",
                                              "stem", "batch_size", "augment", "grad_log_every")},
            "steps": sizes.cnn_steps, "flops_per_step": flops, "images_per_s": rate,
            "step_ms": {k: 1e3 * s / sizes.cnn_steps for k, s in seconds.items()},
            "gflops": gflops, "matmul_size": sizes.matmul_size, "matmul_gflops": ceiling,
            "speedup": rate["ours"] / rate["conventional"],
            "fraction_of_matmul": gflops["ours"] / ceiling, "warmup_s": ours.warmup_seconds}


def bench_cam(raw: RawData, device: torch.device, sizes: Sizes) -> dict:
    """Section 3: class activation maps per second for a batch of test images, on a random ResNet-20."""
    print("CAM ...", file=sys.stderr, flush=True)
    config = pipeline_config(RESNET20_FLAGS, device, sizes)
    info = DATASETS["CIFAR10"]
    model = pipeline.build_run_model(config).eval()
    images = normalize(raw.test_images[:sizes.cam_images], info, device, channels_last=True)
    classes = raw.test_labels[:sizes.cam_images].to(device)

    def maps() -> torch.Tensor:
        return class_activation_maps(model, images, classes)[0]

    shape = list(maps().shape)
    seconds = best_seconds({"cam": maps}, sizes.repeats, device)["cam"]
    return {"images": len(images), "map_shape": shape, "seconds": seconds,
            "maps_per_s": len(images) / seconds}


def exercise1_flags(data_root: str | Path, device: torch.device, sizes: Sizes, depths: tuple[int, ...],
                    amp: bool) -> list[str]:
    """pipeline.py's flags for Exercise 1: MLPs of every depth, width 16, Adam 3e-4, gradient norms logged."""
    flags = ["--model_name", "MLP", "--dataset", "MNIST", "--data_root", str(data_root), "--no-download",
             "--num_hidden_layers", *map(str, depths), "--width", "16", "--num_epochs", str(sizes.exercise1_epochs),
             "--batch_size", str(sizes.batch_size), "--optimizer", "adam", "--lr", "3e-4", "--grad_log_every", "1",
             "--val_size", str(sizes.val_size), "--device", str(device)]
    return flags + (["--limit_train", str(sizes.limit_train)] if sizes.limit_train else []) + (
        ["--amp"] if amp else [])


def run_exercise1(data_root: str | Path, device: torch.device, sizes: Sizes, amp: bool) -> dict:
    """Exercise 1 for real: pipeline.main over every depth into a temporary folder (checkpoints, plots and all)."""
    print(f"Exercise 1 for real ({len(sizes.exercise1_depths)} depths x {sizes.exercise1_epochs} epochs) ...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as out_dir, contextlib.redirect_stdout(io.StringIO()):
        args = pipeline.get_args_parser().parse_args(
            exercise1_flags(data_root, device, sizes, sizes.exercise1_depths, amp) + ["--out_dir", out_dir])
        start = time.perf_counter()
        runs = pipeline.main(args)
        seconds = time.perf_counter() - start
    per_depth = {str(config["num_hidden_layers"]): sum(e["seconds"] for e in history["epochs"])
                 for config, history in runs}
    return {"estimated": False, "seconds": seconds, "epoch_seconds_per_depth": per_depth}


def training_images(raw: RawData, config: dict, sizes: Sizes) -> int:
    """How many images an exercise trains on: the training set less the validation images (or the tests' limit)."""
    return len(raw.train_labels) - config["val_size"] if sizes.limit_train is None else sizes.limit_train


def steps_per_epoch(raw: RawData, config: dict, sizes: Sizes) -> int:
    """Training steps in one epoch of an exercise, as train_one_epoch batches it."""
    return len(batch_indices(training_images(raw, config, sizes), config["batch_size"], torch.Generator()))


def estimate_exercise1(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes, amp: bool) -> dict:
    """Exercise 1 estimated: per depth, measured training steps and one validation pass, times the full count.
    Loading, checkpoints and plots are left out."""
    print("Exercise 1 estimate ...", file=sys.stderr, flush=True)
    per_depth = {}
    for depth in sizes.exercise1_depths:
        config = pipeline_config(exercise1_flags(data_root, device, sizes, (depth,), amp), device, sizes, amp)
        limit = sizes.exercise1_sample_steps * config["batch_size"]
        trainer = our_trainer(config, raw, device, limit, sizes.warmup_steps)
        train_seconds = best_seconds({"train": trainer.train_epoch}, sizes.repeats, device)["train"]
        eval_seconds = best_seconds({"eval": lambda: evaluate(trainer.model, trainer.val, amp=amp)}, 1,
                                    device)["eval"]
        step_seconds = train_seconds / sizes.exercise1_sample_steps
        per_depth[str(depth)] = steps_per_epoch(raw, config, sizes) * step_seconds + eval_seconds
    test_seconds = len(raw.test_labels) / config["val_size"] * eval_seconds  # the last depth's, once per run
    seconds = sizes.exercise1_epochs * sum(per_depth.values()) + len(per_depth) * test_seconds
    return {"estimated": True, "seconds": seconds, "epoch_seconds_per_depth": per_depth,
            "note": f"from {sizes.exercise1_sample_steps} timed steps and one validation pass per depth; "
                    "data loading, checkpoints and plots not included"}


def exercise2_epoch(raw: RawData, device: torch.device, sizes: Sizes, cnn: dict, amp: bool) -> dict:
    """One epoch of the Exercise 2 network (training and validation): timed for real, or estimated from the
    measured CNN step time and an evaluation of `eval_sample` images scaled to the validation split."""
    config = pipeline_config(RESNET20_FLAGS, device, sizes, amp)
    if sizes.exercise2_real:
        print("Exercise 2, one real epoch ...", file=sys.stderr, flush=True)
        trainer = our_trainer(config, raw, device, sizes.limit_train, sizes.warmup_steps)
        seconds = best_seconds({"epoch": lambda: (trainer.train_epoch(), evaluate(trainer.model, trainer.val,
                                                                                  amp=amp))}, 1, device)["epoch"]
        return {"estimated": False, "seconds": seconds, "train_images": len(trainer.train)}
    info = DATASETS["CIFAR10"]
    model = pipeline.build_run_model(config)
    sample = Split(normalize(raw.train_images[:sizes.eval_sample], info, device, channels_last=True),
                   raw.train_labels[:sizes.eval_sample].to(device))
    evaluate(model, sample, amp=amp)
    eval_seconds = best_seconds({"eval": lambda: evaluate(model, sample, amp=amp)}, 1, device)["eval"]
    steps = steps_per_epoch(raw, config, sizes)
    seconds = steps * cnn["step_ms"]["ours"] / 1e3 + config["val_size"] / len(sample) * eval_seconds
    return {"estimated": True, "seconds": seconds, "train_images": training_images(raw, config, sizes),
            "note": f"{steps} steps at the measured CNN step time, plus validation scaled from {len(sample)} images"}


def check_targets(results: dict) -> list[dict]:
    """The performance targets, each with its measured value and whether it is met."""
    mlp, cnn, ex1 = results["mlp"], results["cnn"], results["exercises"]["exercise1"]
    targets = [("MLP training vs conventional", mlp["speedup"], ">=", 8.0, "x"),
               ("gradient-norm logging cost", mlp["logging_cost"], "<=", 0.10, "of step time"),
               ("CNN training vs conventional", cnn["speedup"], ">=", 1.3, "x"),
               ("CNN GFLOP/s vs matmul", cnn["fraction_of_matmul"], ">=", 0.45, "of matmul"),
               ("Exercise 1 wall time" + (" (estimate)" if ex1["estimated"] else ""), ex1["seconds"], "<", 300.0,
                "s")]
    met = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    return [{"name": name, "value": value, "unit": unit, "met": bool(met[op](value, bound)),
             "target": f"{op} {format_value(bound, unit)}"} for name, value, op, bound, unit in targets]


def format_value(value: float, unit: str) -> str:
    """A target's value for the table: fractions as percentages, speed-ups as 8.0x, times in seconds."""
    if unit.startswith("of "):
        return f"{value:.1%} {unit}"
    return f"{value:.2f}x" if unit == "x" else f"{value:.1f} {unit}"


def format_table(results: dict) -> str:
    """The results as a plain-text table."""
    mlp, cnn, cam, ex, meta = (results[k] for k in ("mlp", "cnn", "cam", "exercises", "meta"))

    def rates(section: dict, labels: dict[str, str], extra: Callable[[str], str]) -> list[tuple[str, str, str]]:
        return [(f"  {label}", f"{section['images_per_s'][key]:,.0f} img/s", extra(key))
                for key, label in labels.items() if key in section["images_per_s"]]

    rows = [(f"MLP 22x16 on MNIST, batch {mlp['config']['batch_size']}", "", "")]
    rows += rates(mlp, {"ours": "ours, grad-norm log every step", "ours_no_logging": "ours, no grad-norm log",
                        "conventional": "conventional (DataLoader, .item() norms)"},
                  lambda key: f"{mlp['step_ms'][key]:.2f} ms/step")
    rows.append((f"ResNet-20 shape on CIFAR-10, batch {cnn['config']['batch_size']}, crops+flips", "",
                 f"{cnn['flops_per_step'] / 1e9:.2f} GFLOP/step"))
    rows += rates(cnn, {"ours": "ours (batch augment, channels_last)", "ours_1_thread": "ours, set_num_threads(1)",
                        "conventional": "conventional (PIL transforms, 2 workers)"},
                  lambda key: f"{cnn['gflops'][key]:.1f} GFLOP/s")
    rows.append((f"  float32 matmul {cnn['matmul_size']}^3 (ceiling)", f"{cnn['matmul_gflops']:.1f} GFLOP/s", ""))
    rows.append((f"CAM, ResNet-20 shape, batch of {cam['images']}", f"{cam['maps_per_s']:,.0f} maps/s",
                 f"maps {tuple(cam['map_shape'])}"))
    for key, label in (("exercise1", "Exercise 1 (9 MLP depths x 10 epochs)"),
                       ("exercise2_epoch", "Exercise 2, one epoch (train + val)")):
        rows.append((label, f"{ex[key]['seconds']:.1f} s", "estimate" if ex[key]["estimated"] else "measured"))
    rows.append(("Targets", "", ""))
    for t in results["targets"]:
        rows.append((f"  {t['name']}", format_value(t["value"], t["unit"]).split(" of ")[0],
                     f"target {t['target']}: {'met' if t['met'] else 'NOT met'}"))
    width = max(len(r[0]) for r in rows) + 2
    vwidth = max(len(r[1]) for r in rows) + 2
    header = (f"bench.py {'--quick ' if meta['quick'] else ''}on {meta['device']} ({meta['threads']} threads, "
              f"torch {meta['torch']}); best of {meta['repeats']} repeats")
    lines = [header, "-" * len(header)] + [f"{a:<{width}}{b:>{vwidth}}  {c}".rstrip() for a, b, c in rows]
    busy = meta["load_average_at_start"][0]
    if busy >= BUSY_LOAD:
        lines.append(f"warning: the machine was busy before we started (load average {busy:.1f} on "
                     f"{meta['cpu_count']} cores): every rate here is pessimistic and noisy")
    return "\n".join(lines)


def main(args: argparse.Namespace, sizes: Sizes | None = None) -> dict:
    """Run every measurement, print the table, write the JSON; return the results."""
    device = resolve_device(args.device)
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (torch's default) or positive, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes or (QUICK if args.quick else FULL)
    start, load_at_start = time.perf_counter(), os.getloadavg()
    mnist = load_dataset("MNIST", args.data_root, download=False)
    cifar = load_dataset("CIFAR10", args.data_root, download=False)
    results = {"meta": {"torch": torch.__version__, "numpy": np.__version__, "device": str(device),
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(), "quick": args.quick,
                        "compile": args.compile, "amp": args.amp, "repeats": sizes.repeats, "sizes": asdict(sizes)}}
    results["mlp"] = bench_mlp(mnist, args.data_root, device, sizes, args.amp, args.compile)
    results["cnn"] = bench_cnn(cifar, args.data_root, device, sizes, args.amp, args.compile)
    results["cam"] = bench_cam(cifar, device, sizes)
    exercise1 = (run_exercise1(args.data_root, device, sizes, args.amp) if sizes.exercise1_sample_steps == 0
                 else estimate_exercise1(mnist, args.data_root, device, sizes, args.amp))
    results["exercises"] = {"exercise1": exercise1,
                            "exercise2_epoch": exercise2_epoch(cifar, device, sizes, results["cnn"], args.amp)}
    results["targets"] = check_targets(results)
    results["meta"].update(seconds=time.perf_counter() - start, load_average_at_start=load_at_start,
                           load_average_at_end=os.getloadavg())
    print(format_table(results))
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
