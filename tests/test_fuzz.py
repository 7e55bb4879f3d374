"""A scripted fuzz of pipeline.py: hostile command lines (absurd, negative, NaN, huge and malformed values of every
flag, alone and combined) on the tiny datasets. Each ends with exit status 0, 1 (a run failed, named) or 2 (refused),
and never with a Python traceback. `make test` runs a seeded subset; `make fuzz` (pytest --fuzz) runs them all."""
import random

import pytest

import pipeline
import utils

NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e308", str(2 ** 63), "99999999999999999999", "abc", "", "1.5", "0x10"]
# hostile values per flag (a tuple: several values), beside NUMBERS for the numeric ones; a legal one trains in seconds
VALUES = {
    "model_name": ["VGG", "mlp", ""], "dataset": ["ImageNet", "", "mnist"], "stem": ["vgg", ""],
    "shortcut": ["none", ""], "optimizer": ["lbfgs", ""], "lr_schedule": ["linear", ""],
    "preset": ["resnet8", "resnet20", "resnet38", "exercise2", "resnet99", ""],
    "num_hidden_layers": ["1000", "1001", ("3", "5"), ("2", "0")], "num_conv_per_level": ["300", "1201", ("1", "0")],
    "residual_step": ["1", "5", "1201", ("0", "-2")], "width": ["4096", "65537", "65536", ("8", "0")],
    "out_channels": ["65536", "65537", "1"], "num_levels": ["10", "16", "17"], "num_classes": ["9", "100000", "100001"],
    "in_channels": ["3", "1"], "input_size": ["32", "28"], "val_size": ["1", "500", "599", "600", "100000"],
    "limit_train": ["1", "2", "499", "500", "501"], "seed": ["4294967295", "4294967296", ("0", "0"), "-0"],
    "num_epochs": ["2", "100001"], "batch_size": ["1", "2", "10000000", "10000001"],
    "lr": ["1e-30", "1e30"], "momentum": ["1e30", "1"], "weight_decay": ["1e30"],
    "warmup_epochs": ["0.5", "1", "0.999999"], "label_smoothing": ["0.999", "1", "-0.0"],
    "threads": ["1", "8", "9", "10000"], "jobs": ["2", "1000"], "grad_log_every": ["1000000", str(2 ** 62 + 1)],
    "device": ["cpu", "cuda", "cuda:7", "tpu", "", "cuda:-1", "meta"],
    "run_name": ["", ".", "..", "/", "a/b", "x" * 300, "-", "a name", ("a", "b")],
    "wandb_proj_name": ["", "a/b", "x" * 200],
    "out_dir": ["{tmp}/file/runs", "{tmp}/file", ""], "plots_dir": ["{tmp}/file/plots", ""],
    "data_root": ["{tmp}/nowhere", "{tmp}/file", ""],
    "checkpoint": ["{tmp}/file", "{tmp}/nowhere/c.pt", "", "{tmp}"],
}
NUMERIC = {"num_hidden_layers", "num_conv_per_level", "residual_step", "width", "out_channels", "num_levels",
           "num_classes", "in_channels", "input_size", "val_size", "limit_train", "seed", "num_epochs", "batch_size",
           "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "threads", "jobs", "grad_log_every"}
SWITCHES = ["--augment", "--nesterov", "--amp", "--sync_bn", "--no-train", "--resume", "--overwrite", "--tensorboard",
            "--no-download"]
MLP = ["--width", "8", "--num_hidden_layers", "1"]
CNN = ["--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "4", "--num_levels", "2",
       "--num_conv_per_level", "1"]
COUNT, SUBSET = 240, 12


def hostile_command_lines(count: int, seed: int = 0) -> list[list[str]]:
    """`count` command lines: a tiny MLP or CNN run with one to three flags set to hostile values (or switched)."""
    rng = random.Random(seed)
    flags = sorted(set(VALUES) | NUMERIC)
    lines = []
    for i in range(count):
        line = list(rng.choice([MLP, CNN]))
        for _ in range(1 + i % 3):
            if rng.random() < 0.15:
                line.append(rng.choice(SWITCHES))
                continue
            flag = rng.choice(flags)
            value = rng.choice(VALUES.get(flag, []) + (NUMBERS if flag in NUMERIC else []))
            spelling = flag.replace("_", "-") if rng.random() < 0.3 else flag
            line += [f"--{spelling}", *(value if isinstance(value, tuple) else (value,))]
        lines.append(line)
    return lines


CASES = hostile_command_lines(COUNT)
CHOSEN = set(random.Random(1).sample(range(COUNT), SUBSET))


@pytest.mark.parametrize("index", [i if i in CHOSEN else pytest.param(i, marks=pytest.mark.fuzz)
                                   for i in range(COUNT)])
def test_hostile_command_line_ends_in_0_1_or_2_without_a_traceback(index, mnist_root, cifar_root, tmp_path, capsys,
                                                                   monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder or a checkpoint")
    monkeypatch.chdir(tmp_path)  # an empty --out_dir or --data_root means this folder
    data_root = str(cifar_root if "CIFAR10" in CASES[index] else mnist_root)
    base = ["--data_root", data_root, "--no-download", "--val_size", "100", "--limit_train", "50", "--batch_size",
            "25", "--num_epochs", "1", "--device", "cpu", "--out_dir", str(tmp_path / "runs")]
    line = base + [arg.format(tmp=tmp_path) for arg in CASES[index]]
    try:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(line))
        status = 0
    except SystemExit as e:
        status = e.code or 0
    err = capsys.readouterr().err
    assert status in (0, 1, 2), (line, status, err)
    assert "Traceback" not in err, (line, err)
    if status == 2:
        assert len(err.strip().splitlines()) == 1, (line, err)
