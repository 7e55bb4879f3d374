"""The time-to-accuracy recipe (--preset resnet20_fast): each of its levers is applied where training and scoring
use it, its flags are checked like every flag, and its runs are reported and drawn."""
import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

import pipeline
import report
import train
import utils
from config import PRESETS, RunConfig
from conftest import cli_exit, replay, run_config, run_main
from data import DATASETS, load_dataset, make_splits, normalize
from runs import RunFiles, load_checkpoint, model_of

# the recipe on a network small enough for the tiny CIFAR-10 (500 training images, 100 test images)
TINY = ["--out_channels", "4", "--num_levels", "2", "--num_conv_per_level", "2", "--batch_size", "50",
        "--num_epochs", "2", "--no-download", "--device", "cpu"]


def fast(cifar_root, *flags: str) -> list[str]:
    return ["--preset", "resnet20_fast", "--data_root", str(cifar_root), *TINY, *flags]


def tiny_setup(cifar_root, *flags: str) -> train.RunSetup:
    """The RunSetup pipeline.py would train for the tiny recipe, with these flags changed."""
    config = run_config(*fast(cifar_root, "--seed", "0", *flags))
    return train.prepare_run(config, load_dataset("CIFAR10", cifar_root, download=False))


def test_the_preset_is_exercise_2s_recipe_on_all_images_with_flip_tta():
    fast_config = run_config("--preset", "resnet20_fast", "--seed", "0")
    ex2 = run_config("--preset", "exercise2", "--num_conv_per_level", "6", "--residual_step", "2", "--seed", "0")
    assert {name for name in fast_config.to_dict() if getattr(fast_config, name) != getattr(ex2, name)} == {
        "val_size", "num_epochs", "tta", "warmup_epochs"}
    assert (fast_config.val_size, fast_config.num_epochs, fast_config.ema, fast_config.tta) == (0, 21, 0, "flip")
    assert fast_config.depth == 20 and fast_config.num_epochs * 50000 <= 1_080_000  # the image budget
    assert PRESETS["resnet20_fast"]["seed"] == [0, 1, 2]
    # results/fast's runs, trained before --ema left the preset, differ from it by --ema alone (which trains the
    # same weights: see the test of the average below)
    assert fast_config == run_config(*TRAINED_WITH, "--seed", "0", "--ema", "0")


# the flag line that trained results/fast, before the preset existed
TRAINED_WITH = ["--preset", "resnet20", "--augment", "--optimizer", "sgd", "--lr", "0.2", "--momentum", "0.9",
                "--nesterov", "--weight_decay", "5e-4", "--label_smoothing", "0.1", "--lr_schedule", "onecycle",
                "--batch_size", "128", "--ema", "0.999", "--tta", "flip", "--val_size", "0", "--num_epochs", "21"]


def test_the_recipes_optimiser_schedule_and_data_reach_what_the_loop_steps(cifar_root):
    run = tiny_setup(cifar_root)
    decay, no_decay = run.optimizer.param_groups
    assert isinstance(run.optimizer, torch.optim.SGD) and decay["nesterov"] and decay["momentum"] == 0.9
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert isinstance(run.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    lrs = []
    for _ in range(len(run.train) * 2):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()
        run.scheduler.step()
    assert max(lrs) == pytest.approx(0.2) and lrs[0] == pytest.approx(0.2 / 25)
    assert run.train.batch_size == 50 and len(run.train.labels) == 500 and len(run.val) == 0  # --val_size 0
    images, _ = next(iter(replay(run.train)))
    index = replay(run.train).epoch_indices()[0]
    assert not torch.equal(images, run.train.images[index])  # cropped and flipped


def test_the_training_loss_is_label_smoothed(cifar_root):
    """The loss the first step trains on and records is cross-entropy with label smoothing 0.1 of that batch."""
    run = tiny_setup(cifar_root, "--num_epochs", "1")
    start = copy.deepcopy(run.model)
    images, labels = next(iter(replay(run.train)))
    start.train()
    smoothed = F.cross_entropy(start(images), labels, label_smoothing=0.1).item()
    plain = F.cross_entropy(start(images), labels).item()
    run.train = train.TrainLoader(train.Split(images, labels), len(labels), 0)  # one step: that batch, reordered
    result = train.train_one_epoch(run, 1, 0)
    assert result.loss == pytest.approx(smoothed, rel=1e-5) and abs(smoothed - plain) > 1e-3


def test_the_average_is_updated_every_step_and_is_what_is_scored_and_saved(cifar_root, tmp_path):
    (config, history), = run_main(*fast(cifar_root, "--seed", "0", "--ema", "0.999", "--out_dir", str(tmp_path)))
    checkpoint = load_checkpoint(RunFiles(tmp_path / config.run_name).checkpoint)
    assert checkpoint["ema"]["n_averaged"].item() == history["epochs"][-1]["steps"] == 20
    averaged = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k != "n_averaged"}
    assert any(not torch.equal(averaged[k], checkpoint["model"][k]) for k in checkpoint["model"])
    _, model = model_of(checkpoint, "c.pt")  # what --no-train and cam.py score
    assert all(torch.equal(model.state_dict()[k], averaged[k]) for k in averaged)
    running_means = [k for k in averaged if k.endswith("running_mean")]
    assert running_means and any(not torch.equal(averaged[k], checkpoint["model"][k]) for k in running_means)
    # the average only watches: without it the same weights are trained, so its runs' trained-weights accuracy is
    # what the recipe without --ema gives
    (plain_config, plain_history), = run_main(*fast(cifar_root, "--seed", "0", "--out_dir", str(tmp_path / "no_ema")))
    trained = load_checkpoint(RunFiles(tmp_path / "no_ema" / plain_config.run_name).checkpoint)["model"]
    assert all(torch.equal(trained[k], checkpoint["model"][k]) for k in checkpoint["model"])
    assert plain_history["test"]["acc"] == history["test"]["acc_trained_weights"]


