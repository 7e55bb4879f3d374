"""The training loop and its setup: gradient-norm log, full validation count, determinism, divergence, optimizer,
schedules, threads and memory format."""
import copy
import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import image_of_step, replay, run_config
from data import Split, TrainLoader, load_dataset
from models import MLP, ResNet, build_model
from runs import RunFiles
from train import (LOSS_CHECK_EVERY, DivergedLoss, Runtime, build_optimizer, build_scheduler, cpu_threads,
                   evaluate, logged_weights, prepare_run, train_one_epoch, train_run, uses_channels_last)

TINY_CNN = ("--model_name", "ResNet", "--dataset", "CIFAR10", "--val_size", "100", "--limit_train", "64",
            "--batch_size", "32", "--num_levels", "2", "--num_conv_per_level", "1")


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_dataset("MNIST", mnist_root, download=False)


@pytest.fixture(scope="module")
def cifar(cifar_root):
    return load_dataset("CIFAR10", cifar_root, download=False)


def mlp_run(raw, *flags: str) -> train.RunSetup:
    """A run of a small MLP on the tiny MNIST (500 training images), set up as pipeline.py sets it up."""
    return prepare_run(run_config("--val_size", "100", "--width", "8", *flags), raw)


def random_split(n: int, shape=(1, 28, 28), seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_grad_norms_equal_a_direct_computation(mnist):
    run = mlp_run(mnist, "--num_hidden_layers", "4", "--residual_step", "2", "--lr", "1e-3", "--limit_train", "200",
                  "--batch_size", "64")
    reference = copy.deepcopy(run.model)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    order = replay(run.train)
    result = train_one_epoch(run, 1, 0)
    expected = []
    for images, labels in order:
        ref_optimizer.zero_grad()
        loss = F.cross_entropy(reference(images), labels)
        loss.backward()
        expected.append([p.grad.norm().item() for p in logged_weights(reference).values()])
        ref_optimizer.step()
    assert result.grad_steps == [0, 1, 2, 3] and result.steps == 4
    assert result.grad_norms.shape == (4, 6)  # input, 4 hidden, head
    assert torch.allclose(result.grad_norms, torch.tensor(expected), rtol=1e-5)
    for p, q in zip(run.model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_grad_log_every_and_off(mnist):
    run = mlp_run(mnist, "--num_hidden_layers", "2", "--limit_train", "300", "--batch_size", "32",
                  "--grad_log_every", "4")
    result = train_one_epoch(run, 2, start_step=10)
    assert result.grad_steps == [12, 16]
    assert result.grad_norms.shape == (2, 4)
    off = train_one_epoch(mlp_run(mnist, "--num_hidden_layers", "2", "--grad_log_every", "0"), 3, 0)
    assert off.grad_steps == [] and off.grad_norms.shape == (0, 4)


def test_training_loss_is_the_mean_over_samples(mnist):
    # lr 1e-30: steps far below float32's resolution leave the weights, so losses can be recomputed; batches of 100, 30
    run = mlp_run(mnist, "--num_hidden_layers", "1", "--limit_train", "130", "--batch_size", "100", "--lr", "1e-30")
    result = train_one_epoch(run, 1, 0)
    with torch.no_grad():
        expected = F.cross_entropy(run.model(run.train.images), run.train.labels).item()
    assert result.steps == 2 and result.loss == pytest.approx(expected, rel=1e-5)


def test_evaluate_counts_every_image():
    """The original divided by batches x batch size; 1001 images with batch 1000 must count all 1001."""
    split = random_split(1001)
    model = MLP(784, 8, 1, 10)
    loss, acc = evaluate(model, split, batch_size=1000)
    with torch.no_grad():
        logits = model(split.images)
    assert acc == (logits.argmax(1) == split.labels).sum().item() / 1001
    assert loss == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    perfect = Split(split.images, logits.argmax(1))
    assert evaluate(model, perfect, batch_size=128)[1] == 1.0


def test_same_seed_same_history(cifar):
    def run(seed: str):
        setup = prepare_run(run_config(*TINY_CNN, "--out_channels", "4", "--residual_step", "1", "--seed", seed),
                            cifar)
        results = [train_one_epoch(setup, epoch, 2 * (epoch - 1)) for epoch in (1, 2)]
        return [r.loss for r in results], torch.cat([r.grad_norms for r in results])
    losses, norms = run("0")
    again, norms_again = run("0")
    assert losses == again and torch.equal(norms, norms_again)
    assert run("1")[0] != losses


def test_non_finite_loss_stops_within_the_check_interval_and_names_epoch_and_step(mnist):
    run = mlp_run(mnist, "--num_hidden_layers", "1", "--batch_size", "10", "--lr", "0.1")  # 50 steps an epoch
    run.train.images[image_of_step(run, 13)] = float("nan")
    with pytest.raises(DivergedLoss, match=r"epoch 3 became nan at step 113\b"):
        train_one_epoch(run, 3, start_step=100)
    steps_taken = run.scheduler.last_epoch  # the schedule is stepped once per training step
    assert 0 <= steps_taken - 14 < LOSS_CHECK_EVERY


def test_non_finite_validation_loss_stops_before_the_checkpoint(mnist, tmp_path, monkeypatch):
    real_prepare_run = train.prepare_run

    def poisoned_validation(*args):
        run = real_prepare_run(*args)
        run.val.images[7] = float("nan")
        return run
    monkeypatch.setattr(train, "prepare_run", poisoned_validation)
    files = RunFiles(tmp_path / "run")
    config = run_config("--val_size", "100", "--width", "8", "--num_hidden_layers", "1", "--num_epochs", "2")
    with pytest.raises(DivergedLoss, match=r"validation loss after epoch 1 became nan at step 4"):
        train_run(config, mnist, files, resume=False, runtime=Runtime(progress=False))
    assert not files.checkpoint.exists() and not files.history.exists()


def plain_steps(model, optimizer, split: Split, steps: int) -> list[float]:
    """The textbook loop: zero, forward, backward, step."""
    losses = []
    for images, labels in itertools.islice(TrainLoader(split, 32, seed=0), steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("flags", [("--optimizer", "adam"), ("--optimizer", "sgd"),
                                   ("--optimizer", "sgd", "--nesterov")])
def test_fused_optimizer_steps_like_the_plain_one(flags):
    """The run's fused optimizer gives the losses and weights of a plain for-loop optimizer."""
    split = random_split(128)
    config = run_config("--width", "8", "--num_hidden_layers", "2", "--residual_step", "2", "--lr", "1e-2",
                        "--weight_decay", "1e-4", *flags)
    torch.manual_seed(0)
    fast, plain = build_model(config), build_model(config)
    plain.load_state_dict(fast.state_dict())
    groups = [{"params": [p for p in plain.parameters() if p.ndim > 1], "weight_decay": 1e-4},
              {"params": [p for p in plain.parameters() if p.ndim == 1], "weight_decay": 0.0}]
    reference = (torch.optim.Adam(groups, lr=1e-2, foreach=False) if config.optimizer == "adam"
                 else torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=config.nesterov, foreach=False))
    fast_losses = plain_steps(fast, build_optimizer(fast, config), split, 4)
    assert fast_losses == pytest.approx(plain_steps(plain, reference, split, 4), rel=1e-5)
    for p, q in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_weight_decay_shrinks_weights_but_not_biases_or_batch_norm():
    config = run_config("--model_name", "ResNet", "--out_channels", "4", "--num_levels", "1",
                        "--num_conv_per_level", "1", "--optimizer", "sgd", "--lr", "0.1", "--weight_decay", "0.5")
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay moves a parameter
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if p.ndim > 1 else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)
    assert {n for n, p in model.named_parameters() if p.ndim == 1} >= {"fc.bias", "stem.0.1.weight", "stem.0.1.bias"}


def lrs_over_training(*flags: str, steps_per_epoch: int = 10) -> list[float]:
    """The learning rate of every training step of a run with these flags (--lr 0.1)."""
    config = run_config("--num_hidden_layers", "1", "--width", "4", "--lr", "0.1", *flags)
    optimizer = build_optimizer(build_model(config), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for _ in range(config.num_epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_onecycle_rises_over_the_warm_up_to_lr_then_anneals_to_lr_over_25e4():
    lrs = lrs_over_training("--lr_schedule", "onecycle", "--num_epochs", "4")  # warm-up: 30% of 40 steps
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert int(np.argmax(lrs)) == 11 and max(lrs) == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:12]) > 0) and np.all(np.diff(lrs[11:]) < 0)
    assert lrs[-1] == pytest.approx(0.1 / 25e4)


