"""Nothing lost, nothing run: resume, interruption, overwrite, atomic files, divergence and hostile checkpoints."""
import itertools
import json
import os
import pickle
import resource
import shutil
import socket
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace

import pytest
import torch

import plots
import report
import runs
import train
import utils
from conftest import ROOT, RUN, args_for, cli_exit, damage_weights, image_of_step, run_main, without_seconds
from runs import RunFiles, load_checkpoint, save_checkpoint

STEPS_PER_EPOCH = 10  # 500 training images in batches of 50
# 3 epochs of 100 steps (batches of 5): a signal or a second process lands while the later epochs run
LONG_RUN = ("--num_epochs", "3", "--batch_size", "5")


def interrupt_at(monkeypatch, step: int) -> None:
    """Send this process a real SIGINT (Ctrl-C) when training reaches `step`, counted over the whole command."""
    steps = itertools.count()

    def counting_batches(batches, **kwargs):  # stands in for the progress bar, which is off in tests
        for batch in batches:
            if next(steps) == step:
                signal.raise_signal(signal.SIGINT)
            yield batch
    monkeypatch.setattr(train, "tqdm", counting_batches)


def run_files(run_dir) -> dict[str, bytes]:
    """Every file of a run folder, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


def assert_same_run(dir_a, dir_b):
    a = load_checkpoint(RunFiles(dir_a).checkpoint)
    b = load_checkpoint(RunFiles(dir_b).checkpoint)
    for weights in ("model", "ema"):
        assert a.get(weights, {}).keys() == b.get(weights, {}).keys()
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a.get(weights, {}))
    history_a = json.loads((dir_a / "history.json").read_text())
    history_b = json.loads((dir_b / "history.json").read_text())
    assert without_seconds(history_a) == without_seconds(history_b)
    assert (dir_a / "grad_norms.csv").read_text() == (dir_b / "grad_norms.csv").read_text()


@pytest.fixture(scope="module")
def straight_run(mnist_root, tmp_path_factory):
    """The folder of an uninterrupted 3-epoch run, to compare resumed runs with."""
    out_dir = tmp_path_factory.mktemp("straight")
    run_main(*args_for(mnist_root, out_dir, "--num_epochs", "3"))
    return out_dir / RUN


def test_resume_is_bit_exact(mnist_root, tmp_path, straight_run, finished_run):
    shutil.copytree(finished_run, tmp_path / RUN)  # its first epoch
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "3", "--resume"))
    assert_same_run(straight_run, tmp_path / RUN)


def test_grad_norms_of_an_epoch_trained_again_are_not_duplicated(mnist_root, tmp_path, straight_run,
                                                                  finished_run):
    """A crash between appending an epoch's gradient norms and saving its checkpoint: the resumed run trains that
    epoch again, and grad_norms.csv must hold each step once, as in a straight run."""
    shutil.copytree(finished_run, tmp_path / RUN)  # its first epoch
    files = RunFiles(tmp_path / RUN)
    epoch_2 = list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    files.append_grad_norms(epoch_2, torch.rand(len(epoch_2), 6))
    assert files.read_grad_norms()[0] == list(range(2 * STEPS_PER_EPOCH))
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "3", "--resume"))
    assert_same_run(straight_run, tmp_path / RUN)


def test_onecycle_resume_after_an_interruption_is_bit_exact(mnist_root, tmp_path, capsys, monkeypatch):
    onecycle = ("--num_epochs", "3", "--lr_schedule", "onecycle", "--lr", "1e-2")
    run_main(*args_for(mnist_root, tmp_path / "straight", *onecycle))
    interrupt_at(monkeypatch, STEPS_PER_EPOCH + 4)  # in epoch 2
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path / "cut", *onecycle))
    assert status == 130 and "--resume" in lines[-1]
    assert load_checkpoint(RunFiles(tmp_path / "cut" / RUN).checkpoint)["epoch"] == 1
    monkeypatch.undo()
    run_main(*args_for(mnist_root, tmp_path / "cut", *onecycle, "--resume"))
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert_same_run(tmp_path / "straight" / RUN, tmp_path / "cut" / RUN)


@pytest.mark.parametrize("levers", [("--val_size", "50"), ("--val_size", "0", "--ema", "0.9", "--tta", "flip")],
                         ids=["exercise2", "fast_recipe"])
def test_a_cnn_with_augmentation_and_batch_norm_resumes_bit_exactly(cifar_root, tmp_path, capsys, monkeypatch,
                                                                    levers):
    """Exercise 2's case: crops and flips drawn from the data generator, batch norm's running statistics, SGD's
    momentum and a one-cycle schedule, interrupted in epoch 2; and with the fast recipe's levers, whose moving
    average of the weights must continue exactly too."""
    cnn = ["--model_name", "ResNet", "--dataset", "CIFAR10", "--data_root", str(cifar_root), "--no-download",
           *levers, "--limit_train", "64", "--batch_size", "32", "--out_channels", "4", "--num_levels",
           "2", "--num_conv_per_level", "1", "--residual_step", "1", "--augment", "--optimizer", "sgd", "--momentum",
           "0.9", "--lr", "0.05", "--lr_schedule", "onecycle", "--num_epochs", "3", "--device", "cpu"]
    (config, _), = run_main(*cnn, "--out_dir", str(tmp_path / "straight"))
    interrupt_at(monkeypatch, 3)  # the second of epoch 2's two steps
    status, lines = cli_exit(capsys, *cnn, "--out_dir", str(tmp_path / "cut"))
    assert status == 130 and load_checkpoint(RunFiles(tmp_path / "cut" / config.run_name).checkpoint)["epoch"] == 1
    monkeypatch.undo()
    run_main(*cnn, "--out_dir", str(tmp_path / "cut"), "--resume")
    assert "resuming after epoch 1" in capsys.readouterr().out
    model = load_checkpoint(RunFiles(tmp_path / "cut" / config.run_name).checkpoint)["model"]
    assert any(name.endswith("running_var") for name in model)
    assert_same_run(tmp_path / "straight" / config.run_name, tmp_path / "cut" / config.run_name)


@pytest.mark.parametrize("state", ["finished", "interrupted"])
def test_resume_with_other_settings_is_refused_and_trains_nothing(mnist_root, tmp_path, capsys, monkeypatch,
                                                                  state):
    if state == "interrupted":
        interrupt_at(monkeypatch, STEPS_PER_EPOCH + 4)
        assert cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2"))[0] == 130
        monkeypatch.undo()
    else:
        run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "2"))
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2", "--resume", "--lr", "0.1"))
    assert status == 2 and len(lines) == 1 and "--lr 0.0003, not 0.1" in lines[0], lines
    assert run_files(tmp_path / RUN) == before


def test_resume_of_a_finished_run_may_add_epochs_to_a_constant_schedule_only(mnist_root, tmp_path, capsys):
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "2"))
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    assert status == 2 and len(lines) == 1 and "--num_epochs 1" in lines[0], lines
    assert run_files(tmp_path / RUN) == before
    (_, history), = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "3", "--resume"))
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert history["epochs"][:2] == json.loads(before["history.json"])["epochs"]
    assert len(history["epochs"]) == 3 and "test" in history
    assert load_checkpoint(RunFiles(tmp_path / RUN).checkpoint)["epoch"] == 3


def test_resume_of_a_onecycle_run_may_not_change_its_length(mnist_root, tmp_path, capsys):
    run_main(*args_for(mnist_root, tmp_path, "--lr_schedule", "onecycle", "--num_epochs", "2"))
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--lr_schedule", "onecycle", "--num_epochs", "3",
                                               "--resume"))
    assert status == 2 and len(lines) == 1 and "--num_epochs 2, not 3" in lines[0], lines
    assert run_files(tmp_path / RUN) == before


def test_overwrite_is_all_or_nothing(mnist_root, tmp_path, capsys, monkeypatch, finished_run):
    """An --overwrite interrupted in its first epoch has already removed the old run's files (and no others):
    a later --resume must not take the old run for a finished one."""
    shutil.copytree(finished_run, tmp_path / RUN)
    (tmp_path / RUN / "notes.txt").write_text("my own notes")
    old_history = json.loads((tmp_path / RUN / "history.json").read_text())
    interrupt_at(monkeypatch, 3)
    status, _ = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2", "--lr", "0.01",
                                           "--overwrite"))
    assert status == 130
    assert not (tmp_path / RUN / "history.json").exists() and not RunFiles(tmp_path / RUN).checkpoint.exists()
    assert (tmp_path / RUN / "notes.txt").read_text() == "my own notes"
    monkeypatch.undo()
    (_, history), = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    assert "already finished" not in capsys.readouterr().out
    assert without_seconds(history) == without_seconds(old_history)  # trained again, from the start
    assert (tmp_path / RUN / "notes.txt").read_text() == "my own notes"


def test_resume_and_overwrite_together_are_refused(mnist_root, tmp_path, capsys, finished_run):
    """--resume with --overwrite once replaced a finished run (--overwrite won): a command gives one of them."""
    shutil.copytree(finished_run, tmp_path / RUN)
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume", "--overwrite"))
    assert status == 2 and len(lines) == 1 and "--overwrite" in lines[0] and "--resume" in lines[0], lines
    assert run_files(tmp_path / RUN) == before


@pytest.mark.parametrize("existing", ["--overwrite", "--resume"])
@pytest.mark.parametrize("owner", ["the user", "another run", "the user, in the run's folder"])
def test_a_checkpoint_path_holding_something_else_is_refused_and_kept(mnist_root, tmp_path, capsys, finished_run,
                                                                      owner, existing):
    """--checkpoint naming a file that is not this run's checkpoint (the user's, or another run's model) is refused
    in one line whatever --resume or --overwrite say, wherever it is: the file stays as it was and nothing is made."""
    run_dir = tmp_path / "out" / "mlp_mnist_h2_w8_plain_s0"
    target = run_dir / "notes.txt" if owner.endswith("folder") else tmp_path / "notes.txt"
    if owner == "another run":
        shutil.copytree(finished_run, tmp_path / "other" / RUN)
        target = RunFiles(tmp_path / "other" / RUN).checkpoint
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("my notes")
    before = target.read_bytes()
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path / "out", "--num_hidden_layers", "2",
                                               "--num_epochs", "1", "--checkpoint", str(target), existing))
    assert status == 2 and len(lines) == 1 and "choose another --checkpoint path" in lines[0], lines
    assert (RUN in lines[0]) == (owner == "another run")
    assert target.read_bytes() == before
    assert not run_dir.exists() or {p.name for p in run_dir.iterdir()} - {".lock"} == {"notes.txt"}
    assert not (tmp_path / "out" / "plots").exists()


@pytest.mark.parametrize("name", ["history.json", "config.json", "grad_norms.csv", "a_folder/"])
def test_a_checkpoint_path_the_run_keeps_another_file_at_is_refused(mnist_root, tmp_path, capsys, name):
    """Saving the checkpoint over the run's history (or into a folder path, as a file named like the folder) would
    leave a run that reads as finished, or a file where the user meant a folder."""
    run_dir = tmp_path / RUN
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1", "--checkpoint",
                                               f"{run_dir}/{name}"))
    assert status == 2 and len(lines) == 1 and "--checkpoint" in lines[0], lines
    assert ("is a folder" if name.endswith("/") else f"where the run keeps its {name}") in lines[0]
    assert not run_dir.exists()


def test_a_checkpoint_kept_outside_its_run_folder_continues_or_is_replaced(mnist_root, tmp_path, capsys,
                                                                         finished_run):
    """The run's own checkpoint, kept with --checkpoint elsewhere, continues the run into a new folder (which this
    process makes: not 'written by another process') and may be replaced with --overwrite."""
    checkpoint = tmp_path / "kept.pt"
    shutil.copy(RunFiles(finished_run).checkpoint, checkpoint)

    def train(epochs: int, existing: str) -> dict:
        (_, history), = run_main(*args_for(mnist_root, tmp_path / "out", "--num_epochs", str(epochs), "--checkpoint",
                                           str(checkpoint), existing))
        return history

    assert len(train(2, "--resume")["epochs"]) == 2 and load_checkpoint(checkpoint)["epoch"] == 2
    assert (tmp_path / "out" / RUN / "history.json").is_file()
    assert len(train(1, "--overwrite")["epochs"]) == 1 and load_checkpoint(checkpoint)["epoch"] == 1


def test_restarted_sweep_skips_finished_runs(mnist_root, tmp_path, capsys, finished_run):
    shutil.copytree(finished_run, tmp_path / RUN)  # the sweep's second run, finished
    before = RunFiles(tmp_path / RUN).checkpoint.stat().st_mtime_ns
    runs = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--num_hidden_layers", "2", "4",
                              "--resume"))
    assert f"{RUN}: already finished with these settings, skipped" in capsys.readouterr().out
    assert RunFiles(tmp_path / RUN).checkpoint.stat().st_mtime_ns == before
    assert [len(h["epochs"]) for _, h in runs] == [1, 1] and all("test" in h for _, h in runs)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_keeps_the_last_epoch_and_resume_finishes_the_run(mnist_root, tmp_path, straight_long_run, sig):
    command = [sys.executable, str(ROOT / "pipeline.py"), *args_for(mnist_root, tmp_path / "cut", *LONG_RUN)]
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
    checkpoint = load_checkpoint(RunFiles(tmp_path / "cut" / RUN).checkpoint)
    assert 1 <= done < 3 and checkpoint["epoch"] == done
    assert not [p for p in (tmp_path / "cut" / RUN).iterdir() if p.name.endswith(".tmp")]
    run_main(*args_for(mnist_root, tmp_path / "cut", *LONG_RUN, "--resume"))
    assert_same_run(straight_long_run, tmp_path / "cut" / RUN)


def test_a_stdout_whose_reader_left_stops_the_run_as_ctrl_c_does(mnist_root, tmp_path, straight_long_run):
    """`pipeline.py ... | head -3`: the first print after head left was a BrokenPipeError, and the run failed (exit
    1), its finished epoch lost; now it stops in one line saying how to continue, and --resume finishes it."""
    command = [sys.executable, str(ROOT / "pipeline.py"), *args_for(mnist_root, tmp_path, *LONG_RUN)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "epoch 1/3" not in process.stdout.readline():
        assert process.poll() is None, process.communicate()
    process.stdout.close()  # as head does once it has its lines
    err = process.stderr.read()
    assert process.wait(timeout=120) == 130 and len(err.strip().splitlines()) == 1, err
    assert "stdout cannot be written ([Errno 32] Broken pipe)" in err and "--resume to continue" in err, err
    assert load_checkpoint(RunFiles(tmp_path / RUN).checkpoint)["epoch"] >= 1
    run_main(*args_for(mnist_root, tmp_path, *LONG_RUN, "--resume"))
    assert_same_run(straight_long_run, tmp_path / RUN)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path, capsys, monkeypatch):
    real_train_one_epoch = train.train_one_epoch

    def poisoned_in_epoch_2(run, epoch, *args):
        if epoch == 2:
            run.train.images[image_of_step(run, 3)] = float("nan")  # an image of the 4th step of epoch 2
        return real_train_one_epoch(run, epoch, *args)
    monkeypatch.setattr(train, "train_one_epoch", poisoned_in_epoch_2)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "3"))
    assert status == 1 and not any("Traceback" in line for line in lines)
    assert "epoch 2 became nan at step 13" in lines[-1]  # steps are counted from 0 over the run
    assert load_checkpoint(RunFiles(tmp_path / RUN).checkpoint)["epoch"] == 1


@pytest.mark.parametrize("flags,advice", [
    (("--num_hidden_layers", "1", "--lr", "1e7"), "lower --lr (it is 1e+07)"),
    (("--optimizer", "sgd", "--momentum", "1e308"), "lower --momentum below 1"),
    (("--weight_decay", "1e300"), "lower --weight_decay")], ids=["lr", "momentum", "weight_decay"])
def test_a_diverging_loss_stops_the_run_with_advice_naming_what_to_change(mnist_root, tmp_path, capsys, flags,
                                                                          advice):
    """--lr 1e7 kept its losses finite near 1e23 and trained to the end (and then, with other sizes, died in
    matplotlib); the advice for a momentum or weight decay beyond any stable value was 'lower --lr'."""
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2", *flags))
    assert status == 1 and len(lines) == 1 and "the training loss at epoch 1 became " in lines[0], lines
    assert f"no epoch had finished; {advice}" in lines[0], lines


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
    RunFiles(run_dir).checkpoint.write_bytes(hostile.read_bytes())
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path / "runs", "--resume"))
    assert status == 2 and len(lines) == 1
    assert not marker.exists()
    with zipfile.ZipFile(hostile) as archive:  # proves the file is hostile: a plain unpickling runs the payload
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    assert marker.exists()


@pytest.mark.parametrize("kind,reason", [("empty", "the file is empty"),
                                         ("text", "it is not a file that torch.save writes"),
                                         ("random bytes", "it is not a file that torch.save writes"),
                                         ("cut", "it is cut short or damaged"),
                                         ("hostile", "it holds Python objects that the safe loader")])
def test_an_unloadable_checkpoint_says_why_and_never_advises_the_unsafe_loader(tmp_path, capsys, finished_run,
                                                                             kind, reason):
    """torch's own message for a refused file ends in 'Re-running torch.load with weights_only set to False', which
    would run the file's code; ours says what is wrong with the file."""
    path, good = tmp_path / "model.pt", RunFiles(finished_run).checkpoint.read_bytes()
    if kind == "hostile":
        torch.save({"model": {}, "config": {}, "payload": Payload(tmp_path / "code_ran")}, path)
    else:
        path.write_bytes({"empty": b"", "text": b"hello\n", "random bytes": bytes(range(256)) * 4,
                          "cut": good[:len(good) // 2]}[kind])
    status, lines = cli_exit(capsys, "--no-train", "--checkpoint", str(path), "--device", "cpu")
    assert status == 2 and len(lines) == 1, lines
    assert f"error: --checkpoint {path} is not a loadable checkpoint: {reason}" in lines[0]
    assert "False" not in lines[0] and not (tmp_path / "code_ran").exists()


def test_a_damaged_checkpoint_is_never_resumed(mnist_root, tmp_path, capsys, finished_run):
    """40 bytes flipped inside the weights of an unfinished run's checkpoint: it once resumed at a loss of 1e27 and
    finished. The checksum saved with it refuses it, in one line saying what is still good; nothing is written."""
    shutil.copytree(finished_run, tmp_path / RUN)  # with a constant schedule, the first epoch of a 2-epoch run
    damage_weights(RunFiles(tmp_path / RUN).checkpoint, "head.weight")
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2", "--resume"))
    assert status == 2 and len(lines) == 1 and "checkpoint.pt is damaged" in lines[0], lines
    assert "history.json and figures are unaffected" in lines[0] and "--overwrite" in lines[0]
    assert run_files(tmp_path / RUN) == before


def test_a_checkpoint_saved_before_checksums_loads_says_so_once_and_gets_one(mnist_root, tmp_path, capsys,
                                                                           finished_run):
    shutil.copytree(finished_run, tmp_path / RUN)
    path = RunFiles(tmp_path / RUN).checkpoint
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["checksum"]
    torch.save(checkpoint, path)
    capsys.readouterr()
    run_main("--no-train", "--checkpoint", str(path), "--data_root", str(mnist_root), "--no-download", "--device",
             "cpu")
    assert capsys.readouterr().err.splitlines() == [
        f"note: {path} was saved without a checksum (by an older version), so damage to it cannot be detected; a run "
        "saves one with its next epoch"]
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "2", "--resume"))
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert "checksum" in torch.load(path, weights_only=True)


def wrong_field(checkpoint: dict, field: str) -> dict:
    """The checkpoint with one entry that restore reads of the wrong type, size or value."""
    if field == "optimizer_state_shape":  # a fused Adam step on it crashed the process (SIGSEGV)
        state = {i: dict(s, exp_avg=torch.zeros(2)) for i, s in checkpoint["optimizer"]["state"].items()}
        return dict(checkpoint, optimizer=dict(checkpoint["optimizer"], state=state))
    if field == "optimizer_lr":
        groups = [dict(group, lr="fast") for group in checkpoint["optimizer"]["param_groups"]]
        return dict(checkpoint, optimizer=dict(checkpoint["optimizer"], param_groups=groups))
    if field == "rng_missing":
        return {key: value for key, value in checkpoint.items() if key != "rng"}
    return dict(checkpoint, **{"epoch_text": {"epoch": "one"}, "epoch_negative": {"epoch": -1},
                               "history_short": {"history": {"epochs": []}}}[field])


@pytest.mark.parametrize("field", ["epoch_text", "epoch_negative", "history_short", "optimizer_state_shape",
                                   "optimizer_lr", "rng_missing"])
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_refused_before_the_plan_says_it_continues(
        mnist_root, tmp_path, capsys, finished_run, field):
    """They were tracebacks, a crash, a failure after 'continues from its checkpoint' (exit 1), or a resume of a
    history that was not the checkpoint's; the checkpoint is kept as it is."""
    shutil.copytree(finished_run, tmp_path / RUN)
    files = RunFiles(tmp_path / RUN)
    save_checkpoint(files.checkpoint, wrong_field(load_checkpoint(files.checkpoint), field))
    files.history.unlink()  # unfinished: --resume continues the checkpoint
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2", "--resume"))
    assert status == 2 and len(lines) == 1 and str(files.checkpoint) in lines[0], lines
    assert run_files(tmp_path / RUN) == before
    if field.startswith("epoch"):  # the one entry that evaluating reads besides the weights and config
        status, lines = cli_exit(capsys, "--no-train", "--checkpoint", str(files.checkpoint), "--data_root",
                                 str(mnist_root), "--no-download", "--device", "cpu")
        assert status == 2 and len(lines) == 1 and "not a number of epochs" in lines[0], lines


def test_torch_warnings_about_a_file_are_not_printed_before_its_refusal(tmp_path):
    """torch.load warns about the sparse tensors of a file (it validates them) before our one line refused it."""
    path = tmp_path / "sparse.pt"
    torch.save({"weights": torch.eye(3).to_sparse()}, path)
    result = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--no-train", "--checkpoint", str(path),
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"pipeline.py: error: --checkpoint {path} is not a checkpoint written by pipeline.py (no model and config)"]


