"""Build, train, evaluate, sweep and plot the lab's MLPs and CNNs.

    python pipeline.py --model_name MLP --dataset MNIST --num_hidden_layers 2 10 18 26 34 --num_epochs 10
    python pipeline.py --model_name ResNet --dataset CIFAR10 --num_conv_per_level 1 3 5 --residual_step 0 2
    python pipeline.py --no-train --checkpoint runs/<run>/checkpoint.pt
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path

import torch

from config import (DATA, FLAGS, MODEL, OPTIMISATION, PRESETS, RUN_FOLDER, SCALING, TRACKING, RunConfig,
                    value_type)
from data import DATASETS, DatasetError, Split, check_split_sizes, load_dataset, make_splits, num_batches
from plots import plot_sweep
from sweep import Launcher, Plan, execute, expand, plan, with_prefix
from tracking import DEFAULT_PROJECT, TrackingOptions, checked_online, log_sweep_figures
from runs import (CheckpointError, ResumeError, RunConflict, RunFiles, RunLocked, load_checkpoint, model_of,
                  unfinished)
from train import Runtime, amp_precision, cpu_threads, evaluate
from utils import (ArgumentParser, CLIError, UsageError, add_flag, check_writable, distributed_world,
                   init_distributed, resolve_device, run_cli, setup_for_distributed)


MAX_THREADS_PER_CORE = 4  # --threads beyond this many per core only adds contention (10000 crashed torch)
SWEEPS = "; several values run every combination"
EVALUATION_FLAGS = {"train", "checkpoint", "data_root", "download", "device", "threads"}  # what --no-train reads
SLURM_FLAGS = ("slurm_partition", "slurm_time", "slurm_gpus_per_job", "slurm_cpus_per_job", "slurm_mem_gb",
               "slurm_max_parallel", "slurm_option", "wait")  # the flags of --launcher slurm's jobs
CLUSTER_SECTION = "cluster"


class PipelineParser(ArgumentParser):
    """pipeline.py's parser: `--preset NAME` fills in that preset's settings first, so that a flag given overrides
    them wherever it stands on the line."""

    def parse_known_args(self, args=None, namespace=None):
        if namespace is None:
            preset = ArgumentParser(add_help=False)
            preset.add_argument("--preset", choices=list(PRESETS))
            namespace = argparse.Namespace(**PRESETS.get(preset.parse_known_args(args)[0].preset, {}))
        return super().parse_known_args(args, namespace)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The pipeline's flags in sections: the run settings as config.RunConfig declares them, then the flags of the
    command itself; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = PipelineParser(description="Depth, residual connections and convolutions: train, evaluate, sweep and "
                            "plot.", add_help=add_help)
    groups = {name: parser.add_argument_group(name) for name in (MODEL, DATA, OPTIMISATION, RUN_FOLDER, TRACKING,
                                                                  SCALING)}
    add_flag(groups[MODEL], "--preset", choices=list(PRESETS), default=None,
             help="start from a named configuration, which the other flags change: resnet8, resnet20 and resnet38 "
                  "are He et al.'s CIFAR-10 ResNets (16 channels, 3 levels, option A shortcuts; 75k, 0.27M and "
                  "0.56M parameters), exercise1 is Exercise 1's sweep (width-16 MLPs on MNIST at 9 depths, plain and "
                  "residual, seeds 0-4, 10 epochs), exercise2 is Exercise 2's sweep (those ResNets plain and residual, "
                  "seeds 0-2, 10 epochs of one-cycle SGD with crops and flips), resnet20_fast is residual depth 20 "
                  "to He et al.'s accuracy in about a million training images (Exercise 2's recipe on all 50,000 "
                  "images for 21 epochs, --tta flip; seeds 0-2) (default: none)")
    for name, flag in FLAGS.items():
        default = flag.cli_default or RunConfig.__dataclass_fields__[name].default
        kwargs = dict(help=flag.help + (SWEEPS if flag.sweep else ""), default=[default] if flag.sweep else default)
        if value_type(name) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=value_type(name), choices=flag.choices, nargs="+" if flag.sweep else None)
        add_flag(groups[flag.group], f"--{name}", **kwargs)
    add_flag(groups[DATA], "--data_root", default="data", help="folder holding MNIST/raw and cifar-10-batches-py")
    add_flag(groups[DATA], "--download", action=argparse.BooleanOptionalAction, default=True,
             help="download the dataset through torchvision when it is missing")
    run = groups[RUN_FOLDER]
    add_flag(run, "--train", action=argparse.BooleanOptionalAction, default=True,
             help="train; --no-train evaluates --checkpoint on the test set")
    add_flag(run, "--checkpoint", "--load_model_as", "--save_model_as", "--load-model-as", "--save-model-as",
             help="checkpoint to write (default: <out_dir>/<run_name>/checkpoint.pt), or to evaluate with --no-train")
    add_flag(run, "--out_dir", default="runs", help="folder for run folders")
    add_flag(run, "--plots_dir", default=None, help="folder for plots (default: <out_dir>/plots)")
    add_flag(run, "--run_name", default=None,
             help="run folder name (default: derived from the config; a prefix in sweeps)")
    existing = run.add_mutually_exclusive_group()  # an existing run is continued or replaced, never both
    add_flag(existing, "--resume", action="store_true", default=False,
             help="continue unfinished runs from their checkpoints and skip finished ones")
    add_flag(existing, "--overwrite", action="store_true", default=False, help="replace existing run folders")
    add_flag(groups[TRACKING], "--wandb", choices=["disabled", "offline", "online"], nargs="?", const="online",
             default="disabled", help="track every run in Weights & Biases, grouped by --out_dir's name: offline "
             "writes <run folder>/wandb to upload later with wandb sync; online uploads as it trains (after wandb "
             "login; offline instead, with a warning, when the server does not answer); a bare --wandb, as in the "
             "original lab, means online")
    add_flag(groups[TRACKING], "--wandb_proj_name", default=DEFAULT_PROJECT, help="W&B project (with --wandb)")
    add_flag(groups[TRACKING], "--tensorboard", action=argparse.BooleanOptionalAction, default=False,
             help="write TensorBoard event files to <run folder>/tensorboard (tensorboard --logdir <out_dir>)")
    add_flag(groups[SCALING], "--jobs", type=int, default=1,
             help="train a sweep's runs in N worker processes, longest first; on the CPU each gets cores // N "
                  "threads (or --threads), on CUDA its own device (round robin)")
    add_cluster_flags(parser.add_argument_group(CLUSTER_SECTION))
    return parser


def add_cluster_flags(cluster: argparse._ArgumentGroup) -> None:
    """--launcher and the flags of its SLURM jobs."""
    add_flag(cluster, "--launcher", choices=["local", "slurm"], default="local",
             help="local: train in this process (or its --jobs workers); slurm: submit every run to train as one job "
                  "of a SLURM job array (submitit; logs in <out_dir>/submitit), then wait for them and draw the "
                  "figures; the run folders and --data_root must be on a file system the nodes share")
    add_flag(cluster, "--slurm_partition", default=None, metavar="NAME",
             help="the jobs' partition (default: the cluster's)")
    add_flag(cluster, "--slurm_time", type=int, default=60, metavar="MINUTES",
             help="each job's time limit; a run still training then is requeued and continues from its last epoch "
                  "(at most 3 times)")
    add_flag(cluster, "--slurm_gpus_per_job", type=int, choices=[0, 1], default=0,
             help="GPUs per job (a run trains on one device; with 1, --device auto trains on it)")
    add_flag(cluster, "--slurm_cpus_per_job", type=int, default=None, metavar="N",
             help="CPUs per job, which its torch threads use (default: the cluster's)")
    add_flag(cluster, "--slurm_mem_gb", type=float, default=None, metavar="GB",
             help="memory per job (default: the cluster's)")
    add_flag(cluster, "--slurm_max_parallel", type=int, default=None, metavar="K",
             help="at most this many jobs of the array run at once (default: submitit's 256)")
    add_flag(cluster, "--slurm_option", type=sbatch_option, nargs="+", default=[], metavar="KEY=VALUE",
             help="any other sbatch option, without its --: account=mylab qos=normal constraint=a100 (default: none)")
    add_flag(cluster, "--wait", action=argparse.BooleanOptionalAction, default=True,
             help="wait for the jobs and draw the figures; --no-wait returns once they are submitted (the same "
                  "command with --resume draws the figures when they have ended)")


def sbatch_option(text: str) -> tuple[str, str]:
    """An sbatch option as --slurm_option takes it: KEY=VALUE, the key a word of letters, digits, - and _."""
    key, _, value = text.partition("=")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key) or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (an sbatch option without its --, as in "
                                         "account=mylab)")
    return key, value


def check_threads(threads: int) -> None:
    """--threads beyond MAX_THREADS_PER_CORE per core is a UsageError (bench.py's --threads too)."""
    cores = os.cpu_count() or 1
    if threads > MAX_THREADS_PER_CORE * cores:
        raise UsageError(f"--threads {threads} is more than {MAX_THREADS_PER_CORE} per core of this machine's {cores}")


def check_args(args: argparse.Namespace) -> None:
    """Reject bad values of the command's own flags before anything is read or written (RunConfig checks the rest)."""
    world, project = distributed_world(), args.wandb_proj_name
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    rules = [
        (args.jobs >= 1, f"--jobs must be a positive integer, got {args.jobs}"),
        (args.jobs == 1 or world == 1, "--jobs runs a sweep in worker processes, torchrun one run in several; use one"),
        (not args.sync_bn or (world > 1 and cuda), "--sync_bn synchronises batch norm across torchrun's processes on "
         "CUDA (torch's SyncBatchNorm does not run on the CPU); start with torchrun on CUDA"),
        (world == 1 or args.batch_size % world == 0, f"--batch_size {args.batch_size} must be a multiple of "
         f"torchrun's {world} processes: each trains on an equal share of every batch"),
        (args.wandb != "disabled" or "wandb_proj_name" not in args.given, "--wandb_proj_name names the W&B project of "
         "--wandb; give --wandb offline or online with it, or leave it out"),
        (args.wandb == "disabled" or 0 < len(project) <= 128 and not any(c in project for c in "/\\#?%:"),
         f"--wandb_proj_name {project!r} is not a W&B project name (1 to 128 characters, none of / \\ # ? % :)"),
    ]
    for ok, problem in rules + cluster_rules(args, world):
        if not ok:
            raise UsageError(problem)
    for flag, value in (("--out_dir", args.out_dir), ("--plots_dir", args.plots_dir)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} {value!r} names no folder; give one ('.' for the current folder)")
    if args.launcher == "slurm":
        import cluster
        cluster.check_cluster()
    if args.checkpoint is not None:
        check_checkpoint_flag(args.checkpoint, args.resume or args.overwrite)
    check_threads(args.threads)
    check_writable(Path(args.out_dir), "--out_dir")
    check_writable(plots_folder(args), "--plots_dir")


def cluster_rules(args: argparse.Namespace, world: int) -> list[tuple[bool, str]]:
    """check_args's rules of --launcher and its flags: (whether the flags keep it, the problem otherwise)."""
    slurm = args.launcher == "slurm"
    stray = get_args_parser().given_flags(args, {name for name in SLURM_FLAGS if not slurm})
    counts = {"--slurm_time": args.slurm_time, "--slurm_cpus_per_job": args.slurm_cpus_per_job,
              "--slurm_mem_gb": args.slurm_mem_gb, "--slurm_max_parallel": args.slurm_max_parallel}
    return [
        (not stray, f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} for --launcher slurm; give it or leave "
         f"{'it' if len(stray) == 1 else 'them'} out"),
        (not slurm or args.jobs == 1, "--jobs runs a sweep in worker processes of this machine, --launcher slurm as "
         "SLURM jobs; use one"),
        (not slurm or world == 1, "--launcher slurm submits a sweep from one process; start it without torchrun"),
        *((value is None or value > 0, f"{flag} must be positive, got {value}") for flag, value in counts.items()),
        (not slurm or args.device in ("auto", "cpu", "cuda"), f"--device {args.device}: a SLURM job trains on the "
         "device it is given; use auto, cpu or cuda"),
        (not slurm or args.device != "cuda" or args.slurm_gpus_per_job, "--device cuda needs a GPU in every job: "
         "give --slurm_gpus_per_job 1"),
    ]