def test_flip_tta_is_the_mean_of_the_softmax_of_each_image_and_its_mirror(cifar_root):
    run = tiny_setup(cifar_root)
    model = run.model.eval()
    test = run.test
    with torch.no_grad():
        probs = (F.softmax(model(test.images), 1) + F.softmax(model(test.images.flip(3)), 1)) / 2
    loss, acc = train.evaluate(model, test, batch_size=30, tta="flip")
    assert acc == pytest.approx((probs.argmax(1) == test.labels).float().mean().item())
    assert loss == pytest.approx(F.nll_loss(probs.log(), test.labels).item(), rel=1e-4)
    assert (loss, acc) != train.evaluate(model, test, batch_size=30)


def test_a_recipe_run_records_every_test_accuracy_apart_and_scores_its_epochs_on_the_test_set(cifar_root, tmp_path,
                                                                                           capsys):
    (config, history), = run_main(*fast(cifar_root, "--seed", "0", "--out_dir", str(tmp_path)))
    assert set(history["test"]) == {"loss", "acc", "loss_flip", "acc_flip", "seconds"}
    assert all("test_acc" in e and "val_acc" not in e for e in history["epochs"])
    assert history["epochs"][-1]["test_acc"] == history["test"]["acc"]  # the same weights on the same images
    assert history["machines"] and "thread" in history["machines"][0]
    saved = json.loads((tmp_path / config.run_name / "config.json").read_text())
    assert (saved["val_size"], saved["ema"], saved["tta"]) == (0, 0, "flip")
    out = capsys.readouterr().out
    assert "test acc" in out and "flip:" in out and "trained weights:" not in out and "val acc" not in out
    run_main("--no-train", "--checkpoint", str(tmp_path / config.run_name / "checkpoint.pt"), "--data_root",
             str(cifar_root), "--no-download", "--device", "cpu")
    test = history["test"]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].endswith(
        f"accuracy {test['acc']:.2%} (with --tta flip: {test['acc_flip']:.2%})")


def test_no_train_scores_an_ema_run_on_its_validation_split_with_and_without_the_average(cifar_root, tmp_path,
                                                                                         capsys):
    """How --ema is chosen on validation: the same held-out images scored by both weights of one checkpoint."""
    (config, history), = run_main(*fast(cifar_root, "--seed", "3", "--val_size", "100", "--lr", "0.05",
                                        "--ema", "0.9", "--out_dir", str(tmp_path)))
    checkpoint = tmp_path / config.run_name / "checkpoint.pt"
    capsys.readouterr()
    threads = torch.get_num_threads()
    run_main("--no-train", "--checkpoint", str(checkpoint), "--data_root", str(cifar_root), "--no-download",
             "--device", "cpu", "--threads", "1")  # where it runs: --threads applies, as --device does
    assert torch.get_num_threads() == threads
    test_line, val_line = capsys.readouterr().out.splitlines()
    assert f"accuracy {history['test']['acc']:.2%}" in test_line
    assert val_line.startswith(f"{config.run_name} on its validation split (100 training images held out by seed 3)")
    state = load_checkpoint(checkpoint)
    (_, averaged), (_, trained) = (model_of(state, checkpoint, averaged=flag) for flag in (True, False))
    assert all(torch.equal(state["model"][name], value) for name, value in trained.state_dict().items())
    assert not all(torch.equal(averaged.state_dict()[name], value) for name, value in trained.state_dict().items())
    val = make_splits(load_dataset("CIFAR10", cifar_root, download=False), 100, 3, None)[1]
    trained_acc = train.evaluate(trained, val.normalized(DATASETS["CIFAR10"], "cpu"))[1]
    assert val_line.endswith(f"accuracy {history['epochs'][-1]['val_acc']:.2%} (trained weights, no average: "
                             f"{trained_acc:.2%})")