# settings that the suite's checkpoints of before RunConfig lacked, and flags they held that are no settings
NEW_SETTINGS = ("nesterov", "lr_schedule", "warmup_epochs", "label_smoothing", "sync_bn")
OLD_FLAGS = {"data_root": "data", "download": True, "checkpoint": None, "out_dir": "runs", "plots_dir": None}


def make_bad_checkpoint(kind: str, good, path):
    checkpoint = load_checkpoint(good)
    if kind == "config_mismatch":
        checkpoint["config"]["width"] = 9
        save_checkpoint(path, checkpoint)
    elif kind == "other_architecture":
        checkpoint["config"]["model_name"] = "ResNet"
        checkpoint["config"].update(out_channels=4, num_levels=1, num_conv_per_level=1, stem="cifar")
        save_checkpoint(path, checkpoint)
    elif kind == "missing_key":
        del checkpoint["config"]["lr"]
        save_checkpoint(path, checkpoint)
    elif kind == "old_format":
        old = {k: v for k, v in checkpoint["config"].items() if k not in NEW_SETTINGS}
        del checkpoint["format"], checkpoint["checksum"]  # nor a checksum then
        torch.save(dict(checkpoint, config=dict(old, **OLD_FLAGS)), path)
    elif kind == "not_our_dict":
        torch.save({"state_dict": checkpoint["model"]}, path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")


@pytest.mark.parametrize("kind", ["config_mismatch", "other_architecture", "missing_key", "old_format",
                                  "not_our_dict", "truncated", "empty", "text"])
def test_broken_checkpoints_are_one_line_errors(mnist_root, tmp_path, capsys, finished_run, kind):
    bad = tmp_path / f"{kind}.pt"
    make_bad_checkpoint(kind, RunFiles(finished_run).checkpoint, bad)
    status, lines = cli_exit(capsys, "--no-train", "--checkpoint", str(bad), "--data_root", str(mnist_root),
                             "--no-download", "--device", "cpu")
    assert status == 2 and len(lines) == 1 and str(bad) in lines[0], lines
    if kind in ("missing_key", "old_format"):
        assert "missing" in lines[0]


@pytest.mark.parametrize("kind", ["missing_key", "old_format"])
def test_resume_from_a_checkpoint_without_every_setting_is_a_one_line_error(mnist_root, tmp_path, capsys,
                                                                             finished_run, kind):
    shutil.copytree(finished_run, tmp_path / RUN)
    checkpoint = RunFiles(tmp_path / RUN).checkpoint
    make_bad_checkpoint(kind, checkpoint, checkpoint)
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "2", "--resume"))
    assert status == 2 and len(lines) == 1 and str(checkpoint) in lines[0] and "missing" in lines[0], lines
    assert run_files(tmp_path / RUN) == before