def check_checkpoint_flag(checkpoint: str, existing_allowed: bool) -> None:
    """--checkpoint names a file in a folder that can be written, and one that exists only with --resume or --overwrite
    (whose owner the plan checks); otherwise a UsageError."""
    if checkpoint.endswith(("/", os.sep)) or Path(checkpoint).is_dir():
        raise UsageError(f"--checkpoint {checkpoint} is a folder; name the checkpoint file")
    check_writable(Path(checkpoint).parent, "--checkpoint")
    if not existing_allowed and Path(checkpoint).exists():
        raise UsageError(f"--checkpoint {checkpoint} already exists; if it is this run's, pass --resume to continue it "
                         "or --overwrite to replace it, else choose another path")


def plots_folder(args: argparse.Namespace) -> Path:
    """Where the sweep's figures go: --plots_dir, or <out_dir>/plots."""
    return Path(args.out_dir) / "plots" if args.plots_dir is None else Path(args.plots_dir)


def run_configs(args: argparse.Namespace, device: torch.device) -> list[RunConfig]:
    """The sweep's run configs from the flags, on `device`; a setting out of range is a UsageError."""
    try:
        precision = amp_precision(device) if args.amp else "float32"
        return with_prefix(expand(dict({name: getattr(args, name) for name in FLAGS}, device=str(device),
                                       precision=precision), args.given), args.run_name)
    except ValueError as e:
        preset = PRESETS.get(args.preset, {})
        named = [f"--{name}" for name, value in preset.items()
                 if f"--{name} " in f"{e} " and getattr(args, name) == value]  # not given again on the line
        raise UsageError(f"{e}" + (f" (set by --preset {args.preset}: {', '.join(named)})" if named else "")) from None


