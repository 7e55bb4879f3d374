"""How fast the lab's training code is, against the loop most course code uses, on the same data in one process.

    python bench.py --quick    # a few minutes on 2 CPU cores
    python bench.py            # about 5 minutes on 2 CPU cores: Exercise 1's seed 0 and an epoch for real

Prints a table and writes the numbers to --out (JSON). Every rate is the best of a few timed repeats of a fixed number
of steps after a warm-up, the contenders interleaved so that a busy neighbour slows them alike; the clock is
time.perf_counter, with CUDA synchronised before it is read. Every row sets its own CPU thread count around each of
its timed calls and puts the previous count back, and records what it runs (threads, memory format, precision, data
path, optimizer, gradient-norm log): the table's labels are made from those records and nothing else.

The conventional loop below exists only to be measured against: it is written plainly, the way course code writes
it, and is not used anywhere else. The MLP's ablation switches our levers on in that loop one at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
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
from cam import class_activation_maps
from config import RunConfig
from data import (CIFAR10_FOLDER, CIFAR10_TRAIN_FILES, DATASETS, DatasetError, RawData, Split, TrainLoader,
                  load_dataset, normalize, num_batches, read_cifar10_batches)
from models import build_model
from train import (RunSetup, amp_precision, cpu_threads, evaluate, logged_weights, prepare_run, train_one_epoch,
                   use_cudnn_benchmark, uses_channels_last)
from utils import ArgumentParser, UsageError, resolve_device, run_cli, seed_everything, write_json

BATCH_SIZE = 128
MLP_FLAGS = ["--model_name", "MLP", "--dataset", "MNIST", "--width", "16", "--num_hidden_layers", "22",
             "--optimizer", "adam", "--lr", "3e-4", "--grad_log_every", "1"]
RESNET20_FLAGS = ["--preset", "resnet20", "--augment", "--optimizer", "adam", "--lr", "3e-4", "--grad_log_every", "1"]
# Exercise 1 as the README runs it: 9 depths x plain/residual x 5 seeds = 90 runs of 10 epochs
EXERCISE1_DEPTHS = (2, 6, 10, 14, 18, 22, 26, 30, 34)
EXERCISE1_RESIDUAL_STEPS = (0, 2)
EXERCISE1_SEEDS = (0, 1, 2, 3, 4)
EXERCISE1_SECONDS = 480.0  # the target: the 90 runs of Exercise 1 in 8 minutes
BUSY_LOAD = 1.0  # a 1-minute load average this high before we start means other work shares the cores

# what a row records, in the words of the table
RESIDENT = "resident tensors, index batches"
BATCH_AUGMENT = ", batch crop+flip"
MNIST_LOADER = "DataLoader, per-image ToTensor+Normalize"
CIFAR10_LOADER = "DataLoader (2 workers), per-image PIL crop+flip"
FUSED_NORMS = "_foreach_norm each step"
ITEM_NORMS = ".item() per weight each step"
NO_NORMS = "off"
FLOAT32 = "float32"
PRECISIONS = {"float32": FLOAT32, "bfloat16": "bfloat16 autocast", "float16": "float16 autocast, GradScaler"}
CPU_ISA = {"AVX2": torch.cpu._is_avx2_supported, "AVX-512": torch.cpu._is_avx512_supported,
           "AVX512-BF16": torch.cpu._is_avx512_bf16_supported, "AMX": torch.cpu._is_amx_tile_supported}
OURS, CONVENTIONAL = "ours", "conventional loop"
CONVENTIONAL_ROWS = ("conventional", "conventional_1_thread")  # the conventional loop at each thread count tried
# the MLP's ablation: the conventional loop, then our levers switched on one at a time, in this order
ABLATION = (("plus_resident_data", {"data": RESIDENT}), ("plus_one_thread", {"threads": 1}),
            ("plus_fused_optimizer", {"fused_optimizer": True}), ("plus_fused_norms", {"grad_norms": FUSED_NORMS}))
ROW_NAMES = {"ours": "ours", "ours_no_logging": "ours, norm log off", "ours_amp": "ours, --amp",
             "ours_1_thread": "ours, 1 thread", "ours_contiguous": "ours, contiguous",
             "conventional": "conventional loop",
             "conventional_1_thread": "conventional loop, 1 thread", "plus_resident_data": "+ resident data",
             "plus_one_thread": "+ one thread", "plus_fused_optimizer": "+ fused Adam",
             "plus_fused_norms": "+ fused norm log"}


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
    exercise1_depths: tuple[int, ...]  # Exercise 1's sweep: hidden layers x residual steps x seeds
    exercise1_residual_steps: tuple[int, ...]
    exercise1_seeds: tuple[int, ...]  # only the first seed's runs are timed: the others do the same work
    exercise1_epochs: int
    exercise1_sample_steps: int  # steps timed per run to estimate Exercise 1; 0 runs it for real
    resnet20_epoch_real: bool  # time a real epoch of the ResNet-20 shape rather than estimate it from the CNN rate
    eval_sample: int  # validation images evaluated to estimate an evaluation pass
    limit_train: int | None = None  # train the exercises on fewer images (tests only)
    batch_size: int = BATCH_SIZE  # of every training run here (smaller in tests only)


QUICK = Sizes(mlp_steps=100, cnn_steps=3, warmup_steps=3, repeats=5, matmul_size=2048, matmul_count=2,
              cam_images=256, val_size=5000, exercise1_depths=EXERCISE1_DEPTHS,
              exercise1_residual_steps=EXERCISE1_RESIDUAL_STEPS, exercise1_seeds=EXERCISE1_SEEDS,
              exercise1_epochs=10, exercise1_sample_steps=30, resnet20_epoch_real=False, eval_sample=1000)
FULL = Sizes(mlp_steps=200, cnn_steps=8, warmup_steps=5, repeats=5, matmul_size=2048, matmul_count=5,
             cam_images=256, val_size=5000, exercise1_depths=EXERCISE1_DEPTHS,
             exercise1_residual_steps=EXERCISE1_RESIDUAL_STEPS, exercise1_seeds=EXERCISE1_SEEDS,
             exercise1_epochs=10, exercise1_sample_steps=0, resnet20_epoch_real=True, eval_sample=1000)


@dataclass(frozen=True)
class Options:
    """What the command line decides about the rows."""
    threads: int  # pipeline.py's --threads for our rows and the exercises (0: its own policy, train.cpu_threads)
    conventional_threads: int  # of the conventional loop (also timed on 1), CAM and the matmul
    amp: bool  # --amp (train.amp_precision) in our rows and the exercises
    compile_model: bool  # torch.compile the model in our training rows


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The benchmark's flags; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = ArgumentParser(description="Benchmark the lab's training code against the conventional DataLoader "
                            "loop, a float32 matmul for reference, CAM and whole exercises.", add_help=add_help)
    parser.add("--data_root", default="data", help="folder holding MNIST/raw and cifar-10-batches-py")
    parser.add("--download", action=argparse.BooleanOptionalAction, default=True,
               help="download MNIST and CIFAR-10 through torchvision when they are missing, as pipeline.py does")
    parser.add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add("--quick", action="store_true", default=False,
               help="short run: fewer steps, and Exercise 1 and the ResNet-20 epoch estimated rather than run")
    parser.add("--out", default="bench_results/bench.json", help="JSON file for the results")
    parser.add("--threads", type=int, default=0,
               help="CPU threads: pipeline.py's --threads for our rows and the exercises (0 = its policy: 1 for the "
                    "MLP, every core for CNNs), and the thread count of the conventional loop, CAM and the matmul "
                    "(0 = torch's default, every core); the conventional loop and our CNN are also timed on 1")
    parser.add("--mnist_only", action="store_true", default=False,
               help="only what needs MNIST alone: the MLP, its ablation and Exercise 1 (no CIFAR-10 is read)")
    parser.add("--compile", action="store_true", default=False,
               help="torch.compile the model in our training rows (the conventional loop and the exercises stay "
                    "eager)")
    parser.add("--amp", action="store_true", default=False,
               help="pipeline.py's --amp in our rows and the exercises (the conventional loop stays float32); "
                    "without it our MLP and CNN also get an --amp row where the device has a faster precision")
    return parser


@contextlib.contextmanager
def torch_settings(threads: int | None = None) -> Iterator[None]:
    """Run the block on `threads` CPU threads (None: on as many as now), then put the thread count and cuDNN's
    benchmark flag back as they were (pipeline.main sets both for the whole process)."""
    before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.backends.cudnn.benchmark = before[1]


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


def warm_up(run: Callable[[], object], device: torch.device) -> float:
    """Run a warm-up once (compiling, allocating, filling caches) and return its wall time."""
    return best_seconds({"warmup": run}, 1, device)["warmup"]


def run_flags(device: torch.device, sizes: Sizes, options: Options) -> list[str]:
    """The pipeline.py flags every run here shares: validation and batch size, device, threads and precision."""
    return (["--val_size", str(sizes.val_size), "--batch_size", str(sizes.batch_size), "--device", str(device),
             "--threads", str(options.threads)] + (["--amp"] if options.amp else []))


def pipeline_config(flags: list[str], device: torch.device, sizes: Sizes, options: Options) -> RunConfig:
    """The run config pipeline.py builds from these flags, so that we time exactly what it trains."""
    args = pipeline.get_args_parser().parse_args(flags + run_flags(device, sizes, options))
    return pipeline.run_configs(args, device)[0]


@dataclass(frozen=True)
class Setup:
    """What a measured training loop runs; the table's label of its row is made from these fields."""
    code: str  # OURS (train.train_one_epoch on what train.prepare_run sets up) or CONVENTIONAL
    threads: int  # torch CPU threads during every timed call
    memory_format: str  # of the convolution weights and the batches: channels_last or contiguous
    precision: str  # a value of PRECISIONS
    data: str  # where the batches come from
    optimizer: str  # "fused Adam", or "Adam" (torch's default implementation)
    grad_norms: str  # how the gradient norm of every weight is logged (FUSED_NORMS, ITEM_NORMS), or NO_NORMS
    compiled: bool = False  # torch.compile


