"""--launcher slurm: a sweep's runs as the jobs of one job array through submitit. No SLURM is here: the jobs run in
submitit's LocalExecutor (the same pickled jobs, in local processes, with the same preemption and requeue protocol),
and what sbatch would be given is read from the script that submitit hands to a stand-in sbatch."""
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import cluster
import pipeline
import utils
from conftest import cli_exit, run_main
from test_scale import flags, histories
from runs import load_checkpoint, save_checkpoint
from sweep import replanned

SWEEP = ("--num_hidden_layers", "2", "4", "--residual_step", "0", "2", "--batch_size", "5", "--num_epochs", "4")


@pytest.fixture
def local_jobs(monkeypatch):
    """submitit's LocalExecutor in place of its SlurmExecutor, for the jobs of --launcher slurm."""
    monkeypatch.setattr(cluster, "CLUSTER", "local")


@pytest.fixture
def sbatch(tmp_path, monkeypatch) -> Path:
    """SLURM's commands on PATH as stand-ins: sbatch keeps the script it is given (returned) and answers as SLURM
    does; srun, which submitit looks for, does nothing."""
    bin_dir, script = tmp_path / "bin", tmp_path / "sbatch_script.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for command in bin_dir.iterdir():
        command.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def job_ids(out: str) -> dict[str, str]:
    """The job id of each run, as the submitting command prints them."""
    return dict(re.findall(r"^(\S+): job (\S+)$", out, re.MULTILINE))


def job_task(job_id: str) -> int | None:
    """The process of a local job's task (the one that runs the pickled job), or None before it has started."""
    for proc in Path("/proc").iterdir():
        try:
            if b"submitit.core._submit" in (proc / "cmdline").read_bytes() and \
                    f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def wait_until(condition, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)


def test_jobs_train_the_histories_of_one_process_and_a_preempted_job_continues_from_its_checkpoint(
        mnist_root, tmp_path, capsys, local_jobs):
    """Four runs as four jobs, left to train (--no-wait); one is preempted as SLURM does it (its warning signal,
    USR2) after its first epoch: submitit requeues it and it continues from its checkpoint. Every run ends as
    --jobs 1 trains it, and the same command with --resume then draws the figures without submitting anything."""
    command = flags(mnist_root, tmp_path / "jobs", *SWEEP, "--launcher", "slurm")
    capsys.readouterr()
    run_main(*command, "--no-wait")
    out = capsys.readouterr().out
    ids = job_ids(out)
    assert len(ids) == 4 and "the jobs train 4 of the sweep's runs" in out
    assert f"submitit's logs: {(tmp_path / 'jobs' / 'submitit').resolve()}" in out
    preempted = "mlp_mnist_h4_w8_res2_s0"
    wait_until(lambda: (tmp_path / "jobs" / preempted / "history.json").exists(), "the first epoch")
    os.kill(job_task(ids[preempted]), signal.SIGUSR2)
    logs = tmp_path / "jobs" / "submitit"
    wait_until(lambda: all((logs / f"{i}_0_result.pkl").exists() for i in ids.values()), "the jobs to end")
    log = (logs / f"{ids[preempted]}_0_log.out").read_text() + (logs / f"{ids[preempted]}_0_log.err").read_text()
    assert "Requeued job" in log and re.search(rf"{preempted}: resuming after epoch [1-3] ", log), log
    run_main(*flags(mnist_root, tmp_path / "one", *SWEEP))
    assert len(histories(tmp_path / "one")) == 4
    assert histories(tmp_path / "jobs") == histories(tmp_path / "one")
    capsys.readouterr()
    run_main(*command, "--resume")
    out = capsys.readouterr().out
    assert not job_ids(out) and out.count("already finished with these settings, skipped") == 4
    assert (tmp_path / "jobs" / "plots" / "mlp_trainability.png").is_file()


def test_a_failed_job_is_reported_with_its_log_while_the_others_finish(mnist_root, tmp_path, capsys, finished_run,
                                                                       local_jobs):
    """The command waits for the jobs (the default); one run's checkpoint holds weights that make every loss NaN."""
    failing = tmp_path / finished_run.name
    shutil.copytree(finished_run, failing)
    checkpoint = load_checkpoint(failing / "checkpoint.pt")
    checkpoint["model"] = {k: torch.full_like(v, float("nan")) for k, v in checkpoint["model"].items()}
    save_checkpoint(failing / "checkpoint.pt", checkpoint)  # saved as a run saves it: whole, its checksum new
    (failing / "history.json").unlink()
    status, err = cli_exit(capsys, *flags(mnist_root, tmp_path, "--num_hidden_layers", "2", "4", "--num_epochs", "2",
                                          "--resume", "--launcher", "slurm"))
    assert status == 1, err
    said = [line for line in err if line.startswith(f"{failing.name}: failed: ")]
    assert len(said) == 1 and "DivergedLoss: the training loss at epoch 2 became nan at step" in said[0], err
    log = Path(re.search(r"\(log: (\S+)\)$", said[0]).group(1))
    assert log.parent == (tmp_path / "submitit").resolve() and "Traceback" in log.read_text()
    assert f"error: 1 of 2 runs failed ({failing.name}: " in err[-1] and f"(log: {log}))" in err[-1], err
    assert "test" in json.loads((tmp_path / "mlp_mnist_h2_w8_plain_s0" / "history.json").read_text())
    assert (tmp_path / "plots" / "gradients_mlp_d2.png").is_file()
    assert not (tmp_path / "plots" / "gradients_mlp_d4.png").exists()  # only the finished run is drawn