@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 4), (1, 3), (2, 2), (1, 6), (3, 1)])
def test_onecycle_of_a_few_batches_rises_for_at_least_two_steps(epochs, steps_per_epoch):
    """A warm-up that rounds to 0 or 1 step made OneCycleLR divide by zero; it rises over 2 steps instead."""
    lrs = lrs_over_training("--lr_schedule", "onecycle", "--num_epochs", str(epochs), steps_per_epoch=steps_per_epoch)
    peak = max(2, round(0.3 * len(lrs))) - 1
    assert lrs[0] == pytest.approx(0.1 / 25) and int(np.argmax(lrs)) == peak and max(lrs) == pytest.approx(0.1)
    assert np.all(np.diff(lrs[peak:]) < 0)


@pytest.mark.parametrize("steps_per_epoch", [1, 2])
def test_onecycle_of_fewer_than_3_steps_is_refused_with_the_flags_to_change(steps_per_epoch):
    with pytest.raises(ValueError, match=f"at least 3 training steps; this run has {steps_per_epoch} .*--batch_size"):
        lrs_over_training("--lr_schedule", "onecycle", "--num_epochs", "1", steps_per_epoch=steps_per_epoch)


@pytest.mark.parametrize("warmup", ["0", "1"])
def test_step_schedule_divides_by_10_at_half_and_three_quarters(warmup):
    lrs = lrs_over_training("--lr_schedule", "step", "--num_epochs", "4", "--warmup_epochs", warmup)
    start = 10 * int(warmup)
    assert lrs[start:20] == pytest.approx([0.1] * (20 - start))
    assert lrs[20:30] == pytest.approx([0.01] * 10) and lrs[30:] == pytest.approx([0.001] * 10)


