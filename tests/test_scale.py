"""Scaling out: a sweep in --jobs worker processes, one run data-parallel over processes as torchrun starts them."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import pipeline
import sweep
import utils
from data import load_dataset
from runs import RunFiles
from train import Runtime
from conftest import ROOT, cli_exit, without_seconds


def flags(mnist_root, out_dir, *extra: str) -> list[str]:
    return ["--data_root", str(mnist_root), "--no-download", "--val_size", "100", "--batch_size", "50", "--width", "8",
            "--device", "cpu", "--out_dir", str(out_dir), *extra]


def run_main(*args: str):
    return pipeline.main(pipeline.get_args_parser().parse_args(list(args)))


def histories(out_dir) -> dict[str, dict]:
    """Every run's history (without wall-clock seconds) and grad_norms.csv text, by run folder name."""
    runs = {}
    for run_dir in sorted(p for p in out_dir.iterdir() if (p / "history.json").exists()):
        history = json.loads((run_dir / "history.json").read_text())
        runs[run_dir.name] = dict(without_seconds(history), grad_norms=(run_dir / "grad_norms.csv").read_text())
    return runs


def test_jobs_train_the_longest_runs_first(mnist_root, tmp_path):
    """One worker takes the runs in the order they are queued, so the order they come back in is that order."""
    args = pipeline.get_args_parser().parse_args(flags(mnist_root, tmp_path, "--num_hidden_layers", "2", "6", "4",
                                                       "--num_epochs", "1", "--limit_train", "100"))
    configs = pipeline.run_configs(args, torch.device("cpu"))
    planned = sweep.plan(configs, tmp_path, None, "error", lock=False).runs
    histories, failures = sweep.run_in_workers(planned, [0, 1, 2], load_dataset("MNIST", mnist_root, False),
                                               Runtime(jobs=1), "error")
    assert failures == {} and [planned[i].config.num_hidden_layers for i in histories] == [6, 4, 2]


def test_a_queued_run_another_command_trains_meanwhile_is_planned_again_not_trained_over(mnist_root, tmp_path,
                                                                                        capsys, monkeypatch):
    """The sweep's main process plans its runs and hands them to the workers; another command that trains one of
    them (with another --lr) before a worker takes it keeps its run: the worker plans it again under its lock and
    refuses it, as a fresh command without --resume or --overwrite would, where it once trained it over (exit 0)."""
    other = tmp_path / "mlp_mnist_h4_w8_plain_s0"
    size = ("--num_epochs", "1", "--limit_train", "100")
    kept = {}
    run_in_workers = sweep.run_in_workers

    def another_command_first(*args):
        run_main(*flags(mnist_root, tmp_path, "--num_hidden_layers", "4", *size, "--lr", "0.01"))
        kept.update({path: path.read_bytes() for path in RunFiles(other).ours()})
        return run_in_workers(*args)
    monkeypatch.setattr(sweep, "run_in_workers", another_command_first)
    status, lines = cli_exit(capsys, *flags(mnist_root, tmp_path, "--num_hidden_layers", "2", "4", *size, "--jobs",
                                            "2"))
    assert status == 1 and "1 of 2 runs failed" in lines[-1] and f"{other} already holds a run" in lines[-1], lines
    assert {path: path.read_bytes() for path in RunFiles(other).ours()} == kept
    assert "test" in json.loads((tmp_path / "mlp_mnist_h2_w8_plain_s0" / "history.json").read_text())