@pytest.mark.parametrize("flags,words", [
    (["--ema", "1"], "--ema must be a finite number of at least 0 and below 1"),
    (["--ema", "-0.5"], "--ema must be"), (["--ema", "nan"], "--ema must be"),
    (["--tta", "rotate"], "--tta"), (["--val_size", "-1"], "--val_size"),
    (["--val_size", "50000"], "--val_size 50000 must be between 0 and 499"),
])
def test_bad_values_of_the_new_flags_are_one_line(cifar_root, tmp_path, capsys, flags, words):
    status, lines = cli_exit(capsys, *fast(cifar_root, "--seed", "0", "--out_dir", str(tmp_path), *flags))
    assert status == 2 and len(lines) == 1 and words in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_flip_tta_without_flipped_training_images_is_refused(mnist_root, tmp_path, capsys):
    status, lines = cli_exit(capsys, "--data_root", str(mnist_root), "--no-download", "--tta", "flip",
                             "--out_dir", str(tmp_path))
    assert status == 2 and len(lines) == 1 and "--tta flip needs --augment" in lines[0]


def test_a_config_of_before_ema_and_tta_still_loads_as_a_run_without_them():
    saved = run_config("--preset", "exercise2", "--seed", "0").to_dict()
    del saved["ema"], saved["tta"]
    config = RunConfig.from_dict(saved)
    assert (config.ema, config.tta) == (0.0, "none")