def evaluate_checkpoint(args: argparse.Namespace, device: torch.device) -> None:
    """--no-train: evaluate a saved model on its dataset's test set and on its run's validation split, with the
    settings it was trained with (and the trained weights of an --ema run apart)."""
    if args.checkpoint is None:
        raise UsageError("--no-train needs --checkpoint PATH (a checkpoint.pt written by a training run)")
    ignored = get_args_parser().given_flags(args, vars(args).keys() - EVALUATION_FLAGS)
    if ignored:  # a --dataset or --batch_size that seemed to apply would be silently replaced by the checkpoint's
        raise UsageError(f"--no-train evaluates --checkpoint with the settings it was trained with; leave out "
                         f"{', '.join(ignored)}")
    if args.threads:
        check_threads(args.threads)
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    config, model = model_of(checkpoint, args.checkpoint)
    trained = model_of(checkpoint, args.checkpoint, averaged=False)[1].to(device) if config.ema else None
    model.to(device)
    info = DATASETS[config.dataset]
    raw = load_dataset(config.dataset, args.data_root, args.download)
    _, val, test = (split.normalized(info, device)
                    for split in make_splits(raw, config.val_size, config.seed, config.limit_train))

    def scores(split: Split, tta: str) -> str:
        loss, acc = evaluate(model, split)
        others = [f"with --tta {tta}: {evaluate(model, split, tta=tta)[1]:.2%}"] if tta != "none" else []
        others += [f"trained weights, no average: {evaluate(trained, split)[1]:.2%}"] if trained else []
        return f"loss {loss:.4f}, accuracy {acc:.2%}" + (f" ({'; '.join(others)})" if others else "")

    state = unfinished(checkpoint, config)
    print(f"{config.run_name} ({config.model_name}, depth {config.depth}{f', {state}' if state else ''}) on the "
          f"{config.dataset} test set ({len(test)} images): {scores(test, config.tta)}")
    if len(val):
        print(f"{config.run_name} on its validation split ({len(val)} training images held out by seed "
              f"{config.seed}): {scores(val, 'none')}")


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
    except (RunConflict, ResumeError, RunLocked, CheckpointError, DatasetError) as e:
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
    # checked under torchrun too; a SLURM job resolves --device on its node (this one may have no GPU)
    device = resolve_device(args.device) if args.launcher == "local" else torch.device("cpu")
    if world_size > 1:
        rank, world_size, device_name = init_distributed(device.type)
        device = torch.device(device_name)
    setup_for_distributed(rank == 0)
    configs = run_configs(args, device)
    plots_dir = plots_folder(args)
    shared = [c.run_name for c in configs if (Path(args.out_dir) / c.run_name).resolve() == plots_dir.resolve()]
    if shared:
        raise UsageError(f"run {shared[0]}'s folder would be the figures' folder {plots_dir}; choose another "
                         "--run_name or --plots_dir")
    if args.amp and configs[0].precision == "float32" and args.launcher == "local":
        print("warning: --amp: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX); training in float32",
              file=sys.stderr)
    sweep = plan_on_every_rank(args, configs, rank, world_size)
    try:
        return train_and_plot(args, sweep, rank, world_size, device)
    finally:
        sweep.release()


