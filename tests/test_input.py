"""Hostile input refused up front with one line and exit status 2: flag values, run names, checkpoints that name the
wrong thing, and dataset files that are cut or inconsistent."""
import os
import re
import struct
import sys

import numpy as np
import pytest

import cam
import pipeline
import runs
import utils
from conftest import write_cifar10, write_mnist
from data import DatasetError, load_dataset


def cli_exit(capsys, main, parser, *args: str) -> tuple[int, list[str]]:
    """Run a CLI in-process as a user would; return its exit status and stderr lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main, parser.parse_args(list(args)))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def pipeline_exit(capsys, *args: str) -> tuple[int, list[str]]:
    return cli_exit(capsys, pipeline.main, pipeline.get_args_parser(), *args)


def mlp_flags(mnist_root, out_dir, *extra: str) -> list[str]:
    return ["--data_root", str(mnist_root), "--no-download", "--val_size", "100", "--width", "8", "--device", "cpu",
            "--num_hidden_layers", "1", "--out_dir", str(out_dir), *extra]


@pytest.fixture(scope="module")
def cnn_checkpoint(cifar_root, tmp_path_factory):
    """The checkpoint of a tiny residual CNN trained one epoch on the tiny CIFAR-10."""
    out_dir = tmp_path_factory.mktemp("cnn")
    (config, _), = pipeline.main(pipeline.get_args_parser().parse_args([
        "--model_name", "ResNet", "--dataset", "CIFAR10", "--data_root", str(cifar_root), "--no-download",
        "--val_size", "100", "--limit_train", "64", "--batch_size", "32", "--num_levels", "2", "--out_channels", "4",
        "--num_conv_per_level", "1", "--residual_step", "1", "--device", "cpu", "--out_dir", str(out_dir)]))
    return out_dir / config.run_name / "checkpoint.pt"


@pytest.mark.parametrize("flags,message", [
    (["--weight_decay", "nan"], "--weight_decay"),
    (["--weight_decay", "inf"], "--weight_decay"),
    (["--optimizer", "sgd", "--momentum", "nan"], "--momentum must be"),
    (["--optimizer", "sgd", "--momentum=-inf"], "--momentum must be"),
    (["--lr", "inf"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "0", str(2 ** 40)], "--seed"),
    (["--threads", "10000"], "--threads"),
    (["--run_name", ""], "--run_name"),
    (["--run_name", ".."], "--run_name"),
    (["--run_name", "../../x"], "--run_name"),
    (["--run_name", "a/b"], "--run_name"),
    (["--run_name", "a" * 300], "is 300 bytes long, more than 200"),
    (["--run_name", "a" * 201], "is 201 bytes long, more than 200"),  # gradient_heatmap_<run name>.png would not fit
    (["--run_name", "   "], "--run_name '   ' is empty or blanks only"),
    (["--run_name", "a\tb"], "holds a control character"),
    (["--run_name", "a\nb"], "holds a control character"),
    (["--run_name", os.fsdecode(b"caf\xe9")], "holds bytes that are not text (UTF-8)"),
    (["--run_name", "plots"], "folder would be the figures' folder"),
    (["--num_hidden_layers", "100000"], "--num_hidden_layers"),
    (["--width", "4096", "--num_hidden_layers", "1000"], "parameters"),
])
def test_bad_values_are_refused_before_anything_is_read(mnist_root, tmp_path, capsys, flags, message):
    status, lines = pipeline_exit(capsys, *mlp_flags(tmp_path / "no data here", tmp_path / "runs", *flags))  # unread
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags,message", [
    (["--out_dir", ""], "--out_dir '' names no folder"),  # it trained into the current folder
    (["--plots_dir", " "], "--plots_dir ' ' names no folder"),
    (["--out_dir", "{tmp}/loop/runs"], "--out_dir {tmp}/loop/runs cannot be reached (Symlink loop"),  # a traceback
    (["--plots_dir", "{tmp}/loop"], "--plots_dir {tmp}/loop cannot be reached (Symlink loop"),  # after training
    (["--checkpoint", "{tmp}/file/checkpoint.pt"], "{tmp}/file is not a folder"),  # after the first epoch, exit 1
    (["--checkpoint", "{tmp}/loop/checkpoint.pt"], "--checkpoint {tmp}/loop cannot be reached (Symlink loop"),
])
def test_paths_a_command_cannot_write_are_refused_before_it_trains(mnist_root, tmp_path, capsys, monkeypatch, flags,
                                                                   message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "loop").symlink_to("loop")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    status, lines = pipeline_exit(capsys, *mlp_flags(mnist_root, tmp_path / "runs", "--num_epochs", "1", *flags))
    assert status == 2 and len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "loop"]


CNN = ("--model_name", "ResNet", "--dataset", "CIFAR10")


@pytest.mark.parametrize("flags,message", [
    (["--stem", "imagenet"], "--stem is a ResNet setting: no run of this MLP sweep uses it; leave it out"),
    ([*CNN, "--num_hidden_layers", "30"], "--num_hidden_layers is an MLP setting"),
    ([*CNN, "--num_hidden_layers", "4"], "--num_hidden_layers is an MLP setting"),  # its default value, given
    (["--momentum", "0.5"], "--momentum is SGD's (Adam has none)"),
    ([*CNN, "--shortcut", "projection"], "every run is plain"),
    (["--wandb_proj_name", "mine"], "--wandb_proj_name names the W&B project of --wandb"),
    (["--wandb_proj_name", "depth-residual-convolutions"], "--wandb_proj_name names the W&B project of --wandb"),
    (["--preset", "exercise1", "--model_name", "ResNet"], "(set by --preset exercise1: --num_hidden_layers)"),
    (["--preset", "exercise2", "--optimizer", "adam"], "(set by --preset exercise2: --momentum, --nesterov)"),
])
def test_flags_no_run_would_use_are_refused(tmp_path, capsys, flags, message):
    """Once silently ignored, and recorded in config.json (a resume with another --momentum was then refused)."""
    status, lines = pipeline_exit(capsys, "--data_root", str(tmp_path / "no data here"), "--no-download", "--device",
                                  "cpu", "--out_dir", str(tmp_path / "runs"), *flags)
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_an_existing_checkpoint_without_resume_names_the_checkpoint(mnist_root, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(b"a file the user keeps")
    status, lines = pipeline_exit(capsys, *mlp_flags(mnist_root, tmp_path / "runs", "--checkpoint", str(elsewhere)))
    assert status == 2 and len(lines) == 1
    assert "--checkpoint" in lines[0] and "elsewhere.pt" in lines[0] and "--resume" in lines[0]
    assert "already holds a run" not in lines[0] and elsewhere.read_bytes() == b"a file the user keeps"


def test_resuming_a_checkpoint_of_the_other_family_names_the_model(mnist_root, cifar_root, tmp_path, capsys,
                                                                    cnn_checkpoint):
    checkpoint = tmp_path / "cnn.pt"
    checkpoint.write_bytes(cnn_checkpoint.read_bytes())
    status, lines = pipeline_exit(capsys, *mlp_flags(mnist_root, tmp_path / "runs", "--checkpoint", str(checkpoint),
                                                     "--resume"))
    assert status == 2 and len(lines) == 1 and "--model_name ResNet, not MLP" in lines[0], lines
    assert checkpoint.read_bytes() == cnn_checkpoint.read_bytes()


def forged(cnn_checkpoint, tmp_path, **config) -> str:
    """The CNN's checkpoint with its config changed."""
    saved = runs.load_checkpoint(cnn_checkpoint)
    saved["config"].update(config)
    path = tmp_path / "forged.pt"
    runs.save_checkpoint(path, saved)
    return str(path)


