"""The pipeline CLI end to end: outputs, sweeps, evaluation of a checkpoint, and bad input."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import pipeline
import utils
from conftest import ROOT, args_for, cli_exit, run_main, without_seconds
from runs import RunFiles, load_checkpoint, save_checkpoint


def run_cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_mlp_sweep_writes_every_output(mnist_root, tmp_path, capsys):
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "2", "--num-hidden-layers", "2", "4", "--residual_step",
                       "0", "2", "--lr", "1e-2"))
    runs = sorted(p.name for p in tmp_path.iterdir() if p.name != "plots")
    assert runs == ["mlp_mnist_h2_w8_plain_s0", "mlp_mnist_h2_w8_res2_s0",
                    "mlp_mnist_h4_w8_plain_s0", "mlp_mnist_h4_w8_res2_s0"]
    run_dir = tmp_path / "mlp_mnist_h4_w8_res2_s0"
    files = RunFiles(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in [*files.ours(), files.lock_file])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["depth"] == 6 and config["num_hidden_layers"] == 4 and config["in_channels"] == 1
    assert config["input_size"] == 28 and config["num_params"] == 784 * 8 + 8 + 4 * (8 * 8 + 8) + 8 * 10 + 10
    history = json.loads((run_dir / "history.json").read_text())
    assert set(history) == {"epochs", "machines", "test"}
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert set(history["epochs"][0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "seconds"}
    assert 0 <= history["test"]["acc"] <= 1 and history["test"]["loss"] > 0
    steps, grad_norms = RunFiles(run_dir).read_grad_norms()
    assert steps == list(range(20))  # 500 images / 50 per batch x 2 epochs
    assert len(grad_norms) == 6 and all(len(v) == 20 and (v > 0).all() for v in grad_norms.values())
    assert history["epochs"][1]["train_loss"] < history["epochs"][0]["train_loss"]
    checkpoint = load_checkpoint(RunFiles(run_dir).checkpoint)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["run_name"] == "mlp_mnist_h4_w8_res2_s0"
    assert {"model", "optimizer", "lr_scheduler", "history", "rng"} <= checkpoint.keys()
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["gradient_heatmap_mlp_mnist_h2_w8_plain_s0.png", "gradient_heatmap_mlp_mnist_h2_w8_res2_s0.png",
                     "gradient_heatmap_mlp_mnist_h4_w8_plain_s0.png", "gradient_heatmap_mlp_mnist_h4_w8_res2_s0.png",
                     "gradients_mlp_d2.png", "gradients_mlp_d2_res2.png", "gradients_mlp_d4.png",
                     "gradients_mlp_d4_res2.png", "mlp_Val_acc.png", "mlp_trainability.png", "mlp_training_loss.png"]
    out = capsys.readouterr().out
    assert "mlp_mnist_h4_w8_res2_s0: test loss" in out and "test acc" in out


def test_cli_evaluates_a_checkpoint(mnist_root, capsys, finished_run):
    checkpoint = RunFiles(finished_run).checkpoint
    history = json.loads((finished_run / "history.json").read_text())
    capsys.readouterr()
    run_main("--no-train", "--load_model_as", str(checkpoint), "--data_root", str(mnist_root), "--no-download",
             "--device", "cpu")
    out = capsys.readouterr().out
    assert f"accuracy {history['test']['acc']:.2%}" in out and "200 images" in out and "unfinished" not in out


def test_cli_says_when_the_checkpoint_it_evaluates_is_of_an_unfinished_run(mnist_root, tmp_path, capsys,
                                                                           finished_run):
    """An interrupted run's model scored like a finished one, with nothing to tell them apart."""
    checkpoint = load_checkpoint(RunFiles(finished_run).checkpoint)
    checkpoint["config"]["num_epochs"] = 5  # as a 5-epoch run saves it after its first epochs
    save_checkpoint(tmp_path / "cut.pt", checkpoint)
    run_main("--no-train", "--checkpoint", str(tmp_path / "cut.pt"), "--data_root", str(mnist_root),
             "--no-download", "--device", "cpu")
    assert f"unfinished: {checkpoint['epoch']} of 5 epochs) on the MNIST test set" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["CIFAR10", "MNIST"])
