"""How fast the lab's training code is, against the loop most course code uses, on the same data in one process.

    python bench.py --quick    # the training, CAM and matmul rows, fewer steps: about a minute on 2 CPU cores
    python bench.py            # and Exercise 1's seed 0 and a ResNet-20 epoch for real: 5 to 8 minutes on 2 cores

Prints a table and writes the numbers to --out (JSON). Each rate is the best of a few timed repeats after a warm-up,
the contenders interleaved so that a busy neighbour slows them alike (CUDA synchronised). Each row runs on its own CPU
thread count and records what it runs; the table's labels are made from those records. Ours is train.prepare_run and
train.train_one_epoch on the configs pipeline.py's parser makes; the conventional loop is written plainly, as course
code writes it, only to be measured against; the MLP's ablation adds our levers to it one at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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
                  load_dataset, normalize, read_cifar10_batches)
from train import (RunSetup, amp_precision, build_run_model, cpu_threads, evaluate, logged_weights, prepare_run,
                   train_one_epoch, use_cudnn_benchmark, uses_channels_last)
from utils import (ArgumentParser, UsageError, check_writable, cpu_model, read_json, resolve_device, run_cli,
                   write_json)

MLP_FLAGS = ["--preset", "exercise1", "--num_hidden_layers", "22", "--residual_step", "0", "--seed", "0"]
RESNET20_FLAGS = ["--preset", "resnet20", "--augment"]  # trained with pipeline.py's defaults: Adam, lr 3e-4
EXERCISE1_SECONDS = 480.0  # the target: the 90 runs of Exercise 1 in 8 minutes
BUSY_LOAD = 1.0  # a 1-minute load average this high before we start means other work shares the cores
# what a row records, in the words of the table
RESIDENT, MNIST_LOADER = "resident tensors, index batches", "DataLoader, per-image ToTensor+Normalize"
CIFAR10_LOADER = "DataLoader (2 workers), per-image PIL crop+flip"
FUSED_NORMS, ITEM_NORMS, NO_NORMS = "_foreach_norm each step", ".item() per weight each step", "off"
PRECISIONS = {"float32": "float32", "bfloat16": "bfloat16 autocast", "float16": "float16 autocast, GradScaler"}
CPU_ISA = {"AVX2": torch.cpu._is_avx2_supported, "AVX-512": torch.cpu._is_avx512_supported,
           "AVX512-BF16": torch.cpu._is_avx512_bf16_supported, "AMX": torch.cpu._is_amx_tile_supported}
# the rows are keyed by their labels in the table; the conventional loop is timed at its threads and at one
OURS, CONVENTIONAL = "ours", "conventional loop"
CONVENTIONAL_ROWS = (CONVENTIONAL, f"{CONVENTIONAL}, 1 thread")
# the MLP's ablation: the conventional loop, then our levers switched on one at a time, in this order
ABLATION = (("+ resident data", {"data": RESIDENT}), ("+ one thread", {"threads": 1}),
            ("+ fused Adam", {"fused_optimizer": True}), ("+ fused norm log", {"grad_norms": FUSED_NORMS}))


@dataclass(frozen=True)
class Sizes:
    """How long each measurement runs: QUICK and FULL are the CLI's, tests pass tiny ones."""
    mlp_steps: int  # timed training steps per repeat
    cnn_steps: int
    warmup_steps: int  # untimed steps of each loop before its timed ones
    repeats: int  # each rate is the best of this many timed repeats
    matmul_size: int
    matmul_count: int  # matmuls per timed repeat
    cam_images: int
    exercises: bool  # Exercise 1's first seed and an epoch of the ResNet-20 shape, for real
    exercise1: tuple[str, ...] = ("--preset", "exercise1")  # Exercise 1's sweep, as the README runs it
    limit_train: int | None = None  # train the exercises on fewer images (tests only)
    val_size: int = 5000  # images held out of training, as in the exercises
    batch_size: int = 128  # of every training run here (smaller in tests only)


QUICK = Sizes(100, 3, 3, 5, 2048, 2, 256, exercises=False)
FULL = replace(QUICK, mlp_steps=200, cnn_steps=8, warmup_steps=5, matmul_count=5, exercises=True)