def test_cosine_decays_to_near_zero():
    lrs = lrs_over_training("--lr_schedule", "cosine", "--num_epochs", "4")
    assert lrs[0] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.05)
    assert np.all(np.diff(lrs) < 0) and lrs[-1] < 0.1 * 0.01


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warm_up_rises_linearly_to_lr(schedule):
    lrs = lrs_over_training("--lr_schedule", schedule, "--num_epochs", "2", "--warmup_epochs", "1")
    assert np.diff(lrs[:11]) == pytest.approx([0.1 / 11] * 10)  # 0.1/11, 0.2/11, ... 1.0 at the end of warm-up
    assert lrs[10] == pytest.approx(0.1) and lrs[11] <= lrs[10]


def test_thread_policy(monkeypatch):
    monkeypatch.setattr(train, "DEFAULT_THREADS", 8)  # torch found 8 cores at start-up
    cnn = ("--model_name", "ResNet", "--out_channels", "4", "--num_levels", "1", "--num_conv_per_level", "1")
    assert cpu_threads(run_config()) == 1 and cpu_threads(run_config(), jobs=2) == 1  # the MLP: always one
    assert [cpu_threads(run_config(*cnn), jobs) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]  # cores shared out
    assert cpu_threads(run_config("--threads", "3")) == 3
    assert cpu_threads(run_config(*cnn, "--threads", "1")) == 1


@pytest.mark.parametrize("flags,on_cpu", [(("--model_name", "ResNet", "--out_channels", "16"), True),
                                          (("--model_name", "ResNet", "--out_channels", "8"), False),
                                          ((), False)])
def test_channels_last_policy(flags, on_cpu):
    config = run_config(*flags, *("--num_levels", "1", "--num_conv_per_level", "1") * bool(flags))
    assert uses_channels_last(config) == on_cpu
    assert uses_channels_last(replace(config, device="cuda")) == (config.model_name == "ResNet")


@pytest.mark.parametrize("channels,expected", [("16", True), ("8", False)])
def test_training_images_and_weights_follow_the_memory_format_policy(cifar, channels, expected):
    run = prepare_run(run_config(*TINY_CNN, "--out_channels", channels, "--augment"), cifar)
    formats = []

    def record_input_format(module, inputs):
        formats.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    run.model.register_forward_pre_hook(record_input_format)
    train_one_epoch(run, 1, 0)
    assert formats == [expected, expected]  # the augmented batches of both steps
    assert run.train.images.is_contiguous(memory_format=torch.channels_last) == expected
    assert run.model.stem[0][0].weight.is_contiguous(memory_format=torch.channels_last) == expected


def test_augmentation_changes_what_the_network_trains_on(cifar):
    """The first epoch's order is the same with and without --augment (crops and flips are drawn after it): only the
    augmentation can make the two runs differ."""
    plain, augmented = (prepare_run(run_config(*TINY_CNN, "--out_channels", "4", *flags), cifar)
                        for flags in ((), ("--augment",)))
    assert [b[1].tolist() for b in replay(plain.train)] == [b[1].tolist() for b in replay(augmented.train)]
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), augmented.model.parameters()))
    assert train_one_epoch(plain, 1, 0).loss != train_one_epoch(augmented, 1, 0).loss
    assert not all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), augmented.model.parameters()))


def test_channels_last_gives_the_same_loss_and_gradients():
    split = random_split(32, (3, 16, 16))
    torch.manual_seed(0)
    model = ResNet(3, 10, out_channels=16, num_levels=2, num_conv_per_level=2, residual_step=2)
    fast = ResNet(3, 10, out_channels=16, num_levels=2, num_conv_per_level=2, residual_step=2)
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    losses = []
    for net, images in ((model, split.images), (fast, split.images.contiguous(memory_format=torch.channels_last))):
        loss = F.cross_entropy(net(images), split.labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_amp_matches_float32_within_bfloat16_precision(cifar):
    """One epoch from the same initial weights and batches, with bfloat16 autocast and without."""
    config = run_config(*TINY_CNN, "--out_channels", "4", "--residual_step", "1")
    runs = [prepare_run(replace(config, amp=amp, precision=precision), cifar)  # whatever this CPU has
            for amp, precision in ((False, "float32"), (True, "bfloat16"))]
    assert all(torch.equal(p, q) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()))
    full, amp = (train_one_epoch(run, 1, 0) for run in runs)
    assert amp.loss == pytest.approx(full.loss, rel=5e-2)
    assert amp.loss != full.loss  # autocast really computed in bfloat16
    (full_val, _), (amp_val, _) = (evaluate(run.model, run.val, precision=run.config.precision) for run in runs)
    assert amp_val == pytest.approx(full_val, rel=5e-2)