def test_an_interrupted_jobs_sweep_resumes_to_the_histories_of_one_process(mnist_root, tmp_path):
    """SIGTERM while two workers train the first two runs of four: the resumed --jobs sweep continues those two and
    trains the other two from the start, and every run ends as in one process."""
    sweep = ("--num_hidden_layers", "2", "4", "--residual_step", "0", "2", "--num_epochs", "4", "--batch_size", "5")
    command = [sys.executable, str(ROOT / "pipeline.py"), *flags(mnist_root, tmp_path / "cut", *sweep, "--jobs", "2")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cut").glob("*/history.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(subprocess.signal.SIGTERM)  # to the sweep's main process only: it stops the workers
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err.strip().splitlines()[-1]
    unfinished = [h for h in histories_or_partial(tmp_path / "cut") if "test" not in h]
    assert unfinished, "the signal came after every run had finished"
    assert len(list((tmp_path / "cut").glob("*/checkpoint.pt"))) <= 2, "a run beyond the first two had started"
    two = run_main(*flags(mnist_root, tmp_path / "cut", *sweep, "--jobs", "2", "--resume"))
    one = run_main(*flags(mnist_root, tmp_path / "straight", *sweep))
    assert len(histories(tmp_path / "straight")) == 4
    assert histories(tmp_path / "cut") == histories(tmp_path / "straight")
    assert [c.run_name for c, _ in two] == [c.run_name for c, _ in one]
    assert (tmp_path / "cut" / "plots" / "mlp_trainability.png").is_file()


def histories_or_partial(out_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in out_dir.glob("*/history.json")]


def spawned_workers(pid: int) -> list[int]:
    """The --jobs worker processes among a process's children (multiprocessing's spawn start method)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]


def test_jobs_workers_stop_when_the_sweeps_main_process_is_killed(mnist_root, tmp_path):
    """kill -9 of the main process left its workers training the rest of the queue, with nobody to draw the figures,
    and --resume refused until they had finished: they stop at once, keeping their last finished epoch, and leave
    every run folder free for the same command with --resume."""
    sweep = ("--num_hidden_layers", "2", "4", "--num_epochs", "2", "--batch_size", "5", "--limit_train", "200",
             "--grad_log_every", "0", "--jobs", "2")
    process = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), *flags(mnist_root, tmp_path, *sweep)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/history.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = spawned_workers(process.pid)
    assert len(workers) == 2, process.communicate()
    process.kill()
    process.communicate(timeout=60)
    deadline = time.monotonic() + 30  # each stops within a step, in its SIGTERM handler
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker went on training"
    assert any("test" not in h for h in histories_or_partial(tmp_path)), "every run had finished"
    for run_dir in tmp_path.iterdir():
        RunFiles(run_dir).lock().release()  # what --resume takes first: no worker holds it any more


def test_ctrl_c_while_jobs_workers_start_is_one_line(mnist_root, tmp_path):
    """Ctrl-C reaches the whole process group, the workers too, while they are still importing torch."""
    command = [sys.executable, str(ROOT / "pipeline.py"),
               *flags(mnist_root, tmp_path, "--num_hidden_layers", "2", "4", "--num_epochs", "3", "--jobs", "2")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while len(spawned_workers(process.pid)) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err and "Error" not in err, err
    assert "--resume" in err.strip().splitlines()[-1]


def test_ctrl_c_again_and_again_while_jobs_workers_train_is_one_line(mnist_root, tmp_path):
    """Ctrl-C in a terminal reaches every process of the group, and the sweep's main process then stops the
    workers with a SIGINT of its own; a user may press it again too. A worker stops on the first and must print no
    traceback for those that land while it exits (each did, at a random point of its exit)."""
    sweep = ("--num_hidden_layers", "2", "4", "--residual_step", "0", "2", "--num_epochs", "4", "--batch_size", "5")
    command = [sys.executable, str(ROOT / "pipeline.py"), *flags(mnist_root, tmp_path, *sweep, "--jobs", "2")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*/grad_norms.csv"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)  # both workers train
    workers = [int(pid) for pid in spawned_workers(process.pid)]
    os.killpg(process.pid, signal.SIGINT)
    while process.poll() is None and time.monotonic() < deadline:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        time.sleep(0.002)
    out, err = process.communicate(timeout=120)
    assert len(workers) == 2 and process.returncode == 130, err
    assert "Traceback" not in err and "Exception" not in err and "--resume" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("device,message", [("cuda", "CUDA is not available"), ("mps", "not supported")])
def test_a_device_torchrun_cannot_use_is_refused_before_joining_the_group(mnist_root, tmp_path, capsys, monkeypatch,
                                                                          device, message):
    """A process that torchrun started (its environment) checks --device as a single process does: once a CUDA
    driver's traceback, or training on the CPU after --device mps."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    status, lines = cli_exit(capsys, *flags(mnist_root, tmp_path, "--device", device))
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not any(tmp_path.iterdir()) and not torch.distributed.is_initialized()


def test_an_unreadable_checkpoint_in_a_sweep_is_refused_while_planning_and_nothing_trains(mnist_root, tmp_path,
                                                                                          capsys, finished_run):
    """(A run that fails while training, with the others finishing: tests/test_failures.py.)"""
    broken = tmp_path / finished_run.name  # the sweep's second run
    shutil.copytree(finished_run, broken)
    (broken / "history.json").unlink()  # unfinished now, and its checkpoint cannot be read
    RunFiles(broken).checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(
            flags(mnist_root, tmp_path, "--num_hidden_layers", "2", "4", "--num_epochs", "1", "--resume")))
    assert exit_info.value.code == 2  # refused while planning: nothing trained
    assert not (tmp_path / "mlp_mnist_h2_w8_plain_s0").exists()


def test_a_diverging_run_is_reported_and_the_sweep_goes_on(mnist_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(flags(
            mnist_root, tmp_path, "--num_hidden_layers", "2", "4", "--lr", "1e30", "--optimizer", "sgd",
            "--num_epochs", "1", "--jobs", "2")))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1
    assert "error: 2 of 2 runs failed" in err[-1] and "became nan at step" in err[-1]