@pytest.mark.parametrize("config,message", [
    (dict(dataset="SVHN"), "--dataset 'SVHN'"),
    (dict(dataset="MNIST"), "--in_channels 3 does not match MNIST"),  # CIFAR weights and shapes, MNIST named
    (dict(dataset="MNIST", in_channels=1, input_size=28), "weights do not fit the ResNet its config describes "
                                                         "(size mismatch for stem"),  # MNIST shapes, CIFAR weights
])
def test_a_checkpoint_naming_the_wrong_data_is_one_line_in_both_tools(cnn_checkpoint, mnist_root, tmp_path, capsys,
                                                                      config, message):
    path = forged(cnn_checkpoint, tmp_path, **config)
    status, lines = pipeline_exit(capsys, "--no-train", "--checkpoint", path, "--data_root", str(mnist_root),
                                  "--no-download", "--device", "cpu")
    assert status == 2 and len(lines) == 1 and message in lines[0] and "forged.pt" in lines[0], lines
    status, lines = cli_exit(capsys, cam.main, cam.get_args_parser(), "--checkpoint", path, "--data_root",
                             str(mnist_root), "--no-download", "--device", "cpu", "--out_dir", str(tmp_path / "cam"))
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "cam").exists()


def test_an_idx_file_cut_inside_its_header_is_one_line(tmp_path):
    root = write_mnist(tmp_path, n_train=20, n_test=10)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:9])  # magic, count and one byte of the row count
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("MNIST", root, download=False)