def test_slurm_gets_the_partition_time_gpus_and_array_parallelism_of_the_flags(mnist_root, tmp_path, capsys, sbatch):
    run_main(*flags(mnist_root, tmp_path, "--num_hidden_layers", "2", "4", "--residual_step", "0", "2",
                    "--device", "auto", "--launcher", "slurm", "--slurm_partition", "gpu", "--slurm_time", "30",
                    "--slurm_gpus_per_job", "1", "--slurm_max_parallel", "3", "--slurm_cpus_per_job", "4",
                    "--slurm_mem_gb", "8", "--slurm_option", "account=lab", "qos=normal", "--no-wait"))
    out = capsys.readouterr().out
    assert set(job_ids(out).values()) == {"4242_0", "4242_1", "4242_2", "4242_3"}
    script = sbatch.read_text().splitlines()
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--array=0-3%3", "--cpus-per-task=4",
                 "--mem=8GB", "--account=lab", "--qos=normal", f"--job-name={tmp_path.name}", "--signal=USR2@90"):
        assert f"#SBATCH {line}" in script, script
    assert f"export PYTHONPATH={Path(cluster.__file__).parent}${{PYTHONPATH:+:$PYTHONPATH}}" in script
    assert not list(tmp_path.glob("*/history.json"))  # nothing trained here


@pytest.mark.parametrize("extra,message", [
    (("--launcher", "slurm", "--jobs", "2"), "--jobs"),
    (("--slurm_partition", "gpu", "--no-wait"), "--slurm_partition, --wait are for --launcher slurm"),
    (("--launcher", "slurm", "--device", "cuda:1"), "--device cuda:1"),
    (("--launcher", "slurm", "--device", "cuda"), "--slurm_gpus_per_job 1"),
    (("--launcher", "slurm", "--slurm_time", "0"), "--slurm_time must be positive"),
    (("--launcher", "slurm", "--slurm_option", "account"), "'account' is not KEY=VALUE"),
])
def test_flags_that_cannot_work_with_slurm_are_refused(mnist_root, tmp_path, capsys, sbatch, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(flags(mnist_root, tmp_path, *extra)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not any(tmp_path.glob("mlp_*")) and not sbatch.exists()


def test_a_job_array_that_sbatch_refuses_is_one_line(mnist_root, tmp_path, capsys, sbatch):
    (tmp_path / "bin" / "sbatch").write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: gpu" >&2\n'
                                             "exit 1\n")
    status, lines = cli_exit(capsys, *flags(mnist_root, tmp_path, "--launcher", "slurm", "--slurm_partition", "gpu"))
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].endswith("sbatch refused the job array, and nothing was submitted: sbatch: error: invalid "
                             "partition specified: gpu"), lines


def test_slurm_under_torchrun_or_without_slurm_is_refused(mnist_root, tmp_path, capsys, monkeypatch):
    status, lines = cli_exit(capsys, *flags(mnist_root, tmp_path, "--launcher", "slurm"))
    assert status == 2 and len(lines) == 1 and "sbatch and srun, not found on PATH" in lines[0], lines
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for two processes
    status, lines = cli_exit(capsys, *flags(mnist_root, tmp_path, "--launcher", "slurm"))
    assert status == 2 and len(lines) == 1 and "without torchrun" in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_a_job_stopped_before_its_first_checkpoint_is_requeued_as_new_and_after_it_as_resumed(tmp_path, capsys):
    """A requeued job plans its run again; one that had saved nothing said it was written by another process."""
    config = pipeline.RunConfig(run_name="r", dataset="MNIST")
    run = cluster.PlannedRun(config, cluster.RunFiles(tmp_path / "r"), "new")
    job = cluster.RunJob(tmp_path, "cpu", False, cluster.TrackingOptions())
    requeued = job.checkpoint(run).args[0]
    assert requeued.action == "new"
    replanned(requeued, "resume")
    assert "another process" not in capsys.readouterr().out
    (tmp_path / "r").mkdir()
    torch.save({}, run.files.checkpoint)
    assert job.checkpoint(run).args[0].action == "resume"