@pytest.mark.parametrize("extra", [("--jobs", "2"), ("--sync_bn",)])
def test_jobs_or_sync_bn_are_refused_where_they_cannot_work(mnist_root, tmp_path, capsys, monkeypatch, extra):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for two processes
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(flags(mnist_root, tmp_path, *extra)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and extra[0] in lines[0]
    assert not tmp_path.joinpath("mlp_mnist_h4_w8_plain_s0").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_rank(rank: int, world_size: int, port: int, root: str, args: list[str]) -> None:
    """One process of a torchrun-like launch: torchrun's environment, its own working folder, pipeline.main."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    os.chdir(os.path.join(root, f"rank{rank}"))
    pipeline.main(pipeline.get_args_parser().parse_args(args))


def spawn_ranks(root, args: list[str], world_size: int = 2, tries: int = 3) -> None:
    """Start the ranks on a free port; a port another process took between our probe and the ranks' bind is the
    one failure retried (torchrun --standalone avoids the race by binding port 0 itself)."""
    for attempt in range(tries):
        try:
            mp.spawn(distributed_rank, args=(world_size, free_port(), str(root), args), nprocs=world_size)
            return
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == tries - 1:
                raise


def launch(root, args: list[str], world_size: int = 2) -> None:
    for rank in range(world_size):
        (root / f"rank{rank}").mkdir(parents=True)
    spawn_ranks(root, args, world_size)


def test_two_processes_train_the_mlp_of_one(mnist_root, tmp_path, capsys):
    # --out_dir is relative: each rank writes into its own working folder, so what rank 1 writes would show
    args = flags(mnist_root, "runs", "--num_hidden_layers", "4", "--num_epochs", "2", "--residual_step", "2")
    launch(tmp_path / "ddp", args)
    assert not any((tmp_path / "ddp" / "rank1").iterdir()), "only rank 0 writes"
    run_main(*flags(mnist_root, tmp_path / "single", "--num_hidden_layers", "4", "--num_epochs", "2",
                    "--residual_step", "2"))
    run = "mlp_mnist_h4_w8_res2_s0"
    ddp, single = (json.loads((d / run / "history.json").read_text())
                   for d in (tmp_path / "ddp" / "rank0" / "runs", tmp_path / "single"))
    for a, b in zip(ddp["epochs"], single["epochs"]):
        assert a["steps"] == b["steps"] and a["lr"] == b["lr"]
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
    norms = [np.loadtxt(d / run / "grad_norms.csv", delimiter=",", skiprows=1)
             for d in (tmp_path / "ddp" / "rank0" / "runs", tmp_path / "single")]
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-4, atol=1e-6)
    # the checkpoint loads in a single process, this one
    capsys.readouterr()
    run_main("--no-train", "--device", "cpu", "--data_root", str(mnist_root), "--no-download", "--checkpoint",
             str(RunFiles(tmp_path / "ddp" / "rank0" / "runs" / run).checkpoint))
    assert f"accuracy {100 * ddp['test']['acc']:.2f}%" in capsys.readouterr().out


def test_two_processes_train_a_cnn_and_resume_under_torchrun(cifar_root, tmp_path):
    """Batch norm sees each rank's half batch (SyncBatchNorm is CUDA-only), so a CNN is compared loosely."""
    cnn = ["--model_name", "ResNet", "--dataset", "CIFAR10", "--data_root", str(cifar_root), "--no-download",
           "--val_size", "50", "--limit_train", "128", "--batch_size", "32", "--out_channels", "4", "--num_levels", "2",
           "--num_conv_per_level", "2", "--residual_step", "2", "--device", "cpu", "--out_dir", "runs"]
    launch(tmp_path / "ddp", cnn + ["--num_epochs", "1"])
    run_dir = tmp_path / "ddp" / "rank0" / "runs" / "resnet_cifar10_d6_c4x2_res2_s0"
    assert json.loads((run_dir / "history.json").read_text())["epochs"][0]["steps"] == 4
    # resume under torchrun: rank 1 reads the checkpoint rank 0 wrote (here: a copy in its folder)
    (tmp_path / "ddp2").mkdir()
    for rank in range(2):
        shutil.copytree(tmp_path / "ddp" / "rank0", tmp_path / "ddp2" / f"rank{rank}")
    spawn_ranks(tmp_path / "ddp2", cnn + ["--num_epochs", "2", "--resume"])
    history = json.loads((tmp_path / "ddp2" / "rank0" / "runs" / run_dir.name / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2] and np.isfinite(history["test"]["loss"])
    single = run_main(*[f if f != "runs" else str(tmp_path / "single") for f in cnn], "--num_epochs", "2")[0][1]
    assert history["epochs"][0]["train_loss"] == pytest.approx(single["epochs"][0]["train_loss"], rel=0.05)