def test_report_tables_the_recipe_beside_he_et_al_and_draws_time_to_accuracy(cifar_root, tmp_path):
    fast_dir, ex2_dir, png = tmp_path / "fast", tmp_path / "ex2", tmp_path / "img" / "time_to_accuracy.png"
    average = ["--ema", "0.9", "--out_dir", str(fast_dir)]  # scored by an average, as results/fast's depth-20 runs were
    run_main(*fast(cifar_root, "--seed", "0", "1", *average))
    plain = ["--num_conv_per_level", "1", "2", "--residual_step", "0", "--seed", "0"]
    run_main(*fast(cifar_root, *plain, *average))
    # a network trained without the average beside them: compared by the trained weights, in a row of its own
    run_main(*fast(cifar_root, "--num_conv_per_level", "1", "--seed", "0", "--out_dir", str(fast_dir)))
    run_main("--preset", "exercise2", "--data_root", str(cifar_root), *TINY, *plain, "--val_size", "50",
             "--out_dir", str(ex2_dir))
    blocks = report.main(report.get_args_parser().parse_args(
        ["--fast", str(fast_dir), "--ex2", str(ex2_dir), "--time_to_accuracy", str(png)]))
    rows = [line for line in blocks["fast"].splitlines() if line.startswith("| depth")]
    residual = [json.loads(p.read_text()) for p in sorted(fast_dir.glob("*d6*res2*/history.json"))]
    row = next(row for row in rows if row.startswith("| depth 6, residual"))
    accuracies = [report.median_range([h["test"][key] for h in residual], report.percent2)
                  for key in ("acc", "acc_flip")]
    assert row.split(" | ")[1:5] == ["2", "-", *accuracies]  # a smaller copy of CIFAR-10: its images are not counted
    assert [row.split(" | ")[0].endswith(", --ema 0.9") for row in rows] == [True, False, True, True]
    assert "He et al. 2016, ResNet-20: 91.25% test accuracy" in blocks["fast"] and "thread" in blocks["fast"]
    tiny = "--num_epochs 2 --out_channels 4 --num_levels 2 --batch_size 50"
    assert blocks["fast"].endswith(f"beyond --preset resnet20_fast and its network: {tiny} (1 of 5 runs); "
                                   f"{tiny} --ema 0.9 (4 of 5 runs).")
    assert "plain depth 6 tests worse than plain depth 4" in blocks["fast-checks"]
    assert "residual depth 6 tests at least as well as residual depth 4" in blocks["fast-checks"]
    # the recipe's shallowest depth is judged with and without shortcuts, as He et al.'s depth 20 is
    assert "at depth 4 the residual network's training loss is below the plain one's" in blocks["fast-checks"]

    def acc(out_dir, name: str, key: str) -> float:
        return json.loads((out_dir / name / "history.json").read_text())["test"][key]
    # networks compared as trained: the recipe's runs by their trained weights, not the average they score
    gaps = [100 * (acc(d, "resnet_cifar10_d4_c4x2_plain_s0", key) - acc(d, "resnet_cifar10_d6_c4x2_plain_s0", key))
            for d, key in ((ex2_dir, "acc"), (fast_dir, "acc_trained_weights"))]
    below = [f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'}" for gap in gaps]
    assert (f"Plain depth 6 tests {below[0]} plain depth 4 after Exercise 2 (2 epochs) and {below[1]} it after "
            "resnet20_fast (2 epochs).") in blocks["fast-degradation"]
    assert png.stat().st_size > 10_000
    run_main(*fast(cifar_root, "--seed", "0", "--val_size", "50", "--lr", "0.4", "--run_name", "val50_lr04",
                   "--out_dir", str(tmp_path / "ablation")))
    blocks = report.main(report.get_args_parser().parse_args(
        ["--fast", str(fast_dir), "--ablation", str(tmp_path / "ablation"), "--keep", str(tmp_path / "kept")]))
    rows = [row.split(" | ")[:2] for row in blocks["fast-ablation"].splitlines()[2:] if row.startswith("| ")]
    tiny = "--num_epochs 2 --num_conv_per_level 2 --out_channels 4 --num_levels 2"
    assert rows == [[f"| {tiny} --batch_size 50 --ema 0.9", "0"], [f"| {tiny} --batch_size 50 --ema 0.9", "1"],
                    [f"| {tiny} --val_size 50 --batch_size 50 --lr 0.4", "0"]], rows
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["fast", "fast-ablation"]


def test_fast_runs_may_differ_in_ema_alone(tmp_path):
    """--fast compares trained weights, which --ema does not change; another rate is another sweep there too."""
    recipe = run_config("--preset", "resnet20_fast", "--seed", "0")
    averaged = run_config("--preset", "resnet20_fast", "--seed", "1", "--residual_step", "0", "--ema", "0.999")
    report.check_one_sweep([recipe, averaged], "--fast", tmp_path)
    with pytest.raises(utils.UsageError, match="trained with --ema 0.999, not 0.0 as"):
        report.check_one_sweep([recipe, averaged], "--ex2", tmp_path)
    faster = run_config("--preset", "resnet20_fast", "--seed", "1", "--ema", "0.999", "--lr", "0.4")
    with pytest.raises(utils.UsageError, match="trained with --lr 0.4, not 0.2 as"):
        report.check_one_sweep([recipe, faster], "--fast", tmp_path)


@pytest.mark.parametrize("flags,words", [(["--time_to_accuracy", "t.png"], "give --fast too"),
                                         (["--fast", "{tmp}", "--time_to_accuracy", "{tmp}"], "is a folder")])
def test_time_to_accuracy_refuses_what_it_cannot_draw(tmp_path, capsys, flags, words):
    from utils import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(report.main, report.get_args_parser().parse_args([f.format(tmp=tmp_path) for f in flags]))
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_an_ablation_row_names_only_the_levers_it_changes():
    recipe = report.preset_config("resnet20_fast")
    assert report.recipe_changes(run_config("--preset", "resnet20_fast", "--seed", "2", "--threads", "1"),
                                 recipe) == "the recipe"
    changed = run_config("--preset", "resnet20_fast", "--val_size", "5000", "--num_epochs", "24", "--ema", "0.999")
    assert report.recipe_changes(changed, recipe) == "--num_epochs 24 --val_size 5000 --ema 0.999"
    longer_warmup = run_config("--preset", "resnet20_fast", "--warmup_epochs", "10")
    assert report.recipe_changes(longer_warmup, recipe) == "--warmup_epochs 10.0"


def test_cam_py_explains_the_averaged_weights_of_an_ema_run(cifar_root, tmp_path, capsys):
    """cam.py maps what the scored (averaged) weights predict, with their confidence, as --no-train scores them."""
    import cam
    (config, _), = run_main(*fast(cifar_root, "--seed", "0", "--ema", "0.9", "--out_dir", str(tmp_path)))
    checkpoint = tmp_path / config.run_name / "checkpoint.pt"
    capsys.readouterr()
    cam.main(cam.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--data_root", str(cifar_root), "--no-download", "--device", "cpu",
         "--num-images-to-save", "30", "--out_dir", str(tmp_path / "cam")]))
    said = re.findall(r"predicted (\w+) \((\d+\.\d)%\)", capsys.readouterr().out)
    state = load_checkpoint(checkpoint)
    images = normalize(load_dataset("CIFAR10", cifar_root, download=False).test_images[:30], DATASETS["CIFAR10"])

    def predictions(averaged: bool) -> list[tuple[str, str]]:
        probs = model_of(state, checkpoint, averaged=averaged)[1].eval()(images).softmax(1).max(1)
        return [(DATASETS["CIFAR10"].classes[c], f"{100 * p:.1f}") for p, c in zip(*probs)]
    assert said == predictions(True) != predictions(False)