@dataclass
class Contender:
    """One measured training loop, set up and warmed up: `train()` trains `images` images on `setup.threads`
    CPU threads and puts the previous thread count back."""
    setup: Setup
    model: nn.Module  # what it trains (before torch.compile), for hooks and FLOP counts
    train: Callable[[], object]
    images: int
    warmup_seconds: float
    run: RunSetup | None = None  # ours only: the run it trains


def run_settings(config: RunConfig, contiguous: bool = False) -> dict:
    """Threads, memory format, precision and data path of a run of ours, by pipeline.py's own policies
    (train.cpu_threads, train.uses_channels_last); `contiguous` when we store a channels_last run contiguously."""
    on_cpu = torch.device(config.device).type == "cpu"  # pipeline.py leaves the thread count alone on CUDA
    return {"threads": cpu_threads(config) if on_cpu else torch.get_num_threads(),
            "memory_format": "channels_last" if uses_channels_last(config) and not contiguous else "contiguous",
            "precision": PRECISIONS[config.precision],
            "data": RESIDENT + (BATCH_AUGMENT if config.augment else "")}


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """"fused Adam", or "Adam" when it runs torch's default (unfused) implementation."""
    return ("fused " if optimizer.defaults.get("fused") else "") + type(optimizer).__name__


def our_trainer(config: RunConfig, raw: RawData, limit_train: int | None, warmup_steps: int,
                compile_model: bool = False, contiguous: bool = False) -> Contender:
    """Our training code as pipeline.py runs this config (train.prepare_run, then train.train_one_epoch on
    train.cpu_threads(config) threads) on its first `limit_train` training images, warmed up on `warmup_steps`
    batches. `contiguous` stores the model and the data contiguously after all, to measure what channels_last gains."""
    run = prepare_run(replace(config, limit_train=limit_train), raw)
    if contiguous:
        run.model.to(memory_format=torch.contiguous_format)
        run.train.images = run.train.images.contiguous()
        run.val = Split(run.val.images.contiguous(), run.val.labels)
    if compile_model:
        run.net = torch.compile(run.model)
    settings = run_settings(config, contiguous)

    def train_epoch(trained: RunSetup = run):
        with torch_settings(settings["threads"]):
            return train_one_epoch(trained, 1, 0)

    warm = min(warmup_steps * config.batch_size, len(run.train.labels))
    warmup = replace(run, train=copy.copy(run.train))  # the same order and augmentation over the first images
    warmup.train.images, warmup.train.labels = run.train.images[:warm], run.train.labels[:warm]
    seconds = warm_up(lambda: train_epoch(warmup), torch.device(config.device)) if warm else 0.0
    setup = Setup(OURS, **settings, optimizer=optimizer_name(run.optimizer),
                  grad_norms=norm_log(config.grad_log_every), compiled=compile_model)
    return Contender(setup, run.model, train_epoch, len(run.train.labels), seconds, run)