def test_a_run_folder_of_the_old_format_resumes_bit_exactly_and_plots(cifar_root, tmp_path, capsys):
    """A folder written before checkpoints were stamped with a format and before --shortcut existed (every residual
    CNN then had projection shortcuts) continues as the run it was, and is plotted and reported."""
    cnn = ["--model_name", "ResNet", "--dataset", "CIFAR10", "--data_root", str(cifar_root), "--no-download",
           "--val_size", "50", "--limit_train", "64", "--batch_size", "32", "--out_channels", "4", "--num_levels",
           "2", "--num_conv_per_level", "2", "--residual_step", "2", "--shortcut", "projection", "--device", "cpu"]
    run_main(*cnn, "--num_epochs", "2", "--out_dir", str(tmp_path / "straight"))
    (config, _), = run_main(*cnn, "--num_epochs", "1", "--out_dir", str(tmp_path / "old"))
    files = RunFiles(tmp_path / "old" / config.run_name)
    old_config = {k: v for k, v in config.to_dict().items() if k != "shortcut"}
    checkpoint = load_checkpoint(files.checkpoint)
    del checkpoint["format"]
    save_checkpoint(files.checkpoint, dict(checkpoint, config=old_config))
    utils.write_json(files.config, old_config)
    capsys.readouterr()
    run_main(*cnn, "--num_epochs", "2", "--out_dir", str(tmp_path / "old"), "--resume")
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert_same_run(tmp_path / "straight" / config.run_name, files.run_dir)
    assert [p.name for p in (tmp_path / "old" / "plots").glob("Conv_gradients_d*.png")] == [
        p.name for p in (tmp_path / "straight" / "plots").glob("Conv_gradients_d*.png")] != []
    assert [c.run_name for c, _ in report.read_runs(tmp_path / "old")[0]] == [config.run_name]


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path, finished_run):
    checkpoint = load_checkpoint(RunFiles(finished_run).checkpoint)
    save_checkpoint(tmp_path / "new.pt", dict(checkpoint, format=runs.CHECKPOINT_FORMAT + 1))
    with pytest.raises(runs.CheckpointError, match="format"):
        load_checkpoint(tmp_path / "new.pt")