def test_no_train_refuses_the_flags_it_would_ignore(mnist_root, capsys, finished_run, dataset):
    """--no-train takes the model and its dataset from the checkpoint: a --dataset or --batch_size beside it once
    went unnoticed, and the MNIST model was evaluated on MNIST all the same; so did flags given their default value
    (--dataset MNIST beside a CIFAR-10 model would be as wrong)."""
    status, lines = cli_exit(capsys, "--no-train", "--checkpoint", str(RunFiles(finished_run).checkpoint),
                             "--data_root", str(mnist_root), "--no-download", "--device", "cpu", "--dataset",
                             dataset, "--batch_size", "0" if dataset == "CIFAR10" else "128")
    assert status == 2 and len(lines) == 1 and lines[0].endswith("leave out --dataset, --batch_size"), lines


def test_cnn_sweep_with_augmentation_and_seeds(cifar_root, tmp_path):
    runs = run_main("--model_name", "ResNet", "--dataset", "CIFAR10", "--data_root", str(cifar_root),
                    "--no-download", "--val_size", "100", "--limit_train", "128", "--batch_size", "64",
                    "--num_levels", "2", "--out_channels", "4", "--num_conv_per_level", "1", "3",
                    "--residual_step", "0", "2", "--seed", "0", "1", "--augment", "--stem", "imagenet",
                    "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu", "--out_dir", str(tmp_path))
    assert len(runs) == 8
    names = {config.run_name for config, _ in runs}
    assert "resnet_cifar10_d8_c4x2_in_res2proj_s1" in names and "resnet_cifar10_d4_c4x2_in_plain_s0" in names
    assert all(len(h["epochs"]) == 1 and "test" in h for _, h in runs)
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "Conv_train_loss.png", "Conv_val_accuracy.png", "Conv_gradients_d4.png", "Conv_gradients_d8.png",
        *(f"gradient_heatmap_resnet_cifar10_{name}_s0.png" for name in ("d4_c4x2_in_plain", "d4_c4x2_in_res2proj",
                                                                         "d8_c4x2_in_plain", "d8_c4x2_in_res2proj"))}


def test_same_seed_gives_the_same_history(mnist_root, tmp_path, finished_run):
    """A run trained again here, beside the same run trained by the suite's fixture."""
    (config, history), = run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1"))
    assert config.run_name == finished_run.name
    before = json.loads((finished_run / "history.json").read_text())
    assert without_seconds(history) == without_seconds(before)
    grad_norms = [(run_dir / "grad_norms.csv").read_text() for run_dir in (finished_run, tmp_path / config.run_name)]
    assert grad_norms[0] == grad_norms[1] and len(grad_norms[0].splitlines()) == 11


def test_run_name_is_the_folder_of_a_single_run_and_a_prefix_in_a_sweep(mnist_root, tmp_path):
    one = args_for(mnist_root, tmp_path, "--num_epochs", "1", "--num_hidden_layers", "2", "--run_name", "mine")
    (config, _), = run_main(*one)
    assert config.run_name == "mine" and RunFiles(tmp_path / "mine").checkpoint.is_file()
    runs = run_main(*args_for(mnist_root, tmp_path / "sweep", "--num_epochs", "1", "--num_hidden_layers", "2", "4",
                              "--run_name", "exp"))
    names = ["exp_mlp_mnist_h2_w8_plain_s0", "exp_mlp_mnist_h4_w8_plain_s0"]
    assert [config.run_name for config, _ in runs] == names
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [*names, "plots"]
    assert all((tmp_path / "sweep" / name / "history.json").is_file() for name in names)


def test_checkpoint_flag_is_where_a_single_run_saves_and_resumes(mnist_root, tmp_path, capsys):
    path = tmp_path / "elsewhere" / "model.pt"
    args = args_for(mnist_root, tmp_path / "runs", "--checkpoint", str(path))
    (_, first), = run_main(*args, "--num_epochs", "1")
    run_dir = tmp_path / "runs" / "mlp_mnist_h4_w8_plain_s0"
    assert load_checkpoint(path)["epoch"] == 1
    assert not RunFiles(run_dir).checkpoint.exists() and (run_dir / "history.json").is_file()
    (_, history), = run_main(*args, "--num_epochs", "2", "--resume")
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert history["epochs"][0] == first["epochs"][0] and len(history["epochs"]) == 2
    assert load_checkpoint(path)["epoch"] == 2 and not RunFiles(run_dir).checkpoint.exists()


