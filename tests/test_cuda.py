"""The CUDA paths, proven the first time a GPU is at hand (`make gpu-check`): training with channels_last, --amp
in both precisions, fused optimizers and the gradient-norm log; exact resume; --jobs over the devices; torchrun with
nccl; CAM against the CPU. Skipped without CUDA, except the cuDNN policy, which needs no GPU."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import pipeline
import train
from cam import class_activation_maps
from conftest import ROOT, run_config
from data import RawData
from models import ResNet

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MLP = ("--num_hidden_layers", "4", "--residual_step", "2", "--val_size", "64", "--batch_size", "32")
CNN = ("--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "16", "--num_levels", "2",
       "--num_conv_per_level", "2", "--residual_step", "2", "--augment", "--optimizer", "sgd", "--lr", "0.05",
       "--val_size", "64", "--batch_size", "32")


@pytest.fixture
def cudnn_benchmark():
    """Put cuDNN's benchmark flag and torch's deterministic mode back as they were."""
    before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.cudnn.benchmark = before[0]
    torch.use_deterministic_algorithms(before[1])


def test_cudnn_benchmark_policy(cudnn_benchmark):
    torch.backends.cudnn.benchmark = False
    train.use_cudnn_benchmark(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark  # nothing to tune on the CPU: left alone
    train.use_cudnn_benchmark(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    train.use_cudnn_benchmark(torch.device("cuda"))
    assert not torch.backends.cudnn.benchmark  # timing could pick another algorithm in another process


def synthetic(dataset: str, n_train: int = 192, n_test: int = 64) -> RawData:
    """Random uint8 images and labels of the dataset's shape."""
    shape = (1, 28, 28) if dataset == "MNIST" else (3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (n, *shape), generator=generator, dtype=torch.uint8) for n in (n_train, n_test)]
    labels = [torch.randint(0, 10, (n,), generator=generator) for n in (n_train, n_test)]
    return RawData(images[0], labels[0], images[1], labels[1])


@needs_cuda
@pytest.mark.parametrize("flags,dataset", [(MLP, "MNIST"), (CNN, "CIFAR10")], ids=["mlp", "cnn"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_train_one_epoch_on_cuda(cudnn_benchmark, flags, dataset, precision):
    config = replace(run_config(*flags), device="cuda")
    raw = synthetic(dataset)
    full = train.prepare_run(config, raw)
    run = train.prepare_run(replace(config, amp=precision != "float32", precision=precision), raw)
    assert torch.backends.cudnn.benchmark  # set by the run's setup, as in --jobs workers
    assert run.optimizer.defaults["fused"] and run.scaler.is_enabled() == (precision == "float16")
    cnn = config.model_name == "ResNet"
    assert run.train.images.is_contiguous(memory_format=torch.channels_last) or not cnn
    weights = list(train.logged_weights(run.model).values())
    assert all(w.is_cuda for w in weights)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights if w.ndim == 4)
    expected, result = train.train_one_epoch(full, 1, 0), train.train_one_epoch(run, 1, 0)
    assert result.grad_norms.shape == (result.steps, len(weights)) and result.grad_steps == list(range(result.steps))
    assert torch.isfinite(result.grad_norms).all() and (result.grad_norms > 0).all()
    # float16's norms are of the unscaled gradients: the same size as float32's
    torch.testing.assert_close(result.grad_norms[0], expected.grad_norms[0], rtol=0.1, atol=1e-3)
    assert result.loss == pytest.approx(expected.loss, rel=5e-2)
    val_loss, _ = train.evaluate(run.model, run.val, precision=precision)
    assert val_loss == pytest.approx(train.evaluate(full.model, full.val)[0], rel=5e-2)


def run_pipeline(*flags: str, deterministic: bool = False, torchrun: int = 0) -> subprocess.CompletedProcess:
    """pipeline.py in a fresh process (cuBLAS reads its workspace setting when CUDA starts)."""
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun),
                   "pipeline.py", *flags]
    else:
        code = ("import sys, torch; torch.use_deterministic_algorithms(%s); import pipeline, utils; "
                "utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(sys.argv[1:]))" % deterministic)
        command = [sys.executable, "-c", code, *flags]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@needs_cuda
