"""One training epoch, evaluation, and the per-step gradient-norm log."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data import Split, batch_indices
from utils import CLIError


class NonFiniteLoss(CLIError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochResult:
    """What one epoch of training produced: mean loss over samples and the logged gradient norms."""
    loss: float
    steps: int
    grad_norms: torch.Tensor  # (logged steps, logged weights), on the CPU
    grad_steps: list[int]


def logged_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight tensors whose gradient norms are logged: every parameter with more than one dimension."""
    return {name: p for name, p in model.named_parameters() if p.ndim > 1}


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, train: Split, batch_size: int,
                    generator: torch.Generator, epoch: int, start_step: int = 0, grad_log_every: int = 1,
                    augment_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                    amp: bool = False, progress: bool = True) -> EpochResult:
    """Train for one epoch over seeded shuffled batches; log each weight's gradient L2 norm every
    `grad_log_every` steps with one fused call, keeping everything on the device until the epoch ends."""
    model.train()
    device = train.images.device
    batches = batch_indices(len(train), batch_size, generator)
    weights = list(logged_weights(model).values())
    steps = range(start_step, start_step + len(batches))
    grad_steps = [s for s in steps if grad_log_every > 0 and s % grad_log_every == 0]
    grad_norms = torch.zeros(len(grad_steps), len(weights), device=device)
    losses = torch.zeros(len(batches), device=device)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float32)
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    row = 0
    for i, index in enumerate(bar):
        index = index.to(device, non_blocking=True)
        images, labels = train.images.index_select(0, index), train.labels.index_select(0, index)
        if augment_fn is not None:
            images = augment_fn(images, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if row < len(grad_steps) and grad_steps[row] == start_step + i:
            grad_norms[row] = torch.stack(torch._foreach_norm([w.grad for w in weights]))
            row += 1
        optimizer.step()
        losses[i] = loss.detach()
        if progress and i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise NonFiniteLoss(f"the training loss became {losses[bad[0, 0]].item()} at epoch {epoch}, "
                            f"step {start_step + bad[0, 0].item()}; lower --lr")
    mean_loss = (losses * sizes).sum().item() / sizes.sum().item()
    return EpochResult(mean_loss, len(batches), grad_norms.cpu(), grad_steps)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000, amp: bool = False) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy over every image of a split."""
    model.eval()
    device = split.images.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(split), batch_size):
        images, labels = split.images[start:start + batch_size], split.labels[start:start + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    return total_loss.item() / len(split), correct.item() / len(split)
