"""Nothing lost, nothing run: resume, interruption, atomic files, divergence and hostile checkpoints."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import pipeline
import train
import utils
from conftest import ROOT

RUN = "mlp_mnist_d6_w8_plain_s0"


def args_for(mnist_root, out_dir, *extra: str) -> list[str]:
    return ["--data_root", str(mnist_root), "--no-download", "--val_size", "100", "--batch_size", "50",
            "--width", "8", "--device", "cpu", "--out_dir", str(out_dir), *extra]


def run_main(*args: str):
    return pipeline.main(pipeline.get_args_parser().parse_args(list(args)))


def cli_exit(capsys, *args: str) -> tuple[int, list[str]]:
    """Run the pipeline CLI in-process as a user would; return its exit status and stderr lines."""
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(list(args)))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def without_seconds(history: dict) -> dict:
    return dict(history, epochs=[{k: v for k, v in e.items() if k != "seconds"} for e in history["epochs"]])


def assert_same_run(dir_a, dir_b):
    a = torch.load(dir_a / "checkpoint.pt", weights_only=True)
    b = torch.load(dir_b / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    history_a = json.loads((dir_a / "history.json").read_text())
    history_b = json.loads((dir_b / "history.json").read_text())
    assert without_seconds(history_a) == without_seconds(history_b)


def test_resume_is_bit_exact(mnist_root, tmp_path):
    run_main(*args_for(mnist_root, tmp_path / "straight", "--num_epochs", "3"))
    run_main(*args_for(mnist_root, tmp_path / "resumed", "--num_epochs", "1"))
    run_main(*args_for(mnist_root, tmp_path / "resumed", "--num_epochs", "3", "--resume"))
    assert_same_run(tmp_path / "straight" / RUN, tmp_path / "resumed" / RUN)


def test_resume_with_other_settings_is_refused(mnist_root, tmp_path, capsys):
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1"))
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2", "--resume", "--lr", "0.1"))
    assert status == 2 and len(lines) == 1 and "--lr" in lines[0]


def test_restarted_sweep_skips_finished_runs(mnist_root, tmp_path, capsys):
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--num_hidden_layers", "2"))
    before = (tmp_path / "mlp_mnist_d4_w8_plain_s0" / "checkpoint.pt").stat().st_mtime_ns
    runs = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--num_hidden_layers", "2", "4",
                              "--resume"))
    assert "mlp_mnist_d4_w8_plain_s0: already finished, skipped" in capsys.readouterr().out
    assert (tmp_path / "mlp_mnist_d4_w8_plain_s0" / "checkpoint.pt").stat().st_mtime_ns == before
    assert [len(h["epochs"]) for _, h in runs] == [1, 1] and all("test" in h for _, h in runs)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_keeps_the_last_epoch_and_resume_finishes_the_run(mnist_root, tmp_path, sig):
    epochs, batch = "8", "5"  # 100 steps an epoch: the signal lands while later epochs run
    command = [sys.executable, str(ROOT / "pipeline.py"),
               *args_for(mnist_root, tmp_path / "cut", "--num_epochs", epochs, "--batch_size", batch)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history_path = tmp_path / "cut" / RUN / "history.json"
    deadline = time.monotonic() + 120
    while not history_path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().count("\n") == 0 and "--resume" in err and "Traceback" not in err
    done = len(json.loads(history_path.read_text())["epochs"])
    checkpoint = torch.load(tmp_path / "cut" / RUN / "checkpoint.pt", weights_only=True)
    assert 1 <= done < int(epochs) and checkpoint["epoch"] == done
    assert not [p for p in (tmp_path / "cut" / RUN).iterdir() if p.name.endswith(".tmp")]
    run_main(*args_for(mnist_root, tmp_path / "cut", "--num_epochs", epochs, "--batch_size", batch, "--resume"))
    run_main(*args_for(mnist_root, tmp_path / "straight", "--num_epochs", epochs, "--batch_size", batch))
    assert_same_run(tmp_path / "straight" / RUN, tmp_path / "cut" / RUN)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    utils.save_checkpoint(path, {"model": {}, "config": {"old": True}})
    before = path.read_bytes()

    def crash(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        utils.save_checkpoint(path, {"model": {}, "config": {"old": False}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path, capsys, monkeypatch):
    real = train.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, labels, **kwargs):
        calls["n"] += 1
        loss = real(logits, labels, **kwargs)
        # calls 1-10 train epoch 1, call 11 validates it, call 15 is the 4th step of epoch 2
        return loss * float("nan") if calls["n"] == 15 else loss
    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "3"))
    assert status == 1 and len(lines) == 1
    assert "epoch 2, step 13" in lines[0]  # steps are counted from 0 over the run
    assert torch.load(tmp_path / RUN / "checkpoint.pt", weights_only=True)["epoch"] == 1


class Payload:
    """Pickles as a call to open(marker, 'w'): code that runs when a plain pickle load reads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_checkpoint_is_refused_and_its_code_never_runs(mnist_root, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": {}, "config": {}, "payload": Payload(marker)}, hostile)
    status, lines = cli_exit(capsys, "--no-train", "--checkpoint", str(hostile), "--device", "cpu")
    assert status == 2 and len(lines) == 1 and "hostile.pt" in lines[0]
    run_dir = tmp_path / "runs" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(hostile.read_bytes())
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path / "runs", "--resume"))
    assert status == 2 and len(lines) == 1
    assert not marker.exists()
    torch.load(hostile, weights_only=False)  # proves the file is hostile: a plain load runs the payload
    assert marker.exists()


def make_bad_checkpoint(kind: str, good, path):
    checkpoint = torch.load(good, weights_only=True)
    if kind == "config_mismatch":
        checkpoint["config"]["width"] = 9
        torch.save(checkpoint, path)
    elif kind == "other_architecture":
        checkpoint["config"]["model_name"] = "ResNet"
        checkpoint["config"].update(out_channels=4, num_levels=1, num_conv_per_level=1, stem="cifar")
        torch.save(checkpoint, path)
    elif kind == "not_our_dict":
        torch.save({"state_dict": checkpoint["model"]}, path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")


@pytest.mark.parametrize("kind", ["config_mismatch", "other_architecture", "not_our_dict", "truncated", "empty",
                                  "text"])
def test_broken_checkpoints_are_one_line_errors(mnist_root, tmp_path, capsys, kind):
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1"))
    bad = tmp_path / f"{kind}.pt"
    make_bad_checkpoint(kind, tmp_path / RUN / "checkpoint.pt", bad)
    status, lines = cli_exit(capsys, "--no-train", "--checkpoint", str(bad), "--data_root", str(mnist_root),
                             "--no-download", "--device", "cpu")
    assert status == 2 and len(lines) == 1 and str(bad) in lines[0], lines