def test_help_states_defaults_and_both_spellings(pipeline_help):
    status, text = pipeline_help
    assert status == 0
    text = " ".join(text.split())
    for flag in ("--num_epochs", "--num-epochs", "--load_model_as", "--save_model_as", "--no-train",
                 "--no-download", "--limit_train", "--residual-step"):
        assert flag in text
    assert "(default: 3e-4)" in text.replace("0.0003", "3e-4") and "(default: 5000)" in text


@pytest.mark.parametrize("args,message", [
    (["--num_epochs", "0"], "--num_epochs"),
    (["--batch_size", "-1"], "--batch_size"),
    (["--lr", "0"], "--lr"),
    (["--width", "8", "0"], "--width"),
    (["--num_hidden_layers", "-2"], "--num_hidden_layers"),
    (["--num_hidden_layers", "5", "--residual_step", "2"], "--residual_step"),
    (["--residual_step", "-1"], "--residual_step"),
    (["--val_size", "600"], "--val_size"),
    (["--limit_train", "501"], "--limit_train"),
    (["--input_size", "32"], "--input_size"),
    (["--augment"], "--augment"),
    (["--device", "cuda:7"], "--device"),
    (["--device", "tpu"], "--device"),
    (["--device", "cpu:7"], "--device 'cpu:7' is not supported"),  # once accepted, as if it were a CPU to choose
    (["--out_dir", "{file}/runs"], "--out_dir"),
    (["--data_root", "{tmp}/nowhere"], "MNIST"),
    (["--model_name", "VGG"], "--model_name"),
    (["--dataset", "ImageNet"], "--dataset"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--no-train"], "--checkpoint"),
    (["--no-train", "--checkpoint", "{file}"], "checkpoint"),
    (["--nesterov"], "--nesterov"),
    (["--nesterov", "--optimizer", "sgd", "--momentum", "0"], "--nesterov"),
    (["--model_name", "ResNet", "--width", "16", "32"], "--width"),
    (["--num_conv_per_level", "1", "3"], "--num_conv_per_level"),
    (["--lr_schedule", "onecycle", "--num_epochs", "2", "--warmup_epochs", "2"], "--warmup_epochs"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(mnist_root, tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("not a folder, not a checkpoint")
    args = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in args]
    base = ["--data_root", str(mnist_root), "--no-download", "--val_size", "100", "--device", "cpu",
            "--out_dir", str(tmp_path / "runs")]
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(base + args))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_bad_input_from_a_real_process_is_one_line(tmp_path):
    result = run_cli("--num_epochs", "many", "--out_dir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--num_epochs" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_not_overwritten(mnist_root, tmp_path, capsys, finished_run):
    shutil.copytree(finished_run, tmp_path / finished_run.name)
    before = (RunFiles(tmp_path / "mlp_mnist_h4_w8_plain_s0").checkpoint).read_bytes()
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--num_epochs", "1"))
    assert status == 2 and len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0], lines
    assert (RunFiles(tmp_path / "mlp_mnist_h4_w8_plain_s0").checkpoint).read_bytes() == before


def test_a_schedule_longer_than_the_run_is_refused_before_anything_is_read(mnist_root, tmp_path, capsys):
    """Two batches of 50 images cannot hold onecycle's rise and fall: once the run's folder was made and the run
    reported failed (exit 1); now it is refused with the other impossible combinations, before anything is read."""
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--lr_schedule", "onecycle", "--limit_train",
                                               "100", "--num_epochs", "1"))
    assert status == 2 and len(lines) == 1 and "needs at least 3 training steps; this run has 2" in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_a_schedule_longer_than_a_small_copy_of_the_data_is_refused_before_training(mnist_root, tmp_path, capsys):
    """The config allows it on the official 60,000 images; this copy's 500 make 2 batches of 400: the run folder
    was made and the run failed (exit 1) after the data was read."""
    status, lines = cli_exit(capsys, *args_for(mnist_root, tmp_path, "--lr_schedule", "onecycle", "--batch_size",
                                               "400", "--num_epochs", "1"))
    assert status == 2 and len(lines) == 1 and "this run has 2 (1 epoch(s) of 2 batch(es))" in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_a_sweep_without_gradient_logs_says_which_figures_it_leaves_out(mnist_root, tmp_path, capsys):
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "1", "--num_hidden_layers", "2", "--grad_log_every",
                       "0"))
    out = capsys.readouterr().out
    assert "gradient figures: skipped mlp_mnist_h2_w8_plain_s0: it logged no gradient norms (--grad_log_every 0)" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["mlp_Val_acc.png", "mlp_trainability.png",
                                                                     "mlp_training_loss.png"]