def amp_row(config: RunConfig) -> RunConfig | None:
    """Our run with pipeline.py's --amp, where it chooses another precision than float32 on this device and the
    run does not use --amp already; else None."""
    precision = amp_precision(torch.device(config.device))
    return None if config.amp or precision == "float32" else replace(config, amp=True, precision=precision)


def cpu_description() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) and the instruction sets that decide its speed
    and --amp's precision, as torch detects them."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}; " + ", ".join(f"{isa} {'yes' if has() else 'no'}" for isa, has in CPU_ISA.items())


def norm_log(every: int) -> str:
    """How our training code logs gradient norms when it logs them every `every` steps."""
    if every == 0:
        return NO_NORMS
    return FUSED_NORMS if every == 1 else f"{FUSED_NORMS}, every {every} steps"


def validate(ours: Contender, split: Split) -> tuple[float, float]:
    """train.evaluate of our trainer's model on `split`, on the trainer's thread count."""
    with torch_settings(ours.setup.threads):
        return evaluate(ours.run.net, split, precision=ours.run.config.precision)


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
    pickles whose md5 differs from the official files (as rebuilt copies do).
    """
    info = DATASETS["CIFAR10"]
    images, labels = read_cifar10_batches(Path(data_root) / CIFAR10_FOLDER, CIFAR10_TRAIN_FILES)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    return DataLoader(CIFAR10Images(images, labels, transform), batch_size=batch_size, shuffle=True, num_workers=2)


def loader_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches moved to `device`, epoch after epoch."""
    while True:
        for images, labels in loader:
            yield images.to(device), labels.to(device)


