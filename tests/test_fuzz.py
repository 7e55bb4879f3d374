"""A scripted fuzz of the CLIs: hostile command lines for pipeline.py (absurd, negative, NaN, huge and malformed values
of every flag, alone and combined), and run folders damaged in every file they hold (cut, garbled, swapped, replaced
by a folder, removed) followed by the commands a user runs next (pipeline.py --resume, report.py, --no-train,
cam.py), on the tiny datasets. Each ends with exit status 0, 1 (a run failed, named) or 2 (refused), never with a
Python traceback, and no finished run is lost or altered. `make test` runs a seeded subset of each; `make fuzz`
(pytest --fuzz) runs them all."""
import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import cam
import pipeline
import report
import train
import utils
from runs import load_checkpoint, save_checkpoint

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
    "run_name": ["", ".", "..", "/", "a/b", "x" * 300, "x" * 201, "-", "a name", ("a", "b"), "   ", "a\tb", "a\x1bb",
                 "a\nb", "caf\udce9", "\u200b"],
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


def cli_status(main, parser, line: list[str], capsys) -> tuple[int, str]:
    """Run a CLI in this process as its `__main__` does (parse the line, then utils.run_cli): exit status, stderr."""
    capsys.readouterr()
    try:
        utils.run_cli(main, parser.parse_args(line))
        status = 0
    except SystemExit as e:
        status = e.code or 0
    return status, capsys.readouterr().err


def assert_ends_cleanly(line: list[str], status: int, err: str) -> None:
    """Exit status 0, 1 (a run failed, named) or 2 (refused, in one line: the last, after any of report.py's lines
    listing the run folders it did not use), and never a Python traceback."""
    assert status in (0, 1, 2), (line, status, err)
    assert "Traceback" not in err, (line, err)
    if status == 2:
        *listed, refusal = err.strip().splitlines()
        assert "error: " in refusal and all(": not used: " in x or ": missing: " in x for x in listed), (line, err)


def seeded_subset(count: int, size: int, seed: int, kinds: list | None = None) -> list:
    """Indices 0..count-1 as pytest params: `size` of them, chosen by `seed` (one of each kind first, case i being
    of kind kinds[i], when given), run always; the others with --fuzz."""
    rng = random.Random(seed)
    chosen = {rng.choice([i for i in range(count) if kinds[i] == kind]) for kind in dict.fromkeys(kinds or [])}
    chosen |= set(rng.sample(sorted(set(range(count)) - chosen), size - len(chosen)))
    return [i if i in chosen else pytest.param(i, marks=pytest.mark.fuzz) for i in range(count)]