def start_training(mnist_root, out_dir, *extra: str) -> subprocess.Popen:
    """pipeline.py training RUN for LONG_RUN in another process; return once its first epoch is
    saved (it trains on)."""
    command = [sys.executable, str(ROOT / "pipeline.py"),
               *args_for(mnist_root, out_dir, *LONG_RUN, *extra)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out_dir / RUN / "history.json").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()
    return process


@pytest.fixture(scope="module")
def straight_long_run(mnist_root, tmp_path_factory):
    """The folder of an uninterrupted LONG_RUN, to compare resumed runs with."""
    out_dir = tmp_path_factory.mktemp("straight_long")
    run_main(*args_for(mnist_root, out_dir, *LONG_RUN))
    return out_dir / RUN


def test_a_second_process_on_a_run_being_trained_is_refused_and_changes_nothing(mnist_root, tmp_path, capsys,
                                                                                straight_long_run):
    """This process is the second one, with --resume, with --overwrite, and with --overwrite of a run of its own
    whose --checkpoint is the first run's (that once rewrote it beside the first run's history)."""
    first = start_training(mnist_root, tmp_path)
    os.kill(first.pid, signal.SIGSTOP)  # it holds the lock mid-run, however long the second takes
    checkpoint = RunFiles(tmp_path / RUN).checkpoint
    try:
        for out_dir, *flags in ((tmp_path, "--resume"), (tmp_path, "--overwrite"),
                                (tmp_path / "second", "--overwrite", "--checkpoint", str(checkpoint))):
            before = checkpoint.read_bytes()
            status, lines = cli_exit(capsys, *args_for(mnist_root, out_dir, *LONG_RUN, *flags))
            assert status == 2 and len(lines) == 1 and RUN in lines[0] and f"process {first.pid}" in lines[0], lines
            assert checkpoint.read_bytes() == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.communicate()
    assert_same_run(straight_long_run, tmp_path / RUN)