def plan_on_every_rank(args: argparse.Namespace, configs: list[RunConfig], rank: int, world_size: int) -> Plan:
    """The sweep's plan, its run folders locked by this process (by rank 0 under torchrun, whose refusal, a locked
    run included, every rank then shares, so that none waits for the others in vain)."""
    refusal = None
    try:
        existing = "overwrite" if args.overwrite else "resume" if args.resume else "refuse"
        sweep = plan(configs, Path(args.out_dir), Path(args.checkpoint) if args.checkpoint else None, existing,
                     lock=rank == 0)
    except (RunConflict, ResumeError, RunLocked, CheckpointError) as e:
        sweep, refusal = None, e
    if world_size > 1:
        shared = [None if refusal is None else str(refusal)]
        torch.distributed.broadcast_object_list(shared, src=0)
        if refusal is None and shared[0] is not None:
            refusal = RunConflict(shared[0])
        if refusal is not None and sweep is not None:
            sweep.release()
    if refusal is not None:
        raise refusal
    return sweep


def logged_grad_norms(files: RunFiles, config: RunConfig, history: dict) -> tuple[list[int], dict]:
    """A run's gradient norms for the figures; none, and a line saying why, when its grad_norms.csv is missing, cut
    or incomplete, or the run logged none (the run's other figures are drawn all the same)."""
    try:
        return files.read_logged_grad_norms(config, history)
    except ValueError as e:
        print(f"gradient figures: skipped {config.run_name}: {e}", flush=True)
        return [], {}