@dataclass(frozen=True)
class Options:
    """What one benchmark measures: the sizes, and what the command line decides about the rows."""
    sizes: Sizes
    device: torch.device
    data_root: Path
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
    parser.add("--out", default="bench_results/bench.json", help="JSON file for the results")
    parser.add("--threads", type=int, default=0,
               help="pipeline.py's --threads for our rows and the exercises (0: its policy), and the threads of the "
                    "conventional loop, CAM and the matmul (0: torch's default); the loop and our CNN also run on 1")
    for flag, words in (("--quick", "short run: the training, CAM and matmul rows, with fewer steps (no exercises)"),
                        ("--mnist_only", "only the MLP, its ablation and Exercise 1 (no CIFAR-10 is read)"),
                        ("--compile", "torch.compile the model in our training rows (not the loop nor the exercises)"),
                        ("--amp", "pipeline.py's --amp in our rows and the exercises (without it, our MLP and CNN get "
                                  "an --amp row where the device has a faster precision)")):
        parser.add(flag, action="store_true", default=False, help=words)
    return parser


@contextlib.contextmanager
def threads_of(threads: int | None = None) -> Iterator[None]:
    """Run the block on `threads` CPU threads (None: as now), then put back the thread count and cudnn.benchmark."""
    before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(threads or before[0])
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.backends.cudnn.benchmark = before[1]


