"""A sweep's runs as the jobs of one SLURM job array, through submitit (imported only with --launcher slurm). Each job
trains one run as a --jobs worker does, under its run folder's lock on the shared file system; SLURM's warning
signal before a preemption or the time limit requeues it, and the requeued job continues the run from its last
checkpoint. The submitting command prints the job ids and waits for them with one progress bar, or leaves them."""
from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import submitit
import torch
from tqdm import tqdm

from data import load_dataset
from runs import RunFiles
from sweep import Plan, PlannedRun, train_locked
from tracking import TrackingOptions
from train import Runtime, amp_precision, cpu_threads
from utils import UsageError, first_line, resolve_device

CLUSTER = "slurm"  # submitit's executor; the tests run the very same jobs with its LocalExecutor ("local")
POLL_SECONDS = 2.0  # between looks for the jobs' results (submitit asks SLURM's sacct itself, and less often)
ROOT = Path(__file__).resolve().parent  # where a job imports this suite from, wherever the command was started


@dataclass(frozen=True)
class SlurmOptions:
    """The --slurm_* flags: where and how long each job runs, what it is given, how many run at once; the array's
    name; whether the command waits for the jobs."""
    partition: str | None = None
    minutes: int = 60
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    max_parallel: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option, without its --
    name: str = "pipeline"
    wait: bool = True


def check_cluster() -> None:
    """A UsageError where SLURM's commands, which submitit submits and runs the jobs with, are not on PATH."""
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if CLUSTER == "slurm" and missing:
        raise UsageError(f"--launcher slurm submits the runs with SLURM's {' and '.join(missing)}, not found on PATH "
                         "here; run the command on a login node of the cluster")


def make_executor(folder: Path, options: SlurmOptions) -> submitit.AutoExecutor:
    """submitit's executor of the job array, writing its logs to `folder`: the flags' partition, time, GPUs, CPUs,
    memory and array parallelism; each job imports this suite from ROOT."""
    executor = submitit.AutoExecutor(folder, cluster=CLUSTER)
    given = {"cpus_per_task": options.cpus_per_job, "mem_gb": options.mem_gb,
             "slurm_partition": options.partition, "slurm_array_parallelism": options.max_parallel,
             "slurm_additional_parameters": options.sbatch or None}
    python_path = f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"
    executor.update_parameters(name=options.name, timeout_min=options.minutes, gpus_per_node=options.gpus_per_job,
                               **{f"{CLUSTER}_setup": [python_path]},
                               **{key: value for key, value in given.items() if value is not None})
    return executor


class RunJob(submitit.helpers.Checkpointable):
    """One run of the sweep as a job: the data read from `data_root` on the shared file system, the device resolved
    from --device on the job's node (with --amp's precision there), then what a --jobs worker does with the run.
    submitit calls `checkpoint` when SLURM warns of a preemption or the time limit, and requeues the job."""

    def __init__(self, data_root: Path, device: str, amp: bool, tracking: TrackingOptions):
        self.data_root, self.device, self.amp, self.tracking = data_root, device, amp, tracking

    def __call__(self, run: PlannedRun) -> dict:
        """Train `run` on this job's node; return its history."""
        device = resolve_device(self.device)
        config = replace(run.config, device=str(device), precision=amp_precision(device) if self.amp else "float32")
        threads = cpu_threads(config)
        torch.set_num_threads(threads)
        raw = load_dataset(config.dataset, self.data_root, download=False)
        runtime = Runtime(devices=(str(device),), threads=threads, tracking=self.tracking, progress=False)
        # planned again under its lock as --resume plans: a requeued job continues its run, and a run another
        # command wrote since the sweep was planned is skipped, continued or refused, never trained over
        return train_locked(replace(run, config=config), raw, runtime, "resume")

    def checkpoint(self, run: PlannedRun) -> submitit.helpers.DelayedSubmission:
        """The job SLURM requeues: the same run, continued from its last checkpoint as --resume continues it (every
        epoch is checkpointed as it ends; the one under way is trained again); one stopped before its first
        checkpoint stays new, so that its requeued job does not take it for a run another process wrote."""
        return submitit.helpers.DelayedSubmission(
            self, replace(run, action="resume" if run.files.checkpoint.exists() else run.action))


def as_submitted(run: PlannedRun) -> PlannedRun:
    """A planned run as its job gets it: its paths absolute, and a run it replaces emptied now, by the holder of its
    lock, so that a job only ever starts a run or continues it (a requeued job must never remove what it trained)."""
    if run.action == "replace":
        run.files.remove()
    files = RunFiles(run.files.run_dir.resolve(), run.files.checkpoint.resolve())
    return replace(run, files=files, action="resume" if run.action == "resume" else "new")


def launch(sweep: Plan, todo: list[int], job: RunJob, options: SlurmOptions,
           folder: Path) -> tuple[dict[int, dict], dict[int, str]] | None:
    """Submit runs `todo` of the plan as one job array, print each run's job id and the folder of the logs; with
    options.wait, wait for the jobs (see wait_for), else return None at once."""
    runs = [as_submitted(sweep.runs[i]) for i in todo]
    sweep.release()  # each job locks the run it trains
    executor = make_executor(folder, options)
    said = io.StringIO()  # submitit prints sbatch's refusal before it raises it: said once, in our line
    try:
        with contextlib.redirect_stderr(said):
            jobs = executor.map_array(job, runs)
    except submitit.core.utils.FailedJobError as e:  # a partition, account or limit of the cluster
        raise UsageError(f"sbatch refused the job array, and nothing was submitted: {first_line(e)}") from None
    sys.stderr.write(said.getvalue())
    for run, submitted in zip(runs, jobs):
        print(f"{run.config.run_name}: job {submitted.job_id}", flush=True)
    print(f"submitit's logs: {folder} (<job id>_0_log.out and <job id>_0_log.err)", flush=True)
    if not options.wait:
        return None
    histories, failures = wait_for(jobs, [run.config.run_name for run in runs])
    return {todo[k]: history for k, history in histories.items()}, {todo[k]: line for k, line in failures.items()}


def wait_for(jobs: list[submitit.Job], names: list[str]) -> tuple[dict[int, dict], dict[int, str]]:
    """Wait for the jobs of runs `names`, with one progress bar of runs done; return the histories of those that
    finished and, for each that failed (said as it is seen: the others go on), the last line of its job's error log
    and the log's path, by position in `jobs`."""
    position = {submitted.job_id: k for k, submitted in enumerate(jobs)}
    histories: dict[int, dict] = {}
    failures: dict[int, str] = {}
    bar = tqdm(total=len(jobs), desc="jobs", unit="run", dynamic_ncols=True)
    try:
        for done in submitit.helpers.as_completed(jobs, poll_frequency=POLL_SECONDS):
            k = position[done.job_id]
            if done.exception() is None:
                histories[k] = done.result()
            else:
                failures[k] = f"{last_error_line(done.paths.stderr)} (log: {done.paths.stderr})"
                bar.write(f"{names[k]}: failed: {failures[k]}", file=sys.stderr)
            bar.update()
    except KeyboardInterrupt:
        raise KeyboardInterrupt("the jobs go on without this command (scancel stops them); once squeue lists none of "
                                "them, the same command with --resume draws the figures") from None
    finally:
        bar.close()
    return histories, failures


def last_error_line(log: Path) -> str:
    """The last line of a job's error log, which for a run that failed is its error (srun's own line that the task
    exited is skipped)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError as e:
        return f"its error log cannot be read ({first_line(e)})"
    said = [line for line in lines if line and not line.startswith("srun:")]
    return said[-1][:300] if said else "its error log is empty"