def slurm_launcher(args: argparse.Namespace, tracking: TrackingOptions) -> Launcher:
    """--launcher slurm: the runs to train as the jobs of one SLURM job array, their logs in <out_dir>/submitit."""
    import cluster
    out_dir = Path(args.out_dir)
    options = cluster.SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_gpus_per_job,
                                   args.slurm_cpus_per_job, args.slurm_mem_gb, args.slurm_max_parallel,
                                   dict(args.slurm_option), out_dir.resolve().name, args.wait)
    job = cluster.RunJob(Path(args.data_root).resolve(), args.device, args.amp, tracking)
    return functools.partial(cluster.launch, job=job, options=options, folder=(out_dir / "submitit").resolve())


def train_and_plot(args: argparse.Namespace, sweep: Plan, rank: int, world_size: int,
                   device: torch.device) -> list[tuple[RunConfig, dict]]:
    """Train the planned runs, then draw the sweep's figures."""
    out_dir = Path(args.out_dir)
    if world_size > 1:
        torch.distributed.barrier()  # every rank has planned before rank 0 replaces any file
    raw = load_dataset(args.dataset, args.data_root, args.download)
    train_images = check_split_sizes(len(raw.train_labels), args.val_size, args.limit_train)  # a copy may be smaller
    try:
        for run in sweep.runs:
            run.config.check_schedule_length(num_batches(train_images, run.config.batch_size))
    except ValueError as e:
        raise UsageError(str(e)) from None
    sweep.lock_new_runs()
    threads = cpu_threads(sweep.runs[0].config, args.jobs)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    devices = (str(device),)
    if device.type == "cuda" and device.index is None:
        devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    tracking = TrackingOptions(args.wandb, args.wandb_proj_name, args.tensorboard, out_dir.resolve().name)
    if rank == 0:  # the one process that tracks
        tracking = checked_online(tracking)
    result = execute(sweep, raw, Runtime(rank, world_size, args.jobs, devices, threads, tracking),
                     slurm_launcher(args, tracking) if args.launcher == "slurm" else None)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if result.handed_on:
        print(f"the jobs train {result.handed_on} of the sweep's runs; once squeue lists none of them, run the same "
              "command with --resume to draw the figures")
        return result.runs
    if rank == 0 and result.runs:
        plots_dir = plots_folder(args)
        files = {run.config.run_name: run.files for run in sweep.runs}
        figures = [(config, history, logged_grad_norms(files[config.run_name], config, history))
                   for config, history in result.runs]
        paths = plot_sweep(figures, plots_dir)
        for path in paths:
            print(f"wrote {path}")
        log_sweep_figures(tracking, plots_dir, paths)
        for line in tracking_hints(tracking, out_dir, plots_dir):
            print(line)
    if result.failures:
        failed = "; ".join(f"{name}: {error}" for name, error in result.failures)
        raise CLIError(f"{len(result.failures)} of {len(sweep.runs)} runs failed ({failed})" if len(sweep.runs) > 1
                       else f"{result.failures[0][0]} failed: {result.failures[0][1]}")
    return result.runs


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
