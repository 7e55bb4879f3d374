"""The training loop: gradient-norm log, full validation count, determinism, divergence."""
import pytest
import torch
import torch.nn.functional as F

from data import Split, batch_indices
from models import MLP, ResNet
from train import NonFiniteLoss, evaluate, logged_weights, train_one_epoch


def random_split(n: int, shape=(1, 28, 28), seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_grad_norms_equal_a_direct_computation():
    train = random_split(200)
    torch.manual_seed(0)
    model = MLP(784, 8, 4, 10, residual_step=2)
    reference = MLP(784, 8, 4, 10, residual_step=2)
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    result = train_one_epoch(model, optimizer, train, 64, torch.Generator().manual_seed(1), 1, progress=False)
    expected = []
    for index in batch_indices(200, 64, torch.Generator().manual_seed(1)):
        ref_optimizer.zero_grad()
        loss = F.cross_entropy(reference(train.images[index]), train.labels[index])
        loss.backward()
        expected.append([p.grad.norm().item() for p in logged_weights(reference).values()])
        ref_optimizer.step()
    assert result.grad_steps == [0, 1, 2, 3] and result.steps == 4
    assert result.grad_norms.shape == (4, 6)  # input, 4 hidden, head
    assert torch.allclose(result.grad_norms, torch.tensor(expected), rtol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_grad_log_every_and_off():
    train = random_split(300)
    model = MLP(784, 8, 2, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = train_one_epoch(model, optimizer, train, 32, torch.Generator().manual_seed(0), 2, start_step=10,
                             grad_log_every=4, progress=False)
    assert result.grad_steps == [12, 16]
    assert result.grad_norms.shape == (2, 4)
    off = train_one_epoch(model, optimizer, train, 32, torch.Generator(), 3, grad_log_every=0, progress=False)
    assert off.grad_steps == [] and off.grad_norms.shape == (0, 4)


def test_training_loss_is_the_mean_over_samples():
    train = random_split(130)
    model = MLP(784, 8, 1, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay, so losses can be recomputed
    result = train_one_epoch(model, optimizer, train, 100, torch.Generator().manual_seed(0), 1, progress=False)
    with torch.no_grad():
        expected = F.cross_entropy(model(train.images), train.labels).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)


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


def test_same_seed_same_history():
    def run(seed):
        train = random_split(256, (3, 12, 12))
        torch.manual_seed(seed)
        model = ResNet(3, 10, out_channels=4, num_levels=2, num_conv_per_level=2, residual_step=2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        results = [train_one_epoch(model, optimizer, train, 32, g, e, progress=False) for e in (1, 2)]
        return [r.loss for r in results], torch.cat([r.grad_norms for r in results])
    losses, norms = run(0)
    again, norms_again = run(0)
    assert losses == again and torch.equal(norms, norms_again)
    assert run(1)[0] != losses


def test_non_finite_loss_names_epoch_and_step():
    train = random_split(64)
    train.images[40] = float("nan")
    model = MLP(784, 8, 1, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLoss, match=r"epoch 3, step \d+"):
        train_one_epoch(model, optimizer, train, 16, torch.Generator().manual_seed(0), 3, progress=False)


def plain_steps(model, optimizer, split: Split, steps: int) -> list[float]:
    """The textbook loop: zero, forward, backward, step."""
    losses = []
    for index in batch_indices(len(split), 32, torch.Generator().manual_seed(0))[:steps]:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(split.images[index]), split.labels[index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_optimizer_steps_like_the_plain_one(name):
    """pipeline.py's fused optimizer gives the losses and weights of a plain for-loop optimizer."""
    import pipeline
    split = random_split(128)
    torch.manual_seed(0)
    fast, plain = MLP(784, 8, 2, 10, residual_step=2), MLP(784, 8, 2, 10, residual_step=2)
    plain.load_state_dict(fast.state_dict())
    config = {"optimizer": name, "lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}
    reference = (torch.optim.Adam(plain.parameters(), lr=1e-2, weight_decay=1e-4, foreach=False) if name == "adam"
                 else torch.optim.SGD(plain.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4, foreach=False))
    fast_losses = plain_steps(fast, pipeline.build_optimizer(fast, config), split, 4)
    assert fast_losses == pytest.approx(plain_steps(plain, reference, split, 4), rel=1e-5)
    for p, q in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


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


def test_amp_trains_on_cpu():
    train = random_split(64, (3, 16, 16))
    model = ResNet(3, 10, out_channels=16, num_levels=2, num_conv_per_level=1, residual_step=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    result = train_one_epoch(model, optimizer, train, 32, torch.Generator().manual_seed(0), 1, amp=True,
                             progress=False)
    assert torch.isfinite(torch.tensor(result.loss)) and result.grad_norms.shape[0] == 2
    loss, acc = evaluate(model, train, amp=True)
    assert loss > 0 and 0 <= acc <= 1