def test_resume_on_cuda_is_bit_exact_with_deterministic_algorithms(cifar_root, tmp_path):
    """With torch.use_deterministic_algorithms (and so no cuDNN timing), a CNN trained with --amp (its GradScaler
    on GPUs older than compute capability 8.0) and resumed ends with the weights of an uninterrupted run."""
    flags = [*CNN, "--amp", "--device", "cuda", "--data_root", str(cifar_root), "--no-download",
             "--lr_schedule", "onecycle"]
    run_pipeline(*flags, "--num_epochs", "2", "--out_dir", str(tmp_path / "straight"), deterministic=True)
    run_pipeline(*flags, "--num_epochs", "1", "--out_dir", str(tmp_path / "cut"), deterministic=True)
    run_pipeline(*flags, "--num_epochs", "2", "--out_dir", str(tmp_path / "cut"), "--resume", deterministic=True)
    [straight], [resumed] = ([torch.load(p, weights_only=True) for p in (tmp_path / kind).glob("*/checkpoint.pt")]
                             for kind in ("straight", "cut"))
    assert straight["config"]["precision"] == train.amp_precision(torch.device("cuda"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert straight["grad_scaler"] == resumed["grad_scaler"]


@needs_cuda
def test_jobs_2_train_round_robin_over_the_devices(mnist_root, tmp_path):
    pipeline.main(pipeline.get_args_parser().parse_args(
        ["--num_hidden_layers", "2", "4", "--val_size", "100", "--device", "cuda", "--jobs", "2", "--data_root",
         str(mnist_root), "--no-download", "--out_dir", str(tmp_path)]))
    devices = sorted(json.loads(p.read_text())["device"] for p in tmp_path.glob("*/config.json"))
    count = torch.cuda.device_count()
    assert devices == sorted(f"cuda:{w % count}" for w in range(2))


@needs_cuda
def test_torchrun_with_nccl(cifar_root, tmp_path):
    """One process per GPU, at most 2 (nccl allows one rank per GPU); with 2, batch norm synchronised. With one GPU
    torchrun starts one process, which runs without a process group."""
    processes = min(2, torch.cuda.device_count())
    done = run_pipeline(*CNN, "--device", "cuda", "--data_root", str(cifar_root), "--no-download", "--num_epochs",
                        "1", "--out_dir", str(tmp_path), *(["--sync_bn"] if processes > 1 else []),
                        torchrun=processes)
    [history] = [json.loads(p.read_text()) for p in tmp_path.glob("*/history.json")]
    assert "test" in history and "epoch 1/1" in done.stdout


@needs_cuda
def test_cam_on_cuda_equals_cam_on_the_cpu():
    torch.manual_seed(0)
    model = ResNet(3, 10, out_channels=16, num_levels=3, num_conv_per_level=2, residual_step=2).eval()
    images, classes = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions keep 10 bits of mantissa: 1e-3, not 1e-4
    try:
        with torch.no_grad():
            cpu_maps, cpu_logits = class_activation_maps(model, images, classes)
            cuda_maps, cuda_logits = class_activation_maps(model.cuda(), images.cuda(), classes.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(cuda_maps.cpu(), cpu_maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)


def test_gpu_check_reads_mnist_from_its_gz_files_and_names_a_missing_one(tmp_path):
    import gzip

    import gpu_check
    from conftest import write_mnist
    from utils import UsageError
    raw = write_mnist(tmp_path / "plain") / "MNIST" / "raw"
    gz = tmp_path / "gz"
    gz.mkdir()
    for path in raw.iterdir():
        (gz / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    gpu_check.unpack_mnist(gz, tmp_path / "data" / "MNIST" / "raw")
    assert all((tmp_path / "data" / "MNIST" / "raw" / p.name).read_bytes() == p.read_bytes() for p in raw.iterdir())
    (gz / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")  # was a BadGzipFile traceback
    with pytest.raises(UsageError, match="cannot unpack t10k-labels-idx1-ubyte.gz"):
        gpu_check.unpack_mnist(gz, tmp_path / "again")
    (gz / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UsageError, match="no t10k-labels-idx1-ubyte.gz"):
        gpu_check.unpack_mnist(gz, tmp_path / "once more")
    assert not (tmp_path / "once more").exists()  # checked before any folder is made


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_a_gpu_says_so_and_advises_no_cpu_run(tmp_path, capsys):
    """Once its one line advised --device cpu, which it then refused."""
    import gpu_check
    from utils import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gpu_check.main, gpu_check.get_args_parser().parse_args(["--mnist_gz", str(tmp_path),
                                                                        "--out_dir", str(tmp_path / "out")]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "needs a CUDA device" in lines[0], lines
    assert "--device cpu" not in lines[0] and not (tmp_path / "out").exists()


def test_gpu_check_refuses_an_out_dir_it_cannot_write_before_unpacking(tmp_path, capsys, monkeypatch):
    """--out_dir naming a file was a NotADirectoryError traceback (seen with CUDA reported present, as here)."""
    import gpu_check
    from utils import run_cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what is checked here needs no GPU
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gpu_check.main, gpu_check.get_args_parser().parse_args(["--mnist_gz", str(tmp_path / "gz"),
                                                                        "--out_dir", str(tmp_path / "a_file")]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "--out_dir" in lines[0], lines
    assert (tmp_path / "a_file").read_text() == "mine"