def resident_batches(loader: TrainLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches our loader serves from tensors already on the device, epoch after epoch."""
    while True:
        yield from loader


def conventional_trainer(config: RunConfig, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], data: str,
                         threads: int, fused_optimizer: bool, grad_norms: str, steps: int,
                         warmup_steps: int) -> Contender:
    """The usual course training loop over `batches` (which `data` describes), warmed up: a contiguous float32
    model, Adam (fused, or torch's default), the gradient norms logged as `grad_norms` says, a `.item()` of the loss
    every step; `train()` trains `steps` steps on `threads` CPU threads."""
    if grad_norms not in (FUSED_NORMS, ITEM_NORMS, NO_NORMS):
        raise ValueError(f"unknown gradient-norm log {grad_norms!r}")
    seed_everything(config.seed)
    model = build_model(config).to(config.device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True if fused_optimizer else None)
    weights = logged_weights(model)
    logged = []

    def train_steps(count: int = steps) -> float:
        with torch_settings(threads):
            model.train()
            running_loss = 0.0
            for _ in range(count):
                images, labels = next(batches)
                optimizer.zero_grad()
                loss = criterion(model(images), labels)
                loss.backward()
                if grad_norms == ITEM_NORMS:
                    logged.append({name: w.grad.norm().item() for name, w in weights.items()})
                elif grad_norms == FUSED_NORMS:
                    logged.append(torch.stack(torch._foreach_norm([w.grad for w in weights.values()])))
                optimizer.step()
                running_loss += loss.item()
            return running_loss / count

    seconds = warm_up(lambda: train_steps(warmup_steps), torch.device(config.device)) if warmup_steps else 0.0
    setup = Setup(CONVENTIONAL, threads, memory_format(model), FLOAT32, data, optimizer_name(optimizer), grad_norms)
    return Contender(setup, model, train_steps, steps * config.batch_size, seconds)


def memory_format(model: nn.Module) -> str:
    """channels_last when the model's convolution weights are stored so, else contiguous."""
    convs = [p for p in model.parameters() if p.ndim == 4]
    return "channels_last" if any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                  for p in convs) else "contiguous"


def training_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward and backward pass over a batch, as torch.utils.flop_counter counts them
    (matmuls and convolutions; a multiply-add is 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(size: int, count: int, repeats: int, device: torch.device, threads: int) -> float:
    """GFLOP/s of `count` float32 (size x size) @ (size x size) matmuls on `threads` threads: what this machine
    can reach."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)

    def matmuls():
        with torch_settings(threads):
            for _ in range(count):
                torch.mm(a, b, out=out)

    matmuls()
    seconds = best_seconds({"matmul": matmuls}, repeats, device)["matmul"]
    return 2 * size ** 3 * count / seconds / 1e9


def measure(contenders: dict[str, Contender], steps: int, repeats: int, device: torch.device) -> dict[str, dict]:
    """Time the contenders interleaved; each row is its setup with its images/s and milliseconds per step."""
    seconds = best_seconds({name: c.train for name, c in contenders.items()}, repeats, device)
    return {name: dict(asdict(c.setup), images_per_s=c.images / seconds[name], step_ms=1e3 * seconds[name] / steps)
            for name, c in contenders.items()}


def best_conventional(rows: dict[str, dict]) -> str:
    """The conventional loop's row at its fastest thread count."""
    return max((name for name in CONVENTIONAL_ROWS if name in rows), key=lambda name: rows[name]["images_per_s"])


def mlp_contenders(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes,
                   options: Options) -> dict[str, Contender]:
    """Section 1's loops: ours with and without the gradient-norm log, the conventional loop on
    options.conventional_threads and on one thread, and the ablation (ABLATION, starting from the conventional
    loop; a lever that would change nothing, such as one thread where there is one already, is left out)."""
    config = pipeline_config(MLP_FLAGS, device, sizes, options)
    limit = sizes.mlp_steps * config.batch_size
    ours = our_trainer(config, raw, limit, sizes.warmup_steps, options.compile_model)
    contenders = {"ours": ours, "ours_no_logging": our_trainer(replace(config, grad_log_every=0), raw, limit,
                                                               sizes.warmup_steps, options.compile_model)}
    if amp_row(config):
        contenders["ours_amp"] = our_trainer(amp_row(config), raw, limit, sizes.warmup_steps, options.compile_model)

    def conventional(**loop) -> Contender:
        resident = TrainLoader(Split(ours.run.train.images, ours.run.train.labels), config.batch_size, config.seed)
        batches = (resident_batches(resident) if loop["data"] == RESIDENT
                   else loader_batches(conventional_mnist_loader(data_root, config.batch_size), device))
        return conventional_trainer(config, batches, steps=sizes.mlp_steps, warmup_steps=sizes.warmup_steps, **loop)

    loop = {"data": MNIST_LOADER, "threads": options.conventional_threads, "fused_optimizer": False,
            "grad_norms": ITEM_NORMS}
    contenders["conventional"] = conventional(**loop)
    if device.type == "cpu" and loop["threads"] > 1:
        contenders["conventional_1_thread"] = conventional(**dict(loop, threads=1))
    for name, lever in ABLATION:
        if dict(loop, **lever) != loop:
            loop = dict(loop, **lever)
            contenders[name] = conventional(**loop)
    return contenders


def bench_mlp(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes, options: Options) -> dict:
    """Section 1: the 22-hidden-layer MLP on MNIST: ours with and without the gradient-norm log, the conventional
    loop with a DataLoader and per-weight `.item()` norms at its thread counts, and the ablation between them."""
    print("MLP on MNIST ...", file=sys.stderr, flush=True)
    contenders = mlp_contenders(raw, data_root, device, sizes, options)
    rows = measure(contenders, sizes.mlp_steps, sizes.repeats, device)
    conventional = best_conventional(rows)
    config = contenders["ours"].run.config
    return {"config": {k: getattr(config, k) for k in ("num_hidden_layers", "width", "batch_size", "optimizer", "lr")},
            "steps": sizes.mlp_steps, "rows": rows,
            "ablation": ["conventional"] + [name for name, _ in ABLATION if name in rows],
            "speedup": rows["ours"]["images_per_s"] / rows[conventional]["images_per_s"],
            "speedup_over": conventional,
            "logging_cost": 1 - rows["ours_no_logging"]["step_ms"] / rows["ours"]["step_ms"],
            "warmup_s": contenders["ours"].warmup_seconds}


def cnn_contenders(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes,
                   options: Options) -> dict[str, Contender]:
    """Section 2's loops: ours as pipeline.py runs it, again on one thread and again stored contiguously (where
    it runs on more threads and channels_last), and the conventional loop at options.conventional_threads and 1."""
    config = pipeline_config(RESNET20_FLAGS, device, sizes, options)
    limit = sizes.cnn_steps * config.batch_size

    def ours(run_config: RunConfig = config, contiguous: bool = False) -> Contender:
        return our_trainer(run_config, raw, limit, sizes.warmup_steps, options.compile_model, contiguous)

    def conventional(threads: int) -> Contender:
        batches = loader_batches(conventional_cifar10_loader(data_root, config.batch_size), device)
        return conventional_trainer(config, batches, CIFAR10_LOADER, threads, False, NO_NORMS, sizes.cnn_steps,
                                    sizes.warmup_steps)

    contenders = {"ours": ours()}
    if amp_row(config):
        contenders["ours_amp"] = ours(amp_row(config))
    if device.type == "cpu" and contenders["ours"].setup.threads > 1:
        contenders["ours_1_thread"] = ours(replace(config, threads=1))
    if uses_channels_last(config):
        contenders["ours_contiguous"] = ours(contiguous=True)
    contenders["conventional"] = conventional(options.conventional_threads)
    if device.type == "cpu" and options.conventional_threads > 1:
        contenders["conventional_1_thread"] = conventional(1)
    return contenders


def bench_cnn(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes, options: Options) -> dict:
    """Section 2: the ResNet-20-shaped CNN on CIFAR-10 with crops and flips, ours against the conventional
    DataLoader loop, in images/s and GFLOP/s next to a large matmul."""
    print("ResNet on CIFAR-10 ...", file=sys.stderr, flush=True)
    contenders = cnn_contenders(raw, data_root, device, sizes, options)
    ours = contenders["ours"]
    batch = ours.run.config.batch_size
    flops = training_flops(ours.model, ours.run.train.images[:batch], ours.run.train.labels[:batch])
    rows = measure(contenders, sizes.cnn_steps, sizes.repeats, device)
    for row in rows.values():
        row["gflops"] = flops / row["step_ms"] / 1e6
    print("matmul reference ...", file=sys.stderr, flush=True)
    matmul = matmul_gflops(sizes.matmul_size, sizes.matmul_count, sizes.repeats, device, options.conventional_threads)
    conventional = best_conventional(rows)
    contiguous = rows.get("ours_contiguous")
    fields = ("num_levels", "out_channels", "num_conv_per_level", "residual_step", "stem", "batch_size", "augment",
              "grad_log_every")
    return {"config": {k: getattr(ours.run.config, k) for k in fields},
            "steps": sizes.cnn_steps, "flops_per_step": flops, "rows": rows, "matmul_size": sizes.matmul_size,
            "matmul_threads": options.conventional_threads, "matmul_gflops": matmul,
            "speedup": rows["ours"]["images_per_s"] / rows[conventional]["images_per_s"],
            "speedup_over": conventional,
            "channels_last_speedup": rows["ours"]["images_per_s"] / contiguous["images_per_s"] if contiguous else None,
            "fraction_of_matmul": rows["ours"]["gflops"] / matmul, "warmup_s": ours.warmup_seconds}


def bench_cam(raw: RawData, device: torch.device, sizes: Sizes, options: Options) -> dict:
    """Section 3: class activation maps per second for a batch of test images, computed as cam.py computes them
    (a contiguous float32 model and images, no autograd) on a random ResNet-20, on options.conventional_threads."""
    print("CAM ...", file=sys.stderr, flush=True)
    config = pipeline_config(RESNET20_FLAGS, device, sizes, options)
    model = build_model(config).to(device).eval()
    images = normalize(raw.test_images[:sizes.cam_images], DATASETS["CIFAR10"], device)
    classes = raw.test_labels[:sizes.cam_images].to(device)

    def maps() -> torch.Tensor:
        with torch_settings(options.conventional_threads), torch.no_grad():
            return class_activation_maps(model, images, classes)[0]

    shape = list(maps().shape)
    seconds = best_seconds({"cam": maps}, sizes.repeats, device)["cam"]
    return {"images": len(images), "map_shape": shape, "seconds": seconds, "maps_per_s": len(images) / seconds,
            "threads": options.conventional_threads, "memory_format": memory_format(model), "precision": FLOAT32}


def exercise1_sweep(sizes: Sizes, seeds: tuple[int, ...]) -> list[str]:
    """pipeline.py's flags for Exercise 1 as the README runs it, with these seeds."""
    return ["--model_name", "MLP", "--dataset", "MNIST", "--num_hidden_layers", *map(str, sizes.exercise1_depths),
            "--width", "16", "--residual_step", *map(str, sizes.exercise1_residual_steps),
            "--seed", *map(str, seeds), "--num_epochs", str(sizes.exercise1_epochs)]


def exercise1_args(data_root: str | Path, device: torch.device, sizes: Sizes, options: Options,
                   seeds: tuple[int, ...], out_dir: str = "runs", jobs: int = 1) -> argparse.Namespace:
    """pipeline.py's arguments for Exercise 1 with these seeds, on our data, device, threads and precision."""
    flags = exercise1_sweep(sizes, seeds) + run_flags(device, sizes, options) + [
        "--data_root", str(data_root), "--no-download", "--out_dir", out_dir, "--jobs", str(jobs)]
    return pipeline.get_args_parser().parse_args(
        flags + (["--limit_train", str(sizes.limit_train)] if sizes.limit_train else []))


def exercise1_result(data_root: str | Path, device: torch.device, sizes: Sizes, options: Options, seconds: float,
                     epoch_seconds: dict[str, float], note: str, estimated: bool) -> dict:
    """Exercise 1's row from the timing of its first seed's runs (`seconds` already covers every seed)."""
    configs = pipeline.run_configs(exercise1_args(data_root, device, sizes, options, sizes.exercise1_seeds), device)
    return {"sweep": "pipeline.py " + " ".join(exercise1_sweep(sizes, sizes.exercise1_seeds)), "runs": len(configs),
            "runs_timed": len(epoch_seconds), "estimated": estimated, "seconds": seconds,
            "seconds_per_run": seconds / len(configs), "epoch_seconds_per_run": epoch_seconds,
            **run_settings(configs[0]), "note": note}


def exercise1_jobs(device: torch.device) -> tuple[int, ...]:
    """The --jobs values Exercise 1 is run with: 1, and 2 where there are two cores (or devices) to share."""
    workers = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    return (1, 2) if workers >= 2 else (1,)


def run_exercise1(data_root: str | Path, device: torch.device, sizes: Sizes, options: Options) -> dict:
    """Exercise 1's runs of its first seed for real with pipeline.main into a temporary folder (checkpoints,
    plots and all), once with --jobs 1 and once with --jobs 2; with more seeds, their runs are counted at the
    cost of the faster sweep."""
    seeds, wall = sizes.exercise1_seeds, {}
    for jobs in exercise1_jobs(device):
        print(f"Exercise 1 for real (seed {seeds[0]} of {len(seeds)}, --jobs {jobs}) ...", file=sys.stderr,
              flush=True)
        with (tempfile.TemporaryDirectory() as out_dir, contextlib.redirect_stdout(io.StringIO()),
              torch_settings()):
            args = exercise1_args(data_root, device, sizes, options, seeds[:1], out_dir, jobs)
            start = time.perf_counter()
            runs = pipeline.main(args)
            wall[jobs] = time.perf_counter() - start
    epoch_seconds = {config.run_name: sum(e["seconds"] for e in history["epochs"]) for config, history in runs}
    fastest = min(wall, key=wall.get)
    note = (f"--jobs {fastest}, measured" if len(seeds) == 1 else
            f"estimate: seed {seeds[0]}'s {len(runs)} runs measured with --jobs {fastest}, x {len(seeds)}")
    result = exercise1_result(data_root, device, sizes, options, len(seeds) * wall[fastest], epoch_seconds, note,
                              estimated=len(seeds) > 1)
    result.update(seconds_by_jobs={str(j): s for j, s in wall.items()}, runs_per_sweep_timed=len(runs),
                  jobs_speedup=wall[1] / wall[2] if 2 in wall else None)
    return result


def training_images(raw: RawData, config: RunConfig, sizes: Sizes) -> int:
    """How many images an exercise trains on: the training set less the validation images (or the tests' limit)."""
    return len(raw.train_labels) - config.val_size if sizes.limit_train is None else sizes.limit_train


def steps_per_epoch(raw: RawData, config: RunConfig, sizes: Sizes) -> int:
    """Training steps in one epoch of an exercise, as train_one_epoch batches it."""
    return num_batches(training_images(raw, config, sizes), config.batch_size)


def estimate_exercise1(raw: RawData, data_root: str | Path, device: torch.device, sizes: Sizes,
                       options: Options) -> dict:
    """Exercise 1 estimated: per run of the first seed, `exercise1_sample_steps` timed training steps and one
    validation pass, times the full count, plus a test pass; every seed at that cost. Loading, checkpoints and
    plots are left out."""
    print("Exercise 1 estimate ...", file=sys.stderr, flush=True)
    seeds = sizes.exercise1_seeds
    configs = pipeline.run_configs(exercise1_args(data_root, device, sizes, options, seeds[:1]), device)
    epoch_seconds, total = {}, 0.0
    for config in configs:
        trainer = our_trainer(config, raw, sizes.exercise1_sample_steps * config.batch_size, sizes.warmup_steps)
        train_seconds = best_seconds({"train": trainer.train}, sizes.repeats, device)["train"]
        val_seconds = best_seconds({"val": lambda: validate(trainer, trainer.run.val)}, 1, device)["val"]
        epoch = steps_per_epoch(raw, config, sizes) * train_seconds / sizes.exercise1_sample_steps + val_seconds
        epoch_seconds[config.run_name] = sizes.exercise1_epochs * epoch
        total += epoch_seconds[config.run_name] + len(raw.test_labels) / len(trainer.run.val) * val_seconds
    note = f"estimate from {count(sizes.exercise1_sample_steps, 'timed step')} a run" + (
        f", seed {seeds[0]}'s runs x {len(seeds)}" if len(seeds) > 1 else "")
    return exercise1_result(data_root, device, sizes, options, len(seeds) * total, epoch_seconds, note,
                            estimated=True)


def resnet20_epoch(raw: RawData, device: torch.device, sizes: Sizes, cnn: dict, options: Options) -> dict:
    """One epoch of the ResNet-20 shape on the exercise's data (training and validation): timed for real, or
    estimated from the measured step time of our CNN row and an evaluation of `eval_sample` validation images
    scaled to the whole validation split."""
    config = pipeline_config(RESNET20_FLAGS, device, sizes, options)
    if sizes.resnet20_epoch_real:
        print("ResNet-20, one real epoch ...", file=sys.stderr, flush=True)
        trainer = our_trainer(config, raw, sizes.limit_train, sizes.warmup_steps)
        seconds = best_seconds({"epoch": lambda: (trainer.train(), validate(trainer, trainer.run.val))}, 1,
                               device)["epoch"]
        return {"estimated": False, "seconds": seconds, "train_images": len(trainer.run.train.labels),
                **asdict(trainer.setup)}
    trainer = our_trainer(config, raw, config.batch_size, 0)
    sample = Split(trainer.run.val.images[:sizes.eval_sample], trainer.run.val.labels[:sizes.eval_sample])
    validate(trainer, sample)
    eval_seconds = best_seconds({"eval": lambda: validate(trainer, sample)}, 1, device)["eval"]
    steps = steps_per_epoch(raw, config, sizes)
    seconds = steps * cnn["rows"]["ours"]["step_ms"] / 1e3 + config.val_size / len(sample) * eval_seconds
    return {"estimated": True, "seconds": seconds, "train_images": training_images(raw, config, sizes),
            **asdict(trainer.setup),
            "note": f"{steps} steps at our CNN row's step time, plus validation scaled from {len(sample)} images"}


def check_targets(results: dict) -> list[dict]:
    """The performance targets, each with its measured value and whether it is met."""
    mlp, cnn, ex1 = results["mlp"], results.get("cnn"), results["exercises"]["exercise1"]
    targets = [("MLP training vs conventional at its best thread count", mlp["speedup"], ">=", 8.0, "x"),
               ("gradient-norm logging cost", mlp["logging_cost"], "<=", 0.10, "of step time")]
    if cnn is not None:
        targets += [("CNN training vs conventional at its best thread count", cnn["speedup"], ">=", 1.3, "x"),
                    ("CNN GFLOP/s vs matmul", cnn["fraction_of_matmul"], ">=", 0.45, "of matmul")]
    targets.append(("Exercise 1, all runs" + (" (estimate)" if ex1["estimated"] else ""), ex1["seconds"], "<",
                    EXERCISE1_SECONDS, "s"))
    if ex1.get("jobs_speedup") is not None:
        targets.append(("Exercise 1 with --jobs 2 vs --jobs 1", ex1["jobs_speedup"], ">=", 1.8, "x"))
    met = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    return [{"name": name, "value": value, "unit": unit, "met": bool(met[op](value, bound)),
             "target": f"{op} {format_value(bound, unit)}"} for name, value, op, bound, unit in targets]


def format_value(value: float, unit: str) -> str:
    """A target's value for the table: fractions as percentages, speed-ups as 8.0x, times in seconds."""
    if unit.startswith("of "):
        return f"{value:.1%} {unit}"
    return f"{value:.2f}x" if unit == "x" else f"{value:.1f} {unit}"


def settings_label(row: dict) -> str:
    """What a row ran, as the table prints it: threads, memory format, precision, data path, and where the row
    records them, optimizer, gradient-norm log and compilation."""
    parts = [count(row["threads"], "thread"), row["memory_format"], row["precision"], row["data"]]
    if "optimizer" in row:
        parts += [row["optimizer"], f"norms: {row['grad_norms']}"] + (["compiled"] if row["compiled"] else [])
    return ", ".join(parts)


def count(n: int, thing: str) -> str:
    """"1 thread", "2 threads"."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


def format_table(results: dict) -> str:
    """The results as a plain-text table: a line per measurement, and under it what the measurement ran."""
    mlp, ex, meta = results["mlp"], results["exercises"], results["meta"]
    rows: list[tuple[str, str, str, str]] = []  # name, value, extra, settings; a title has no value

    def title(text: str) -> None:
        rows.append((text, "", "", ""))

    def training_rows(section: dict, names, extra: Callable[[str], str]) -> None:
        rows.extend((f"  {ROW_NAMES[name]}", f"{section['rows'][name]['images_per_s']:,.0f} img/s", extra(name),
                     settings_label(section["rows"][name])) for name in names if name in section["rows"])

    def mlp_step(name: str) -> str:
        return f"{mlp['rows'][name]['step_ms']:.2f} ms/step"

    def ablation_step(name: str) -> str:
        previous = mlp["ablation"][mlp["ablation"].index(name) - 1]
        factor = mlp["rows"][name]["images_per_s"] / mlp["rows"][previous]["images_per_s"]
        return f"{mlp_step(name)}, x{factor:.2f} on {ROW_NAMES[previous]}"

    config = mlp["config"]
    title(f"MLP {config['num_hidden_layers']}x{config['width']} on MNIST, batch {config['batch_size']}")
    training_rows(mlp, ("ours", "ours_no_logging", "ours_amp", *CONVENTIONAL_ROWS), mlp_step)
    title("  ablation: the conventional loop with our levers added one at a time")
    training_rows(mlp, mlp["ablation"][1:], ablation_step)
    if "cnn" in results:
        cnn, cam = results["cnn"], results["cam"]
        title(f"ResNet-20 shape on CIFAR-10, batch {cnn['config']['batch_size']}, crops+flips: "
              f"{cnn['flops_per_step'] / 1e9:.2f} GFLOP/step")
        training_rows(cnn, ("ours", "ours_1_thread", "ours_contiguous", "ours_amp", *CONVENTIONAL_ROWS),
                      lambda name: f"{cnn['rows'][name]['gflops']:.1f} GFLOP/s")
        rows.append((f"  float32 matmul {cnn['matmul_size']}^3 (reference)", f"{cnn['matmul_gflops']:.1f} GFLOP/s",
                     "", count(cnn["matmul_threads"], "thread")))
        title(f"CAM, ResNet-20 shape, batch of {cam['images']}")
        rows.append(("  as cam.py computes it", f"{cam['maps_per_s']:,.0f} maps/s",
                     f"maps {tuple(cam['map_shape'])}", settings_label(dict(cam, data="test images, no autograd"))))
    ex1, sizes = ex["exercise1"], meta["sizes"]
    title(f"Exercise 1: {ex1['runs']} runs ({len(sizes['exercise1_depths'])} depths x residual steps "
          f"{'/'.join(map(str, sizes['exercise1_residual_steps']))} x {len(sizes['exercise1_seeds'])} seeds), "
          f"{count(sizes['exercise1_epochs'], 'epoch')} each")
    for jobs, seconds in ex1.get("seconds_by_jobs", {}).items():
        rows.append((f"  seed {sizes['exercise1_seeds'][0]}'s {ex1['runs_per_sweep_timed']} runs, --jobs {jobs}",
                     f"{seconds:.0f} s", "measured", ""))
    rows.append(("  all runs", f"{ex1['seconds']:.0f} s",
                 f"{ex1['seconds_per_run']:.1f} s a run; {ex1['note']}", settings_label(ex1)))
    if "resnet20_epoch" in ex:
        epoch = ex["resnet20_epoch"]
        title(f"ResNet-20 shape, one epoch of {epoch['train_images']:,} images and validation")
        rows.append(("  ours", f"{epoch['seconds']:.1f} s", "estimate" if epoch["estimated"] else "measured",
                     settings_label(epoch)))
    title("Targets")
    rows.extend((f"  {t['name']}", format_value(t["value"], t["unit"]).split(" of ")[0],
                 f"target {t['target']}: {'met' if t['met'] else 'NOT met'}", "") for t in results["targets"])
    width = max(len(name) for name, value, _, _ in rows if value) + 2
    vwidth = max(len(value) for _, value, _, _ in rows) + 2
    header = (f"bench.py {'--quick ' if meta['quick'] else ''}on {meta['device']} ({meta['cpu_count']} cores, torch "
              f"{meta['torch']}); best of {meta['repeats']} repeats; under each row, what it ran")
    lines = [header, f"CPU: {meta['cpu']}; --amp trains in {meta['amp_precision']} on {meta['device']}",
             "-" * len(header)]
    for name, value, extra, settings in rows:
        lines.append(f"{name:<{width}}{value:>{vwidth}}  {extra}".rstrip() if value else name)
        if settings:
            lines.append(f"    {settings}")
    busy = meta["load_average_at_start"][0]
    if busy >= BUSY_LOAD:
        lines.append(f"warning: the machine was busy before we started (load average {busy:.1f} on "
                     f"{meta['cpu_count']} cores): every rate here is pessimistic and noisy")
    return "\n".join(lines)


def main(args: argparse.Namespace, sizes: Sizes | None = None) -> dict:
    """Run every measurement, print the table, write the JSON; return the results."""
    device = resolve_device(args.device)
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (pipeline.py's policy, torch's default) or positive, got {args.threads}")
    sizes = sizes or (QUICK if args.quick else FULL)
    use_cudnn_benchmark(device)  # as pipeline.py runs, for every row
    options = Options(args.threads, args.threads or torch.get_num_threads(), args.amp, args.compile)
    start, load_at_start = time.perf_counter(), os.getloadavg()
    try:
        mnist = load_dataset("MNIST", args.data_root, args.download)
        cifar = None if args.mnist_only else load_dataset("CIFAR10", args.data_root, args.download)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    results = {"meta": {"torch": torch.__version__, "numpy": np.__version__, "device": str(device),
                        "threads": args.threads, "default_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "cpu": cpu_description(),
                        "amp_precision": amp_precision(device),
                        "quick": args.quick, "compile": args.compile, "amp": args.amp, "repeats": sizes.repeats,
                        "mnist_only": args.mnist_only, "sizes": asdict(sizes)}}
    results["mlp"] = bench_mlp(mnist, args.data_root, device, sizes, options)
    if cifar is not None:
        results["cnn"] = bench_cnn(cifar, args.data_root, device, sizes, options)
        results["cam"] = bench_cam(cifar, device, sizes, options)
    exercise1 = (run_exercise1(args.data_root, device, sizes, options) if sizes.exercise1_sample_steps == 0
                 else estimate_exercise1(mnist, args.data_root, device, sizes, options))
    results["exercises"] = {"exercise1": exercise1}
    if cifar is not None:
        results["exercises"]["resnet20_epoch"] = resnet20_epoch(cifar, device, sizes, results["cnn"], options)
    results["targets"] = check_targets(results)
    results["meta"].update(seconds=time.perf_counter() - start, load_average_at_start=load_at_start,
                           load_average_at_end=os.getloadavg())
    print(format_table(results))
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