def test_a_lock_holder_killed_with_sigkill_does_not_block_the_next_run(mnist_root, tmp_path, capsys,
                                                                       straight_long_run):
    first = start_training(mnist_root, tmp_path)
    first.kill()
    first.wait(timeout=60)
    run_main(*args_for(mnist_root, tmp_path, *LONG_RUN, "--resume"))
    assert "resuming after epoch" in capsys.readouterr().out
    assert_same_run(straight_long_run, tmp_path / RUN)


def test_a_sweep_is_refused_up_front_when_one_of_its_runs_is_being_trained(mnist_root, tmp_path, capsys):
    with RunFiles(tmp_path / "mlp_mnist_h4_w8_plain_s0").lock():  # this process plays the other trainer
        status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_hidden_layers", "2", "4"))
    assert status == 2 and len(lines) == 1 and f"process {os.getpid()} on {socket.gethostname()};" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp_mnist_h4_w8_plain_s0"]  # h2's folder not made


@pytest.mark.parametrize("damage", ["cut_row", "garbage_row"])
def test_grad_norms_cut_or_garbled_after_the_checkpoint_heal_on_resume(mnist_root, tmp_path, straight_run,
                                                                       finished_run, damage):
    """A kill -9 or a full disk mid-append leaves part of a row: resume cuts back to the last complete row at or
    before the checkpoint's step, so nothing is glued to the next row, and the file ends as a straight run's."""
    shutil.copytree(finished_run, tmp_path / RUN)  # its first epoch
    files = RunFiles(tmp_path / RUN)
    with files.grad_norms.open("a") as f:
        # the first digit of step 10's row; or a row of an earlier step that does not parse, then a cut one
        f.write("1" if damage == "cut_row" else "3,not a number,1,1,1,1,1\n10,0.1")
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "3", "--resume"))
    assert_same_run(straight_run, tmp_path / RUN)