@pytest.mark.parametrize("index", seeded_subset(COUNT, SUBSET, seed=1))
def test_hostile_command_line_ends_in_0_1_or_2_without_a_traceback(index, mnist_root, cifar_root, tmp_path, capsys,
                                                                   monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder or a checkpoint")
    monkeypatch.chdir(tmp_path)  # an empty --out_dir or --data_root means this folder
    data_root = str(cifar_root if "CIFAR10" in CASES[index] else mnist_root)
    base = ["--data_root", data_root, "--no-download", "--val_size", "100", "--limit_train", "50", "--batch_size",
            "25", "--num_epochs", "1", "--device", "cpu", "--out_dir", str(tmp_path / "runs")]
    line = base + [arg.format(tmp=tmp_path) for arg in CASES[index]]
    assert_ends_cleanly(line, *cli_status(pipeline.main, pipeline.get_args_parser(), line, capsys))


# The file-corruption fuzz: every file a run folder holds, damaged as a full disk, a kill -9, a bad copy or a hand
# edit would, then the commands a user runs next. A finished run is never lost or altered: its checkpoint and history
# stay byte for byte what they were, or heal to what they were before the damage.
RUN = "mlp_mnist_h1_w8_plain_s0"
TARGETS = {"checkpoint": "checkpoint.pt", "config": "config.json", "history": "history.json",
           "grad_norms": "grad_norms.csv", "lock": ".lock", "leftover": ".checkpoint.pt.k2j4x.tmp",
           "tensorboard": "tensorboard/events"}
DAMAGES = ["empty", "cut_in_header", "cut_in_half", "cut_last_byte", "random_bytes", "flipped_bytes",
           "valid_but_wrong", "other_runs_file", "a_folder", "removed"]
# what a JSON or CSV file may hold that parses but is not what the run wrote
WRONG_TEXT = {
    "config.json": ['{"model_name": "VGG"}', "[]", "null", '{"num_epochs": "many", "model_name": "MLP"}', "{}"],
    "history.json": ['{"epochs": []}', '{"epochs": "x", "test": 1}', "[]",
                     '{"epochs": [{"train_loss": "nan"}], "test": {"acc": 0.5}}',
                     '{"epochs": [{"epoch": 1, "train_loss": 1, "val_acc": 0.1, "seconds": 1, "steps": 2}], '
                     '"test": {"loss": 1}}'],
    "grad_norms.csv": ["step\n", "step,a,b\n0,1,2\n", "x,y\n1,2\n", "step,fc.weight\n0,nan\n0,inf\n",
                       "step\n0\n1\n"],
}
# (run, command): the runs are a finished and an unfinished MLP (tracked in TensorBoard) and a finished tiny ResNet
COMMANDS = [("finished", "resume"), ("finished", "again"), ("finished", "report"), ("finished", "evaluate"),
            ("unfinished", "resume"), ("unfinished", "report"), ("unfinished", "evaluate"), ("cnn", "cam")]
CORRUPTIONS = [(run, command, target, damage) for run, command in COMMANDS for target in TARGETS for damage in DAMAGES
               if run != "cnn" or target == "checkpoint"]
CORRUPTION_SUBSET = 12
# damage to a checkpoint that loses the model for good (flipped bytes may land in the weights and go unnoticed)
LOSES_THE_MODEL = ("empty", "cut_in_header", "cut_in_half", "cut_last_byte", "random_bytes", "valid_but_wrong",
                   "removed")
# the files that hold a finished run's result
RESULT = ("checkpoint.pt", "history.json")


def mlp_flags(mnist_root: Path, out_dir: Path, epochs: int) -> list[str]:
    return ["--width", "8", "--num_hidden_layers", "1", "--data_root", str(mnist_root), "--no-download",
            "--val_size", "100", "--limit_train", "50", "--batch_size", "25", "--num_epochs", str(epochs),
            "--device", "cpu", "--tensorboard", "--out_dir", str(out_dir)]


@pytest.fixture(scope="session")
def run_folders(mnist_root, cifar_root, tmp_path_factory) -> dict[str, Path]:
    """Sweep folders, each holding one run: a finished 1-epoch MLP, a 2-epoch MLP stopped by Ctrl-C in its second
    epoch, and a finished tiny ResNet for cam.py; copy them before damaging them."""
    root = tmp_path_factory.mktemp("fuzz_runs")
    pipeline.main(pipeline.get_args_parser().parse_args(mlp_flags(mnist_root, root / "finished", 1)))

    def interrupted_in_epoch_2(run, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_one_epoch(run, epoch, *args)
    train_one_epoch = train.train_one_epoch
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(train, "train_one_epoch", interrupted_in_epoch_2)
        pipeline.main(pipeline.get_args_parser().parse_args(mlp_flags(mnist_root, root / "unfinished", 2)))
    pipeline.main(pipeline.get_args_parser().parse_args([
        "--model_name", "ResNet", "--dataset", "CIFAR10", "--data_root", str(cifar_root), "--no-download",
        "--val_size", "50", "--limit_train", "64", "--num_epochs", "1", "--batch_size", "32", "--out_channels", "16",
        "--num_levels", "2", "--num_conv_per_level", "1", "--residual_step", "2", "--grad_log_every", "0",
        "--device", "cpu", "--out_dir", str(root / "cnn"), "--run_name", RUN]))
    return {name: root / name for name in ("finished", "unfinished", "cnn")}


def target_path(run_dir: Path, target: str) -> Path:
    """The file of the run folder that `target` names (TensorBoard's event file by its prefix)."""
    if target == "tensorboard":
        return next((run_dir / "tensorboard").glob("events*"))
    return run_dir / TARGETS[target]


def damaged(data: bytes, name: str, damage: str, rng: random.Random) -> bytes:
    """`data`, the bytes of file `name`, after `damage` (one of DAMAGES that leaves a file)."""
    if damage == "empty":
        return b""
    if damage == "cut_in_header":  # inside a zip's local header, a JSON's first key, a CSV's header row
        return data[:rng.randint(1, min(40, max(1, len(data) - 1)))]
    if damage == "cut_in_half":
        return data[:len(data) // 2]
    if damage == "cut_last_byte":
        return data[:-1]
    if damage == "random_bytes":
        return rng.randbytes(max(len(data), 16))
    if damage == "flipped_bytes":
        flipped = bytearray(data or b"\0")
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 0xFF
        return bytes(flipped)
    if name in WRONG_TEXT:
        return rng.choice(WRONG_TEXT[name]).encode()
    return torch_bytes(rng.choice([{}, {"model": {}, "config": {}}, torch.zeros(3), [1, 2]]))


def torch_bytes(obj) -> bytes:
    """What torch.save writes for `obj`: a well-formed file that is not the run's checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def damage_run(run_dir: Path, other_run_dir: Path, target: str, damage: str, rng: random.Random) -> None:
    """Apply `damage` to `target` of the run folder; a leftover temporary file is added, damaged, as a writer killed
    mid-write leaves it."""
    path = target_path(run_dir, target)
    original = path.read_bytes() if target != "leftover" else (run_dir / "checkpoint.pt").read_bytes()
    if damage == "other_runs_file":
        other = target_path(other_run_dir, target if target != "leftover" else "checkpoint")
        path.write_bytes(other.read_bytes())
    elif damage == "a_folder":
        path.unlink(missing_ok=True)
        path.mkdir()
        (path / "inside").write_text("a file inside")
    elif damage == "removed":
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(damaged(original, path.name, damage, rng))


def fingerprint(path: Path) -> str | None:
    """A file's SHA-256, "folder" for a folder, None when there is nothing."""
    if path.is_dir():
        return "folder"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def command_line(run: str, command: str, out_dir: Path, mnist_root: Path, cifar_root: Path, tmp_path: Path):
    """(main, parser, line) of a command a user runs next on the sweep folder `out_dir` holding run `run`."""
    checkpoint = str(out_dir / RUN / "checkpoint.pt")
    if command == "cam":
        return cam.main, cam.get_args_parser(), ["--checkpoint", checkpoint, "--data_root", str(cifar_root),
                                                 "--no-download", "--num_images_to_save", "2", "--display_scale",
                                                 "1", "--device", "cpu", "--out_dir", str(tmp_path / "cam")]
    if command == "report":
        return report.main, report.get_args_parser(), ["--ex1", str(out_dir)]
    if command == "evaluate":
        return pipeline.main, pipeline.get_args_parser(), ["--no-train", "--checkpoint", checkpoint, "--data_root",
                                                           str(mnist_root), "--no-download", "--device", "cpu"]
    line = mlp_flags(mnist_root, out_dir, 1 if run == "finished" else 2)
    return pipeline.main, pipeline.get_args_parser(), line + (["--resume"] if command == "resume" else [])


@pytest.mark.parametrize("index", seeded_subset(len(CORRUPTIONS), CORRUPTION_SUBSET, seed=2,
                                                kinds=[case[:2] for case in CORRUPTIONS]))
def test_damaged_run_folder_ends_in_0_1_or_2_and_no_finished_run_is_lost(index, run_folders, mnist_root, cifar_root,
                                                                         tmp_path, capsys):
    run, command, target, damage = CORRUPTIONS[index]
    out_dir = tmp_path / run
    shutil.copytree(run_folders[run], out_dir)
    run_dir = out_dir / RUN
    other = run_folders["unfinished" if run == "finished" else "finished"] / RUN
    damage_run(run_dir, other, target, damage, random.Random(index))
    originals = {name: fingerprint(run_folders[run] / RUN / name) for name in RESULT}
    before = {name: fingerprint(run_dir / name) for name in RESULT}
    main, parser, line = command_line(run, command, out_dir, mnist_root, cifar_root, tmp_path)
    status, err = cli_status(main, parser, line, capsys)
    case = (run, command, target, damage, line)
    assert_ends_cleanly(case, status, err)
    if (run, command, target) == ("finished", "resume", "checkpoint") and damage in LOSES_THE_MODEL:
        assert status == 0 and f"warning: {RUN} has finished but its model is lost" in err, (case, err)
    if run != "unfinished":  # a finished run's result stays as it was, or heals back to what it was
        for name in RESULT:
            assert fingerprint(run_dir / name) in (before[name], originals[name]), (case, name, err)
    elif command == "resume" and before["checkpoint.pt"] == originals["checkpoint.pt"]:
        # the checkpoint is the truth: whatever happened to the side files, the run continues and finishes, unless
        # a folder stands where one of its files belongs, which is never removed for the user
        if damage == "a_folder" and target in ("config", "history", "grad_norms", "lock"):
            assert status == 2 and str(target_path(run_dir, target)) in err, (case, err)
        else:
            assert status == 0, (case, err)
            assert "test" in json.loads((run_dir / "history.json").read_text()), case


# every position of a run folder holding a symbolic link to a file elsewhere, then the commands a user runs next
LINKED = [(run, command, target) for run, command in COMMANDS if run != "cnn" for target in TARGETS]


@pytest.mark.parametrize("index", seeded_subset(len(LINKED), len(TARGETS), seed=3,
                                                kinds=[target for _, _, target in LINKED]))
def test_a_link_anywhere_in_a_run_folder_is_never_written_through(index, run_folders, mnist_root, cifar_root,
                                                                  tmp_path, capsys):
    """The file a link names stays as it was, the link stays a link, and a command that would write the run refuses
    the link of any file it writes in one line."""
    run, command, target = LINKED[index]
    out_dir, elsewhere = tmp_path / run, tmp_path / "elsewhere"
    shutil.copytree(run_folders[run], out_dir)
    link = target_path(out_dir / RUN, target)
    elsewhere.write_bytes(link.read_bytes() if link.exists() else (out_dir / RUN / "checkpoint.pt").read_bytes())
    link.unlink(missing_ok=True)
    link.symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    main, parser, line = command_line(run, command, out_dir, mnist_root, cifar_root, tmp_path)
    status, err = cli_status(main, parser, line, capsys)
    case = (run, command, target, line)
    assert_ends_cleanly(case, status, err)
    assert elsewhere.read_bytes() == before and (link.is_symlink() or target == "leftover"), case
    if command in ("resume", "again") and target not in ("tensorboard", "leftover"):
        assert status == 2 and f"{link} is a symbolic link" in err, (case, err)


# every entry of an unfinished run's checkpoint given a value of a wrong type (saved with a valid checksum, as a bug or
# a hand edit would), then --resume or --no-train
FIELDS = ("format", "model", "optimizer", "lr_scheduler", "grad_scaler", "epoch", "config", "history", "rng",
          "wandb_run_id")
WRONG_VALUES = [None, "x", -1, 1.5, True, [], {}, [1, 2], torch.zeros(2)]
FIELD_CASES = [(command, field, value) for command in ("resume", "evaluate") for field in FIELDS
               for value in range(len(WRONG_VALUES))]


@pytest.mark.parametrize("index", seeded_subset(len(FIELD_CASES), len(FIELDS), seed=4,
                                                kinds=[field for _, field, _ in FIELD_CASES]))
def test_a_checkpoint_field_of_a_wrong_type_is_refused_up_front_or_does_no_harm(index, run_folders, mnist_root,
                                                                                cifar_root, tmp_path, capsys):
    """Refused in one line (exit 2) before the plan says the run continues, never a run that fails after (exit 1),
    a traceback or a crash; a refused checkpoint stays as it was."""
    command, field, value = FIELD_CASES[index]
    out_dir = tmp_path / "unfinished"
    shutil.copytree(run_folders["unfinished"], out_dir)
    path = out_dir / RUN / "checkpoint.pt"
    save_checkpoint(path, dict(load_checkpoint(path), **{field: WRONG_VALUES[value]}))
    before = path.read_bytes()
    main, parser, line = command_line("unfinished", command, out_dir, mnist_root, cifar_root, tmp_path)
    status, err = cli_status(main, parser, line, capsys)
    case = (command, field, WRONG_VALUES[value], line)
    assert_ends_cleanly(case, status, err)
    assert status in (0, 2), (case, err)
    assert status == 0 or path.read_bytes() == before, case