def test_mnist_labels_out_of_range_or_fewer_than_images_are_refused(mnist_root, tmp_path, capsys):
    root = write_mnist(tmp_path / "bad", n_train=20, n_test=10)
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(good[:-1] + bytes([12]))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.*0\.\.9.*12"):
        load_dataset("MNIST", root, download=False)
    labels.write_bytes(struct.pack(">II", 2049, 15) + good[8:23])
    with pytest.raises(DatasetError, match="20 images but 15 labels"):
        load_dataset("MNIST", root, download=False)
    status, lines = pipeline_exit(capsys, *mlp_flags(root, tmp_path / "runs", "--val_size", "5"))
    assert status == 2 and len(lines) == 1 and "15 labels" in lines[0]


def idx(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding `array`."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("file,array,message", [
    ("train-images-idx3-ubyte", np.zeros((20, 32, 32), np.uint8), "images of shape (20, 1, 32, 32)"),
    ("train-images-idx3-ubyte", np.zeros((20, 784), np.uint8), "images of shape (20, 1, 784)"),
    ("train-labels-idx1-ubyte", np.zeros((20, 1), np.uint8), "labels of shape (20, 1), not one per image"),
    ("train-labels-idx1-ubyte", np.zeros((), np.uint8), "labels of shape (), not one per image"),
    ("t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), "images of shape (0, 1, 28, 28)"),
])
def test_mnist_files_of_another_shape_are_refused_before_training(tmp_path, capsys, file, array, message):
    """Each trained and then failed (a shape mismatch, 'len() of a 0-d tensor', 'float division by zero' after a
    whole epoch), leaving a run folder behind."""
    root = write_mnist(tmp_path / "bad", n_train=20, n_test=10)
    (root / "MNIST" / "raw" / file).write_bytes(idx(array))
    status, lines = pipeline_exit(capsys, *mlp_flags(root, tmp_path / "runs", "--val_size", "5"))
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage,message", [
    ({b"data": np.zeros((4, 32, 32, 3), np.uint8)}, "data of shape (4, 32, 32, 3)"),  # height-width-channel
    ({b"data": np.zeros((4, 3072), np.float32)}, "type float32, not N x 3072 bytes"),  # would become black
    ({b"labels": [0.5, 3.5, 1.0, 2.0]}, "labels of type float64, not integers"),  # would be truncated
    ({b"labels": [[0], [1], [2], [3]]}, "labels of shape (4, 1), not one per image"),
])
def test_cifar_batches_of_another_shape_or_type_are_refused(tmp_path, damage, message):
    import pickle
    root = write_cifar10(tmp_path, n_per_batch=4, n_test=4)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    path.write_bytes(pickle.dumps({**batch, **damage}, protocol=2))
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_dataset("CIFAR10", root, download=False)
    path.write_bytes(pickle.dumps({k.decode(): v for k, v in batch.items() if k != b"data"}, protocol=2))
    with pytest.raises(DatasetError, match="has no b'data' entry"):  # a batch with str keys, or none
        load_dataset("CIFAR10", root, download=False)


def test_cifar_labels_out_of_range_are_refused(tmp_path):
    import pickle
    root = write_cifar10(tmp_path, n_per_batch=4, n_test=4)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"labels"][2] = 10
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_3.*0\.\.9.*10"):
        load_dataset("CIFAR10", root, download=False)
    batch[b"labels"] = batch[b"labels"][:3]
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match="4 images but 3 labels"):
        load_dataset("CIFAR10", root, download=False)


def test_a_command_started_with_its_stdout_closed_ends_as_it_would(monkeypatch):
    """`pipeline.py ... >&-`: Python gives such a process no sys.stdout (None), and the flush after main, once the
    command had done its work, was an AttributeError traceback with exit status 1."""
    monkeypatch.setattr(sys, "stdout", None)
    done = []
    utils.run_cli(lambda args: done.append(print("goes nowhere")), None)  # returns: exit status 0
    assert done == [None] and sys.stdout is None