@pytest.mark.parametrize("damage", ["missing", "not_numbers"])
def test_an_unfinished_run_without_usable_grad_norms_resumes_and_its_figure_says_why(mnist_root, tmp_path, capsys,
                                                                                      straight_run, finished_run,
                                                                                      damage):
    shutil.copytree(finished_run, tmp_path / RUN)  # its first epoch
    files = RunFiles(tmp_path / RUN)
    if damage == "missing":
        files.grad_norms.unlink()
    else:
        files.grad_norms.write_text("step,a,b\nx,y,z\n")
    capsys.readouterr()
    (_, history), = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "3", "--resume"))
    out = capsys.readouterr().out
    assert "resuming after epoch 1" in out and f"gradient figures: skipped {RUN}: " in out
    assert without_seconds(history) == without_seconds(json.loads((straight_run / "history.json").read_text()))
    assert files.read_grad_norms()[0] == list(range(STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH))  # what was logged since
    assert (tmp_path / "plots" / "mlp_training_loss.png").is_file()


@pytest.mark.parametrize("damage", ["cut", "empty", "missing"])
def test_a_finished_run_with_broken_grad_norms_is_skipped_and_its_figure_says_why(mnist_root, tmp_path, capsys,
                                                                                  finished_run, damage):
    shutil.copytree(finished_run, tmp_path / RUN)
    files = RunFiles(tmp_path / RUN)
    if damage == "missing":
        files.grad_norms.unlink()
    else:
        text = files.grad_norms.read_text()
        files.grad_norms.write_text(text[:len(text) // 2] if damage == "cut" else "")
    before = run_files(tmp_path / RUN)
    capsys.readouterr()
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    out = capsys.readouterr().out
    assert f"{RUN}: already finished with these settings, skipped" in out
    assert f"gradient figures: skipped {RUN}: " in out and (tmp_path / "plots" / "mlp_training_loss.png").is_file()
    assert run_files(tmp_path / RUN) == before


@pytest.mark.parametrize("damage", ["missing", '{"epochs": [{"train_loss": 1}], "test": {"acc": 0.5}}',
                                    '{"epochs": [], "test": {"loss": 1}}'])
def test_a_finished_run_without_its_history_gets_it_back_from_the_checkpoint(mnist_root, tmp_path, capsys,
                                                                            finished_run, damage):
    """Missing, or parsing but without the numbers a run's history holds (a KeyError at plotting time once)."""
    shutil.copytree(finished_run, tmp_path / RUN)
    if damage == "missing":
        (tmp_path / RUN / "history.json").unlink()
    else:
        (tmp_path / RUN / "history.json").write_text(damage)
    (_, history), = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    old = without_seconds(json.loads((finished_run / "history.json").read_text()))  # its test is scored again
    assert without_seconds(history) == old
    assert without_seconds(json.loads((tmp_path / RUN / "history.json").read_text())) == old


@pytest.mark.parametrize("epochs", [2, 1], ids=["claims_unfinished_epochs", "claims_an_epoch_beyond_the_run"])
def test_the_checkpoint_not_the_history_says_how_far_a_run_has_trained(mnist_root, tmp_path, capsys, finished_run,
                                                                       epochs):
    """A finished history.json that claims an epoch more than the checkpoint holds: for a 2-epoch run it was skipped
    as finished (its weights never trained further), for the 1-epoch run it was refused with advice to --overwrite.
    The run continues from its checkpoint (or only gets its test result again) and its history is rebuilt."""
    shutil.copytree(finished_run, tmp_path / RUN)
    history = json.loads((finished_run / "history.json").read_text())
    claimed = dict(history, epochs=[*history["epochs"], dict(history["epochs"][0], epoch=2)])
    (tmp_path / RUN / "history.json").write_text(json.dumps(claimed))
    (_, rebuilt), = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", str(epochs), "--resume"))
    out = capsys.readouterr().out
    assert "history.json: its 2 epochs are not the 1 that" in out and "rebuilt from the checkpoint" in out
    checkpoint = load_checkpoint(RunFiles(tmp_path / RUN).checkpoint)
    assert checkpoint["epoch"] == epochs and rebuilt["epochs"] == checkpoint["history"]["epochs"]
    assert json.loads((tmp_path / RUN / "history.json").read_text()) == rebuilt
    assert without_seconds(rebuilt) == without_seconds(history) if epochs == 1 else "resuming after epoch 1" in out


def test_a_garbage_config_beside_a_finished_run_is_restored_from_its_checkpoint(mnist_root, tmp_path, capsys,
                                                                               finished_run):
    shutil.copytree(finished_run, tmp_path / RUN)
    (tmp_path / RUN / "config.json").write_text("{garbage")
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    out = capsys.readouterr().out
    assert "config.json: restored from" in out and "already finished with these settings, skipped" in out
    assert (tmp_path / RUN / "config.json").read_text() == (finished_run / "config.json").read_text()


def test_a_garbage_config_beside_a_finished_run_without_a_checkpoint_is_never_advised_overwrite(
        mnist_root, tmp_path, capsys, finished_run):
    shutil.copytree(finished_run, tmp_path / RUN)
    (tmp_path / RUN / "config.json").write_text("{garbage")
    RunFiles(tmp_path / RUN).checkpoint.unlink()
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    assert status == 2 and len(lines) == 1 and "config.json" in lines[0] and "--overwrite" not in lines[0], lines
    assert run_files(tmp_path / RUN) == before


def test_temporary_files_of_a_killed_writer_are_removed_when_the_run_is_opened(mnist_root, tmp_path,
                                                                              finished_run):
    shutil.copytree(finished_run, tmp_path / RUN)
    files = RunFiles(tmp_path / RUN)
    leftovers = [files.run_dir / f".{files.checkpoint.name}.k2j4x.tmp", files.run_dir / f".{files.history.name}.a8.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (tmp_path / RUN / ".notes.txt.mine.tmp").write_text("not the run's")
    (tmp_path / RUN / f".{files.history.name}.a folder.tmp").mkdir()  # no writer leaves a folder: not the run's
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    assert not any(path.exists() for path in leftovers)
    assert (tmp_path / RUN / ".notes.txt.mine.tmp").read_text() == "not the run's"
    assert (tmp_path / RUN / f".{files.history.name}.a folder.tmp").is_dir()


@pytest.mark.skipif(not os.access("/proc", os.W_OK), reason="needs a /proc that os.access calls writable (root)")
def test_an_out_dir_the_file_system_refuses_after_the_checks_is_one_line(mnist_root, capsys):
    """/proc passes check_writable as root, then refuses the run folder: once three chained tracebacks."""
    status, lines = cli_exit(capsys, *args_for(mnist_root, "/proc/no_such_run_folder", "--num_epochs", "1"))
    assert status == 2 and len(lines) == 1 and "choose another --out_dir" in lines[0], lines


@pytest.mark.parametrize("name", ["config.json", "history.json", "grad_norms.csv", ".lock"])
def test_a_folder_where_a_run_file_belongs_is_refused_in_one_line_and_kept(mnist_root, tmp_path, capsys,
                                                                         finished_run, name):
    """Once a traceback (IsADirectoryError) from the lock, the tidying of temporary files, or restoring config.json."""
    shutil.copytree(finished_run, tmp_path / RUN)
    (tmp_path / RUN / name).unlink()
    (tmp_path / RUN / name).mkdir()
    (tmp_path / RUN / name / "mine.txt").write_text("not the run's")
    folder_like_a_leftover = tmp_path / RUN / f".{RunFiles(tmp_path / RUN).checkpoint.name}.x1.tmp"
    folder_like_a_leftover.mkdir()
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    assert status == 2 and len(lines) == 1 and f"{tmp_path / RUN / name} is a folder" in lines[0], lines
    assert (tmp_path / RUN / name / "mine.txt").is_file() and folder_like_a_leftover.is_dir()
    assert load_checkpoint(tmp_path / RUN / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("name", ["config.json", "history.json", "grad_norms.csv", "checkpoint.pt", ".lock",
                                  "tensorboard"])
def test_a_symbolic_link_in_a_run_folder_is_never_written_through(mnist_root, tmp_path, capsys, finished_run, name):
    """A .lock linked elsewhere had the file it names overwritten with a process id, a linked grad_norms.csv had
    rows appended there, the other files were replaced by files: the run refuses every link in one line."""
    shutil.copytree(finished_run, tmp_path / "runs" / RUN)
    link, elsewhere = tmp_path / "runs" / RUN / name, tmp_path / "elsewhere"
    if name == "tensorboard":
        elsewhere.mkdir()
    else:
        elsewhere.write_bytes(link.read_bytes() if link.exists() else b"the user's own file")
        link.unlink(missing_ok=True)
    link.symlink_to(elsewhere)
    before = elsewhere.read_bytes() if elsewhere.is_file() else sorted(elsewhere.iterdir())
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path / "runs", "--num_epochs", "2", "--resume"))
    assert status == 2 and len(lines) == 1 and f"{link} is a symbolic link (to {elsewhere})" in lines[0], lines
    assert link.is_symlink() and (elsewhere.read_bytes() if elsewhere.is_file() else sorted(elsewhere.iterdir())) \
        == before


@pytest.mark.parametrize("damage", ["removed", "cut", "not ours"])
def test_a_finished_run_whose_checkpoint_is_lost_is_skipped_with_a_warning(mnist_root, tmp_path, capsys,
                                                                           finished_run, damage):
    """Its results stand, so the sweep goes on, but the user learns now, not from cam.py, that its model is gone."""
    shutil.copytree(finished_run, tmp_path / RUN)
    checkpoint = RunFiles(tmp_path / RUN).checkpoint
    if damage == "removed":
        checkpoint.unlink()
    else:
        cut = checkpoint.read_bytes()[:1000]
        checkpoint.write_bytes(cut if damage == "cut" else pickle.dumps({"model": 1}, protocol=2))
    before = run_files(tmp_path / RUN)
    capsys.readouterr()
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    out, err = capsys.readouterr()
    assert "already finished with these settings, skipped" in out
    assert f"warning: {RUN} has finished but its model is lost (--checkpoint {checkpoint}" in err
    assert run_files(tmp_path / RUN) == before


@pytest.mark.parametrize("state", ["finished", "interrupted"])
def test_trained_epochs_without_their_checkpoint_are_never_deleted_by_resume(mnist_root, tmp_path, capsys,
                                                                             finished_run, state):
    """--resume asking for more epochs of a run whose checkpoint is gone (deleted, or saved elsewhere with
    --checkpoint) cannot continue it: refused, where it was 'trains from the start' and the results were deleted."""
    shutil.copytree(finished_run, tmp_path / RUN)
    RunFiles(tmp_path / RUN).checkpoint.unlink()
    if state == "interrupted":
        history = json.loads((tmp_path / RUN / "history.json").read_text())
        (tmp_path / RUN / "history.json").write_text(json.dumps({"epochs": history["epochs"][:1]}))
    before = run_files(tmp_path / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "3", "--resume"))
    assert status == 2 and len(lines) == 1 and "trained epochs but no checkpoint" in lines[0], lines
    assert "--overwrite" in lines[0] and run_files(tmp_path / RUN) == before


def test_a_file_where_the_run_folder_or_the_plots_folder_belongs_is_refused_before_training(mnist_root, tmp_path,
                                                                                             capsys):
    """Both were FileExistsError tracebacks, the first after loading the data, the second after training."""
    (tmp_path / RUN).write_text("a file of mine")
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    assert status == 2 and len(lines) == 1 and f"{tmp_path / RUN} is a file where the run's folder belongs" in lines[0]
    (tmp_path / RUN).unlink()
    (tmp_path / "plots").write_text("a file of mine")
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1"))
    assert status == 2 and len(lines) == 1 and f"--plots_dir {tmp_path / 'plots'}: " in lines[0], lines
    assert not (tmp_path / RUN).exists() and (tmp_path / "plots").read_text() == "a file of mine"


def test_an_unreadable_checkpoint_beside_no_finished_history_says_how_to_go_on(mnist_root, tmp_path, capsys,
                                                                               finished_run):
    shutil.copytree(finished_run, tmp_path / RUN)
    (tmp_path / RUN / "history.json").unlink()
    RunFiles(tmp_path / RUN).checkpoint.write_bytes(b"")
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1", "--resume"))
    assert status == 2 and len(lines) == 1 and "is not a loadable checkpoint" in lines[0], lines
    assert "the run cannot continue: pass --overwrite to train it again, or move its folder away" in lines[0]


def in_small_tmpfs(folder, script: str) -> subprocess.CompletedProcess:
    """Run a bash script with a fresh 4 MiB tmpfs mounted at `folder`, in a user and mount namespace of its own (no
    privilege needed; the mount ends with the script): a real file system that really fills up. $P is python."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs unshare and unprivileged user namespaces")
    folder.mkdir()
    mount = f'mount -t tmpfs -o size=4m tmpfs "{folder}"'
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", f"{mount} && {script}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, P=sys.executable))


def fill_but(folder, kib: int) -> str:
    """The bash commands that fill the file system of `folder`, then free `kib` KiB of it."""
    return f'(head -c 8M /dev/zero > "{folder}/filler" 2>/dev/null; truncate -s -{kib}K "{folder}/filler")'


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(mnist_root, tmp_path,
                                                                                 straight_run, finished_run):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    args = " ".join(args_for(mnist_root, disk / "runs"))
    result = in_small_tmpfs(disk, f'mkdir "{disk}/runs" && cp -a "{finished_run}" "{disk}/runs/" && '
                                  f'{fill_but(disk, 64)} && '
                                  f'$P pipeline.py {args} --num_epochs 3 --resume > /dev/null; echo "rc=$?"; '
                                  f'cp -a "{disk}/runs" "{kept}"')
    assert "rc=1" in result.stdout, result.stderr
    line = f"pipeline.py: error: {RUN} failed: no space left on {RunFiles(disk / 'runs' / RUN).checkpoint}"
    assert result.stderr.splitlines()[0] == line, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert load_checkpoint(RunFiles(kept / RUN).checkpoint)["epoch"] == 1
    assert len(json.loads((kept / RUN / "history.json").read_text())["epochs"]) == 1
    assert not [p for p in (kept / RUN).iterdir() if p.name.endswith(".tmp")]
    shutil.copytree(kept, tmp_path / "after")  # with space again, the resume is exact
    run_main(*args_for(mnist_root, tmp_path / "after", "--num_epochs", "3", "--resume"))
    assert_same_run(straight_run, tmp_path / "after" / RUN)


def test_a_full_disk_while_drawing_figures_is_one_line_and_keeps_the_old_ones(mnist_root, tmp_path, finished_run):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    args = " ".join(args_for(mnist_root, disk / "runs", "--num_epochs", "1"))
    result = in_small_tmpfs(disk, f'cp -a "{finished_run.parent}" "{disk}/runs" && '
                                  f'cp -a "{disk}/runs" "{tmp_path}/before" && '
                                  f'{fill_but(disk, 8)} && $P pipeline.py {args} --resume > /dev/null; '
                                  f'echo "rc=$?"; cp -a "{disk}/runs" "{kept}"')
    assert "rc=2" in result.stdout, result.stderr
    figure = disk / "runs" / "plots" / "mlp_training_loss.png"
    assert result.stderr.strip() == f"pipeline.py: error: no space left on {figure}"
    for figure in (tmp_path / "before" / "plots").iterdir():
        assert (kept / "plots" / figure.name).read_bytes() == figure.read_bytes()
    assert not [p for p in (kept / "plots").iterdir() if p.name.endswith(".tmp")]


def test_a_folder_where_a_figure_belongs_is_one_line_and_keeps_the_trained_run(mnist_root, tmp_path, capsys,
                                                                               finished_run):
    """It was an IsADirectoryError traceback after training."""
    shutil.copytree(finished_run.parent, tmp_path / "runs")
    folder = tmp_path / "runs" / "plots" / "mlp_Val_acc.png"
    folder.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.txt").write_text("mine")
    before = run_files(tmp_path / "runs" / RUN)
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path / "runs", "--num_epochs", "1", "--resume"))
    assert status == 2 and len(lines) == 1 and lines[0].endswith(
        f"error: {folder} is a folder where a file is written; move it away and run the command again"), lines
    assert (folder / "mine.txt").read_text() == "mine" and run_files(tmp_path / "runs" / RUN) == before


def figure_of(values: list[float]):
    from matplotlib.figure import Figure
    fig = Figure()
    fig.subplots().plot(values)
    return fig


@pytest.mark.parametrize("what", ["history", "config", "figure"])
def test_a_write_cut_short_leaves_the_previous_file_whole(tmp_path, finished_run, what):
    """The kernel refuses every byte past the 100th (a file size limit, as a disk that fills up mid-write): the
    file keeps what it held, and no temporary file is left."""
    shutil.copytree(finished_run, tmp_path / RUN)
    files = RunFiles(tmp_path / RUN)
    path = {"history": files.history, "config": files.config, "figure": tmp_path / "loss.png"}[what]
    if what == "figure":
        plots.savefig(figure_of([3, 2, 1]), path)
    before = path.read_bytes()
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, limits[1]))
    try:
        with pytest.raises(OSError, match="too large"):
            if what == "history":
                history = files.read_history()
                files.write_history(dict(history, epochs=history["epochs"] * 2))
            elif what == "config":
                files.write_config(replace(files.read_config(), lr=0.5))
            else:
                plots.savefig(figure_of([1, 2, 3]), path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before and len(before) > 100
    assert not list(path.parent.glob(".*.tmp"))
