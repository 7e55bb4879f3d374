"""Tiny MNIST and CIFAR-10 written in their official on-disk formats, so the real loading code runs offline."""
from __future__ import annotations

import contextlib
import copy
import io
import pickle
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def pytest_addoption(parser):
    parser.addoption("--fuzz", action="store_true", help="run every case of tests/test_fuzz.py, not only its subset")


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: a fuzz case beyond the seeded subset; runs with --fuzz (make fuzz)")
    # a shell without job control starts `make test &` with SIGINT ignored, which every process a test starts would
    # inherit; the interruption tests need Ctrl-C to raise KeyboardInterrupt, here and in those processes
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "longest: the suite's longest test; started first, so that the other "
                                       "pytest-xdist worker's short tests run beside it instead of after it")


def pytest_collection_modifyitems(config, items):
    """The longest test first; without --fuzz, leave out the fuzz cases beyond the seeded subset."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: the others keep their order
    if config.getoption("--fuzz"):
        return
    left_out = [item for item in items if item.get_closest_marker("fuzz")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("fuzz")]


# the tiny MLP run of the resume, pipeline and precision tests: its name, and its flags beside a data root and out_dir
RUN = "mlp_mnist_h4_w8_plain_s0"


def args_for(mnist_root, out_dir, *extra: str) -> list[str]:
    return ["--data_root", str(mnist_root), "--no-download", "--val_size", "100", "--batch_size", "50",
            "--width", "8", "--device", "cpu", "--out_dir", str(out_dir), *extra]


def without_seconds(history: dict) -> dict:
    """A history without the wall-clock seconds of its epochs and its test: what two runs of one config share."""
    test = {k: v for k, v in history["test"].items() if k != "seconds"} if "test" in history else None
    return dict(history, epochs=[{k: v for k, v in e.items() if k != "seconds"} for e in history["epochs"]],
                **({"test": test} if test is not None else {}))


def run_main(*args: str):
    """pipeline.py's main on these flags, in this process."""
    import pipeline
    return pipeline.main(pipeline.get_args_parser().parse_args(list(args)))


def cli_exit(capsys, *args: str) -> tuple[int, list[str]]:
    """Run the pipeline CLI in-process as a user would; return its exit status and stderr lines."""
    import pipeline
    import utils
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(list(args)))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def run_config(*flags: str):
    """The first RunConfig pipeline.py plans from these flags, on the CPU (the real flag-to-config path)."""
    import pipeline
    args = pipeline.get_args_parser().parse_args(["--device", "cpu", *flags])
    return pipeline.run_configs(args, torch.device("cpu"))[0]


def replay(loader):
    """A copy of a TrainLoader over the same tensors whose order continues from where `loader` stands, to replay
    its batches without advancing it."""
    order = copy.copy(loader)
    order.generator = torch.Generator()
    order.load_state_dict(loader.state_dict())
    return order


def image_of_step(run, step: int) -> int:
    """The first training image of the batch that a run's loader puts at `step` steps from now (over epochs; a run
    without --augment, whose crops draw from the same generator)."""
    order = replay(run.train)
    while True:
        batches = order.epoch_indices()
        if step < len(batches):
            return batches[step][0].item()
        step -= len(batches)


def damage_weights(path: Path, name: str) -> None:
    """Flip 40 bytes inside the data of the saved weight tensor `name` of the checkpoint at `path`, as a disk or copy
    error would (torch.load reads such a file without complaint)."""
    data = bytearray(path.read_bytes())
    start = data.find(torch.load(path, weights_only=True)["model"][name].numpy().tobytes())
    assert start >= 0
    data[start:start + 40] = bytes(byte ^ 0xFF for byte in data[start:start + 40])
    path.write_bytes(bytes(data))


def class_images(labels: np.ndarray, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy uint8 images whose bright row band depends on the label, so that a model can learn them."""
    images = rng.integers(0, 60, (len(labels), channels, size, size))
    band = size // 10
    for c in range(10):
        images[labels == c, :, c * band:(c + 1) * band, :] += 180
    return images.clip(0, 255).astype(np.uint8)


def write_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Write MNIST's four uncompressed IDX files under `root/MNIST/raw`, as torchvision expects them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = class_images(labels, 1, 28, rng)[:, 0]
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def write_cifar10(root: Path, n_per_batch: int = 100, n_test: int = 100, seed: int = 0) -> Path:
    """Write `cifar-10-batches-py` with five training batches and a test batch of protocol-2 pickles."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = rng.integers(0, 10, n)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(),
                 b"data": class_images(labels, 3, 32, rng).reshape(n, 3072),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding a tiny MNIST (600 train, 200 test images)."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A data root holding a tiny CIFAR-10 (500 train, 100 test images)."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def finished_run(mnist_root, tmp_path_factory) -> Path:
    """The folder of a finished 1-epoch run of test_resume's tiny MLP, beside its plots/: with a constant learning
    rate, also the first epoch of a longer run. Copy it before changing it."""
    out_dir = tmp_path_factory.mktemp("finished")
    run_main(*args_for(mnist_root, out_dir, "--num_epochs", "1"))
    return out_dir / RUN


@pytest.fixture(scope="session")
def pipeline_help() -> tuple[int, str]:
    """The exit status and output of `pipeline.py -h`: pipeline's parser given -h, once, for the tests that read
    the help."""
    import pipeline
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        pipeline.get_args_parser().parse_args(["-h"])
    return exit_info.value.code, out.getvalue()