@contextlib.contextmanager
def silenced_stdout() -> Iterator[None]:
    """Nothing printed in the block reaches stdout, from this process or from the workers it starts (they inherit
    file descriptor 1), so that the table stays clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Call each function `repeats` times, interleaved, and keep each one's fastest wall time."""
    wait = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # finished work
    best = {name: math.inf for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wait()
            start = time.perf_counter()
            run()
            wait()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def pipeline_args(flags: list[str], options: Options, limit_train: int | None = None) -> argparse.Namespace:
    """pipeline.py's arguments from these flags and ours, so that we time exactly what it trains."""
    ours = ["--val_size", str(options.sizes.val_size), "--batch_size", str(options.sizes.batch_size), "--device",
            str(options.device), "--threads", str(options.threads)] + ["--amp"] * options.amp
    return pipeline.get_args_parser().parse_args(flags + ours + ["--limit_train", str(limit_train)] * bool(limit_train))


def run_config(flags: list[str], options: Options, limit_train: int | None = None) -> RunConfig:
    """The config of the one run pipeline.py makes of these flags."""
    return pipeline.run_configs(pipeline_args(flags, options, limit_train), options.device)[0]


@dataclass(frozen=True)
class Setup:
    """What a measured training loop runs; the table's label of its row is made from these fields."""
    code: str  # "ours" (train.train_one_epoch on what train.prepare_run sets up) or "conventional loop"
    threads: int  # torch CPU threads during every timed call
    memory_format: str  # of the convolution weights and the batches: channels_last or contiguous
    precision: str  # a value of PRECISIONS
    data: str  # where the batches come from
    optimizer: str  # "fused Adam", or "Adam" (torch's default implementation)
    grad_norms: str  # how the gradient norm of every weight is logged (FUSED_NORMS, ITEM_NORMS), or NO_NORMS
    compiled: bool = False  # torch.compile


@dataclass(frozen=True)
class Contender:
    """One measured training loop: `train(steps)` trains that many steps on `setup.threads`; ours trains `run`."""
    setup: Setup
    train: Callable[[int], object]
    run: RunSetup | None = None


def run_settings(config: RunConfig, contiguous: bool = False) -> dict:
    """Threads, memory format, precision and data of a run of ours, by pipeline.py's policies; `contiguous` where
    we store a channels_last run contiguously after all."""
    on_cpu = torch.device(config.device).type == "cpu"  # pipeline.py leaves the thread count alone on CUDA
    return {"threads": cpu_threads(config) if on_cpu else torch.get_num_threads(),
            "memory_format": "channels_last" if uses_channels_last(config) and not contiguous else "contiguous",
            "precision": PRECISIONS[config.precision], "data": RESIDENT + ", batch crop+flip" * config.augment}


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """"fused Adam", or "Adam" when it runs torch's default (unfused) implementation."""
    return "fused " * bool(optimizer.defaults.get("fused")) + type(optimizer).__name__


def our_trainer(config: RunConfig, raw: RawData, compile_model: bool, contiguous: bool = False) -> Contender:
    """Our training code as pipeline.py runs this config, trained on the images of the run's first batches."""
    run = prepare_run(config, raw)
    if contiguous:  # to measure what channels_last gains
        run.model.to(memory_format=torch.contiguous_format)
        run.train.images = run.train.images.contiguous()
    if compile_model:
        run.net = torch.compile(run.model)
    every, settings = config.grad_log_every, run_settings(config, contiguous)

    def train(steps: int):
        loader, images = copy.copy(run.train), steps * config.batch_size  # the same generator and augmentation
        loader.images, loader.labels = run.train.images[:images], run.train.labels[:images]
        with threads_of(settings["threads"]):
            return train_one_epoch(replace(run, train=loader), 1, 0)

    norms = NO_NORMS if every == 0 else FUSED_NORMS + f", every {every} steps" * (every > 1)
    return Contender(Setup(OURS, **settings, optimizer=optimizer_name(run.optimizer), grad_norms=norms,
                           compiled=compile_model), train, run)


def amp_variant(config: RunConfig) -> dict[str, RunConfig]:
    """Our run with pipeline.py's --amp, where that is another precision than float32 and not asked for already."""
    precision = amp_precision(torch.device(config.device))
    return {} if config.amp or precision == "float32" else {"ours, --amp": replace(config, amp=True,
                                                                                    precision=precision)}


class CIFAR10Images(Dataset):
    """CIFAR-10 served the way torchvision.datasets.CIFAR10 serves it: one PIL image per item, transformed then."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.data, self.targets = images.numpy().transpose(0, 2, 3, 1), labels.tolist()  # (N, 32, 32, 3)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def conventional_loader(dataset: str, data_root: str | Path, batch_size: int) -> DataLoader:
    """A training set as course code loads it: per-image ToTensor+Normalize (and crop and flip of PIL images for
    CIFAR-10, with 2 workers) in a shuffling DataLoader."""
    info = DATASETS[dataset]
    normalize_each = [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    if dataset == "MNIST":
        images = torchvision.datasets.MNIST(str(data_root), train=True, transform=transforms.Compose(normalize_each))
        return DataLoader(images, batch_size=batch_size, shuffle=True)
    # torchvision.datasets.CIFAR10 refuses copies whose md5 differs from the official files (as rebuilt ones do)
    crop_flip = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    images = CIFAR10Images(*read_cifar10_batches(Path(data_root) / CIFAR10_FOLDER, CIFAR10_TRAIN_FILES),
                           transforms.Compose(crop_flip + normalize_each))
    return DataLoader(images, batch_size=batch_size, shuffle=True, num_workers=2)


def conventional_trainer(config: RunConfig, loader: Iterable, data: str, threads: int, fused_optimizer: bool,
                         grad_norms: str) -> Contender:
    """The usual course training loop over `loader` (which `data` describes): the run's model, contiguous, in
    float32, Adam (fused, or torch's default), gradient norms logged as `grad_norms` says, the loss's `.item()`."""
    model = build_run_model(config).to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True if fused_optimizer else None)
    criterion, weights, logged = nn.CrossEntropyLoss(), logged_weights(model), []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch

    def train_steps(steps: int) -> float:
        model.train()
        running_loss = 0.0
        with threads_of(threads):
            for images, labels in itertools.islice(batches, steps):
                images, labels = images.to(config.device), labels.to(config.device)
                optimizer.zero_grad()
                loss = criterion(model(images), labels)
                loss.backward()
                if grad_norms == ITEM_NORMS:
                    logged.append({name: w.grad.norm().item() for name, w in weights.items()})
                elif grad_norms == FUSED_NORMS:
                    logged.append(torch.stack(torch._foreach_norm([w.grad for w in weights.values()])))
                optimizer.step()
                running_loss += loss.item()
        return running_loss / steps

    return Contender(Setup(CONVENTIONAL, threads, "contiguous", "float32", data, optimizer_name(optimizer),
                           grad_norms), train_steps)


def conventional_rows(trainer: Callable[[int], Contender], options: Options) -> dict[str, Contender]:
    """The conventional loop on its threads and, on a CPU where those are more than one, on one thread."""
    threads = options.conventional_threads
    on_one_too = options.device.type == "cpu" and threads > 1
    return {name: trainer(n) for name, n in zip(CONVENTIONAL_ROWS, (threads, 1)[:1 + on_one_too])}


def training_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of a forward and backward pass over a batch, as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def training_section(contenders: dict[str, Contender], steps: int, options: Options) -> dict:
    """The contenders warmed up, then timed on `steps` steps each, interleaved, as rows (setup, images/s, ms per
    step); and how much faster ours is than the conventional loop at its best thread count."""
    sizes, device = options.sizes, options.device
    warmup = best_seconds({name: lambda c=c: c.train(sizes.warmup_steps) for name, c in contenders.items()}, 1, device)
    seconds = best_seconds({name: lambda c=c: c.train(steps) for name, c in contenders.items()}, sizes.repeats, device)
    rows = {name: dict(asdict(c.setup), images_per_s=steps * sizes.batch_size / seconds[name],
                       step_ms=1e3 * seconds[name] / steps) for name, c in contenders.items()}
    conventional = max((name for name in CONVENTIONAL_ROWS if name in rows), key=lambda n: rows[n]["images_per_s"])
    return {"steps": steps, "rows": rows, "speedup": rows[OURS]["images_per_s"] / rows[conventional]["images_per_s"],
            "speedup_over": conventional, "warmup_s": warmup[OURS]}


def bench_mlp(raw: RawData, options: Options) -> dict:
    """Section 1, the 22-hidden-layer MLP on MNIST: ours, also without the gradient-norm log; the conventional loop
    on the conventional threads and on one; the ablation between them (levers that change nothing left out)."""
    print("MLP on MNIST ...", file=sys.stderr, flush=True)
    config = run_config(MLP_FLAGS, options, options.sizes.mlp_steps * options.sizes.batch_size)
    variants = {OURS: config, "ours, norm log off": replace(config, grad_log_every=0), **amp_variant(config)}
    contenders = {name: our_trainer(c, raw, options.compile_model) for name, c in variants.items()}
    ours = contenders[OURS].run.train

    def conventional(data: str, **loop) -> Contender:
        loader = (TrainLoader(Split(ours.images, ours.labels), config.batch_size, config.seed) if data == RESIDENT
                  else conventional_loader("MNIST", options.data_root, config.batch_size))
        return conventional_trainer(config, loader, data, **loop)

    loop = {"data": MNIST_LOADER, "threads": options.conventional_threads, "fused_optimizer": False,
            "grad_norms": ITEM_NORMS}
    contenders |= conventional_rows(lambda threads: conventional(**dict(loop, threads=threads)), options)
    ablation = [CONVENTIONAL]
    for name, lever in ABLATION:
        if dict(loop, **lever) != loop:
            loop = dict(loop, **lever)
            contenders[name], ablation = conventional(**loop), ablation + [name]
    section = training_section(contenders, options.sizes.mlp_steps, options)
    return {"config": {k: getattr(config, k) for k in ("num_hidden_layers", "width", "batch_size", "optimizer", "lr")},
            **section, "ablation": ablation,
            "logging_cost": 1 - section["rows"]["ours, norm log off"]["step_ms"] / section["rows"][OURS]["step_ms"]}


def bench_cnn(raw: RawData, options: Options) -> dict:
    """Section 2, the ResNet-20 shape on CIFAR-10 with crops and flips: ours (also on one thread, and contiguous)
    against the conventional loop, in images/s and in GFLOP/s beside a large float32 matmul."""
    print("ResNet on CIFAR-10 ...", file=sys.stderr, flush=True)
    config = run_config(RESNET20_FLAGS, options, options.sizes.cnn_steps * options.sizes.batch_size)
    ours = our_trainer(config, raw, options.compile_model)
    contenders = {OURS: ours}
    if options.device.type == "cpu" and ours.setup.threads > 1:
        contenders["ours, 1 thread"] = our_trainer(replace(config, threads=1), raw, options.compile_model)
    if uses_channels_last(config):
        contenders["ours, contiguous"] = our_trainer(config, raw, options.compile_model, contiguous=True)
    contenders |= {name: our_trainer(c, raw, options.compile_model) for name, c in amp_variant(config).items()}
    loader = conventional_loader("CIFAR10", options.data_root, config.batch_size)
    contenders |= conventional_rows(lambda threads: conventional_trainer(config, loader, CIFAR10_LOADER, threads,
                                                                         False, NO_NORMS), options)
    with threads_of(ours.setup.threads):
        batch = slice(config.batch_size)
        flops = training_flops(ours.run.model, ours.run.train.images[batch], ours.run.train.labels[batch])
    section = training_section(contenders, options.sizes.cnn_steps, options)
    rows, matmul = section["rows"], matmul_gflops(options)
    for row in rows.values():
        row["gflops"] = flops / row["step_ms"] / 1e6
    fields = ("num_levels", "out_channels", "num_conv_per_level", "residual_step", "stem", "batch_size", "augment",
              "grad_log_every")
    return {"config": {k: getattr(config, k) for k in fields}, "flops_per_step": flops, **section,
            "matmul_size": options.sizes.matmul_size, "matmul_threads": options.conventional_threads,
            "matmul_gflops": matmul, "fraction_of_matmul": rows[OURS]["gflops"] / matmul,
            "channels_last_speedup": rows[OURS]["images_per_s"] / rows["ours, contiguous"]["images_per_s"]
            if "ours, contiguous" in rows else None}


def matmul_gflops(options: Options) -> float:
    """GFLOP/s of a large float32 matmul on the conventional loop's threads, the reference for the CNN's rate."""
    print("matmul reference ...", file=sys.stderr, flush=True)
    size, count = options.sizes.matmul_size, options.sizes.matmul_count
    a, b, out = (torch.randn(size, size, device=options.device) for _ in range(3))

    def matmuls():
        with threads_of(options.conventional_threads):
            for _ in range(count):
                torch.mm(a, b, out=out)

    matmuls()
    return 2 * size ** 3 * count / best_seconds({"mm": matmuls}, options.sizes.repeats, options.device)["mm"] / 1e9


def bench_cam(raw: RawData, options: Options) -> dict:
    """Section 3: class activation maps per second of a batch of test images, as cam.py computes them (a contiguous
    float32 model, no autograd), by a random ResNet-20 on the conventional loop's threads."""
    print("CAM ...", file=sys.stderr, flush=True)
    model = build_run_model(run_config(RESNET20_FLAGS, options)).to(memory_format=torch.contiguous_format).eval()
    images = normalize(raw.test_images[:options.sizes.cam_images], DATASETS["CIFAR10"], options.device)
    classes = raw.test_labels[:options.sizes.cam_images].to(options.device)

    def maps() -> torch.Tensor:
        with threads_of(options.conventional_threads), torch.no_grad():
            return class_activation_maps(model, images, classes)[0]

    shape, seconds = list(maps().shape), best_seconds({"cam": maps}, options.sizes.repeats, options.device)["cam"]
    return {"images": len(images), "map_shape": shape, "seconds": seconds, "maps_per_s": len(images) / seconds,
            "threads": options.conventional_threads, "memory_format": "contiguous", "precision": "float32"}


def bench_exercise1(options: Options) -> dict:
    """Exercise 1, its first seed's runs for real (pipeline.main into a temporary folder, with --jobs 1, and 2 where
    there are two workers); the other seeds' runs are counted at the cost of the first's."""
    sweep, limit_train, device = list(options.sizes.exercise1), options.sizes.limit_train, options.device
    configs = pipeline.run_configs(pipeline_args(sweep, options, limit_train), device)
    seeds, wall = sorted({c.seed for c in configs}), {}
    workers = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    for jobs in (1, 2) if workers >= 2 else (1,):
        print(f"Exercise 1 for real (seed {seeds[0]} of {len(seeds)}, --jobs {jobs}) ...", file=sys.stderr, flush=True)
        flags = sweep + ["--seed", str(seeds[0]), "--data_root", str(options.data_root), "--no-download", "--jobs",
                         str(jobs)]
        with tempfile.TemporaryDirectory() as out, silenced_stdout(), threads_of():
            args = pipeline_args(flags + ["--out_dir", out], options, limit_train)
            start = time.perf_counter()
            runs, wall[jobs] = pipeline.main(args), time.perf_counter() - start
    fastest = min(wall, key=wall.get)
    seconds = wall[fastest] * len(seeds)
    return {"sweep": "pipeline.py " + " ".join(sweep), "runs": len(configs), "seeds": seeds,
            "depths": len({c.num_hidden_layers for c in configs}), "epochs": configs[0].num_epochs,
            "residual_steps": sorted({c.residual_step for c in configs}), "runs_timed": len(runs),
            "seconds_by_jobs": {str(j): s for j, s in wall.items()}, "jobs_speedup": wall[1] / wall[2] if 2 in wall
            else None, "seconds": seconds, "estimated": len(seeds) > 1, "seconds_per_run": seconds / len(configs),
            "epoch_seconds_per_run": {c.run_name: sum(e["seconds"] for e in h["epochs"]) for c, h in runs},
            **run_settings(configs[0]), "note": f"--jobs {fastest}, measured" if len(seeds) == 1 else
            f"estimate: seed {seeds[0]}'s {len(runs)} runs measured with --jobs {fastest}, x {len(seeds)}"}


def resnet20_epoch(raw: RawData, options: Options) -> dict:
    """One real epoch of the ResNet-20 shape on the exercise's data (training and validation), after a warm-up."""
    print("ResNet-20, one real epoch ...", file=sys.stderr, flush=True)
    ours = our_trainer(run_config(RESNET20_FLAGS, options, options.sizes.limit_train), raw, False)
    ours.train(options.sizes.warmup_steps)

    def epoch():
        ours.train(len(ours.run.train))
        with threads_of(ours.setup.threads):
            evaluate(ours.run.net, ours.run.val, precision=ours.run.config.precision)

    seconds = best_seconds({"epoch": epoch}, 1, options.device)["epoch"]
    return dict(seconds=seconds, train_images=len(ours.run.train.labels), **asdict(ours.setup))


def cpu_description() -> str:
    """The CPU's model name and the instruction sets that decide its speed and --amp's precision."""
    return f"{cpu_model()}; " + ", ".join(f"{isa} {'yes' if has() else 'no'}" for isa, has in CPU_ISA.items())


def check_targets(results: dict) -> list[dict]:
    """The performance targets, each with its measured value and whether it is met."""
    mlp, cnn, ex1 = results["mlp"], results.get("cnn"), results.get("exercises", {}).get("exercise1")
    targets = [("MLP training vs conventional at its best thread count", mlp["speedup"], ">=", 8.0, "x"),
               ("gradient-norm logging cost", mlp["logging_cost"], "<=", 0.10, "of step time")]
    if cnn is not None:
        targets += [("CNN training vs conventional at its best thread count", cnn["speedup"], ">=", 1.3, "x"),
                    ("CNN GFLOP/s vs matmul", cnn["fraction_of_matmul"], ">=", 0.45, "of matmul")]
    if ex1 is not None:
        targets.append(("Exercise 1, all runs" + " (estimate)" * ex1["estimated"], ex1["seconds"], "<",
                        EXERCISE1_SECONDS, "s"))
        if ex1["jobs_speedup"] is not None:
            targets.append(("Exercise 1 with --jobs 2 vs --jobs 1", ex1["jobs_speedup"], ">=", 1.8, "x"))
    met = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    return [{"name": name, "value": value, "unit": unit, "met": bool(met[op](value, bound)),
             "target": f"{op} {format_value(bound, unit)}"} for name, value, op, bound, unit in targets]


def format_value(value: float, unit: str) -> str:
    """A target's value for the table: fractions as percentages, speed-ups as 8.0x, times in seconds."""
    if unit.startswith("of "):
        return f"{value:.1%} {unit}"
    return f"{value:.2f}x" if unit == "x" else f"{value:.1f} {unit}"


def count(n: int, thing: str) -> str:
    """"1 thread", "2 threads"."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


def settings_label(row: dict) -> str:
    """What a row ran: threads, memory format, precision, data, and where it has them, optimizer, norm log, compiled."""
    parts = [count(row["threads"], "thread"), row["memory_format"], row["precision"], row["data"]]
    if "optimizer" in row:
        parts += [row["optimizer"], f"norms: {row['grad_norms']}"] + ["compiled"] * row["compiled"]
    return ", ".join(parts)


def format_table(results: dict) -> str:
    """The results as a plain-text table: a line per measurement, and under it what the measurement ran."""
    mlp, meta = results["mlp"], results["meta"]
    added_to = dict(zip(mlp["ablation"][1:], mlp["ablation"]))  # each ablation row: the row it adds a lever to

    def training(rows: dict[str, dict], extra: Callable[[dict, str], str]) -> list[tuple[str, ...]]:
        return [(f"  {name}", f"{row['images_per_s']:,.0f} img/s", extra(row, name), settings_label(row))
                for name, row in rows.items()]

    def step(row: dict, name: str) -> str:
        on = added_to.get(name)
        factor = f", x{row['images_per_s'] / mlp['rows'][on]['images_per_s']:.2f} on {on}" if on else ""
        return f"{row['step_ms']:.2f} ms/step{factor}"

    rows = [(f"MLP {mlp['config']['num_hidden_layers']}x{mlp['config']['width']} on MNIST, batch "
             f"{mlp['config']['batch_size']}",),  # (name, value, extra, what it ran); a title is a name alone
            *training({name: row for name, row in mlp["rows"].items() if name not in added_to}, step),
            ("  ablation: the conventional loop with our levers added one at a time",),
            *training({name: mlp["rows"][name] for name in added_to}, step)]
    if "cnn" in results:
        cnn, cam = results["cnn"], results["cam"]
        rows += [(f"ResNet-20 shape on CIFAR-10, batch {cnn['config']['batch_size']}, crops+flips: "
                  f"{cnn['flops_per_step'] / 1e9:.2f} GFLOP/step",),
                 *training(cnn["rows"], lambda row, _: f"{row['gflops']:.1f} GFLOP/s"),
                 (f"  float32 matmul {cnn['matmul_size']}^3 (reference)", f"{cnn['matmul_gflops']:.1f} GFLOP/s", "",
                  count(cnn["matmul_threads"], "thread")), (f"CAM, ResNet-20 shape, batch of {cam['images']}",),
                 ("  as cam.py computes it", f"{cam['maps_per_s']:,.0f} maps/s", f"maps {tuple(cam['map_shape'])}",
                  settings_label(dict(cam, data="test images, no autograd")))]
    if "exercises" in results:
        ex1, epoch = results["exercises"]["exercise1"], results["exercises"].get("resnet20_epoch")
        rows += [(f"Exercise 1: {ex1['runs']} runs ({ex1['depths']} depths x residual steps "
                  f"{'/'.join(map(str, ex1['residual_steps']))} x {count(len(ex1['seeds']), 'seed')}), "
                  f"{count(ex1['epochs'], 'epoch')} each",),
                 *[(f"  seed {ex1['seeds'][0]}'s {ex1['runs_timed']} runs, --jobs {jobs}", f"{seconds:.0f} s",
                    "measured") for jobs, seconds in ex1["seconds_by_jobs"].items()],
                 ("  all runs", f"{ex1['seconds']:.0f} s", f"{ex1['seconds_per_run']:.1f} s a run; {ex1['note']}",
                  settings_label(ex1))]
        if epoch is not None:
            rows += [(f"ResNet-20 shape, one epoch of {epoch['train_images']:,} images and validation",),
                     ("  ours", f"{epoch['seconds']:.1f} s", "measured", settings_label(epoch))]
    rows += [("Targets",)] + [(f"  {t['name']}", format_value(t["value"], t["unit"]).split(" of ")[0],
                               f"target {t['target']}: {'met' if t['met'] else 'NOT met'}") for t in results["targets"]]
    width, vwidth = (max(len(row[i]) for row in rows if len(row) > 1) + 2 for i in (0, 1))
    header = (f"bench.py {'--quick ' * meta['quick']}on {meta['device']} ({meta['cpu_count']} cores, torch "
              f"{meta['torch']}); best of {meta['repeats']} repeats; under each row, what it ran")
    lines = [header, f"CPU: {meta['cpu']}; --amp trains in {meta['amp_precision']} on {meta['device']}",
             "-" * len(header)]
    for row in rows:
        name, value, extra, ran = row + ("",) * (4 - len(row))
        lines += [f"{name:<{width}}{value:>{vwidth}}  {extra}".rstrip() if value else name] + [f"    {ran}"] * bool(ran)
    if meta["load_average_at_start"][0] >= BUSY_LOAD:
        lines.append(f"warning: the machine was busy before we started (load average "
                     f"{meta['load_average_at_start'][0]:.1f} on {meta['cpu_count']} cores): every rate here is "
                     "pessimistic and noisy")
    return "\n".join(lines)


def is_bench_json(path: Path) -> bool:
    """Whether the file holds results bench.py wrote (which a new run may replace)."""
    try:
        results = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and {"meta", "mlp", "targets"} <= results.keys()


def main(args: argparse.Namespace, sizes: Sizes | None = None) -> dict:
    """Run every measurement, print the table, write the JSON; return the results."""
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (pipeline.py's policy, torch's default) or positive, got {args.threads}")
    pipeline.check_threads(args.threads)
    if Path(args.out).is_dir() or args.out.endswith(("/", os.sep)):
        raise UsageError(f"--out {args.out} is a folder; give the JSON file to write")
    if Path(args.out).is_file() and not is_bench_json(Path(args.out)):
        raise UsageError(f"--out {args.out} holds something else than bench.py's results; it is left as it is: "
                         "choose another --out")
    check_writable(Path(args.out).parent, "--out")  # before minutes of measuring, not after
    device = resolve_device(args.device)
    use_cudnn_benchmark(device)  # as pipeline.py runs, for every row
    options = Options(sizes or (QUICK if args.quick else FULL), device, Path(args.data_root), args.threads,
                      args.threads or torch.get_num_threads(), args.amp, args.compile)
    start, load_at_start = time.perf_counter(), os.getloadavg()
    try:
        mnist = load_dataset("MNIST", args.data_root, args.download)
        cifar = None if args.mnist_only else load_dataset("CIFAR10", args.data_root, args.download)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    for name, raw in (("MNIST", mnist), ("CIFAR-10", cifar)):
        if raw is not None and len(raw.train_labels) <= options.sizes.val_size:
            raise UsageError(f"{args.data_root}: {name} has {len(raw.train_labels):,} training images; bench.py holds "
                             f"out {options.sizes.val_size:,} of them, as the exercises do: give it the whole dataset")
    results = {"meta": {"torch": torch.__version__, "numpy": np.__version__, "device": str(device),
                        "threads": args.threads, "default_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "cpu": cpu_description(), "amp_precision": amp_precision(device),
                        "quick": args.quick, "compile": args.compile, "amp": args.amp,
                        "repeats": options.sizes.repeats, "mnist_only": args.mnist_only,
                        "sizes": asdict(options.sizes)},
               "mlp": bench_mlp(mnist, options)}
    if cifar is not None:
        results |= {"cnn": bench_cnn(cifar, options), "cam": bench_cam(cifar, options)}
    if options.sizes.exercises:
        results["exercises"] = {"exercise1": bench_exercise1(options)}
        if cifar is not None:
            results["exercises"]["resnet20_epoch"] = resnet20_epoch(cifar, options)
    results["targets"] = check_targets(results)
    results["meta"].update(seconds=time.perf_counter() - start, load_average_at_start=load_at_start,
                           load_average_at_end=os.getloadavg())
    print(format_table(results))
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
