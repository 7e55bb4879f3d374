"""How faithful is a saliency map to the model it explains: deletion and insertion (Petsiuk et al. 2018, RISE) and
Average Drop / Increase in Confidence (Chattopadhay et al. 2018, Grad-CAM++), on normalised image tensors.

Every metric reads the softmax probability of one class per image. Deletion replaces the pixels a map ranks highest
by the dataset's mean colour (0 after normalisation), 5% of the pixels more at each step; insertion starts from a
blurred copy of the image and puts the original pixels back in the same order. A faithful map makes the deletion
curve fall fast (low area) and the insertion curve rise fast (high area). Average Drop is the mean relative loss of
probability when the image is multiplied by its map scaled to [0, 1] (0 again the mean colour); Increase in
Confidence is the share of images whose probability rises instead.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from plots import new_figure, savefig

STEP = 0.05  # share of the pixels deleted or inserted per step
BLUR_SIGMA = 1 / 16  # of the image side: 2 pixels on a 32 x 32 image
CENTRE_SIGMA = 1 / 4  # of the image side, for the centred Gaussian baseline map
MAP_LABELS = {"cam": "CAM", "random": "random", "centre": "centred Gaussian"}


def protocol(side: int, random_seed: int) -> dict[str, str]:
    """What each number measures, for an image whose shorter side is `side` pixels: written beside the results."""
    return {
        "score": "softmax probability of the explained class",
        "step": f"{STEP:.0%} of the pixels, all channels of a pixel together, best-ranked first",
        "deletion": "pixels replaced by the dataset's mean colour (0 after normalisation)",
        "insertion": f"original pixels put back into the image blurred by a Gaussian of std {BLUR_SIGMA * side:g} px",
        "auc": "trapezoid rule over the share of pixels perturbed, 0 to 1",
        "average_drop": "mean of max(0, p - p_masked) / p in %, p_masked on the normalised image times the map "
                        "scaled to [0, 1] (0 = the mean colour)",
        "increase_in_confidence": "share of images with p_masked > p, in %",
        "random_map": f"uniform noise at the CAM's resolution, seed {random_seed}, upsampled like the CAM",
        "centre_map": f"Gaussian of std {CENTRE_SIGMA * side:g} px on the image centre"}


def step_counts(num_pixels: int) -> torch.Tensor:
    """How many pixels are perturbed at each step: 0, 5%, ..., 100% of `num_pixels`, rounded."""
    steps = round(1 / STEP)
    return torch.round(torch.arange(steps + 1, dtype=torch.float64) * num_pixels / steps).long()


def step_fractions(num_pixels: int) -> torch.Tensor:
    """The share of the pixels perturbed at each step (float64), from 0 to 1: the x axis of the curves."""
    counts = step_counts(num_pixels)
    return counts.double() / counts[-1]


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps to (N, H * W) ranks: 0 for each map's highest pixel; ties go in raster order."""
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def centred_gaussian(size: tuple[int, int], sigma: float = CENTRE_SIGMA) -> torch.Tensor:
    """An (H, W) Gaussian bump on the image centre with std `sigma` times the shorter side: the centre prior."""
    height, width = size
    y = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    x = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    spread = sigma * min(height, width)
    return torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * spread ** 2))


def blur(images: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W) images with std `sigma` times the shorter side (kernel cut at 3 std)."""
    std = sigma * min(images.shape[-2:])
    size = 2 * math.ceil(3 * std) + 1
    # imported here only: importing torchvision takes 1.5 s (it loads torch._dynamo), which report.py and cam.py
    # without --faithfulness would pay for nothing
    from torchvision.transforms.v2.functional import gaussian_blur
    return gaussian_blur(images, [size, size], [std, std])


def class_probabilities(model: nn.Module, images: torch.Tensor, classes: torch.Tensor,
                        batch_size: int) -> torch.Tensor:
    """Softmax probability of `classes[i]` for `images[i]`, `batch_size` images per forward pass."""
    return torch.cat([model(images[i:i + batch_size]).float().softmax(1)
                      .gather(1, classes[i:i + batch_size, None])[:, 0] for i in range(0, len(images), batch_size)])


def reveal_curves(model: nn.Module, start: torch.Tensor, end: torch.Tensor, classes: torch.Tensor,
                  ranks: torch.Tensor, counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, S) class probabilities as the pixels of `end` replace those of `start` in rank order: at step s the
    `counts[s]` best-ranked pixels come from `end`, the rest from `start` (all channels of a pixel together)."""
    n, steps = len(start), len(counts)
    masks = (ranks[:, None, :] < counts.to(ranks.device)[None, :, None]).view(n, steps, 1, *start.shape[-2:])
    inputs = torch.where(masks, end[:, None], start[:, None]).flatten(0, 1)
    return class_probabilities(model, inputs, classes.repeat_interleave(steps), batch_size).view(n, steps)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, maps: dict[str, torch.Tensor],
             batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per-image results of each map for normalised (N, C, H, W) images, one class each, maps (N, H, W) in [0, 1]:
    deletion and insertion curves (N, S) and their areas, Average Drop (relative, 0 to 1) and whether the
    probability increased, all on the CPU."""
    num_pixels = images.shape[-2] * images.shape[-1]
    counts, fractions = step_counts(num_pixels), step_fractions(num_pixels).to(images.device)
    mean_colour, blurred = torch.zeros_like(images), blur(images)
    original = class_probabilities(model, images, classes, batch_size)
    results = {}
    for name, saliency in maps.items():
        ranks = pixel_ranks(saliency)
        deletion = reveal_curves(model, images, mean_colour, classes, ranks, counts, batch_size)
        insertion = reveal_curves(model, blurred, images, classes, ranks, counts, batch_size)
        masked = class_probabilities(model, images * saliency[:, None], classes, batch_size)
        results[name] = {
            "deletion": deletion, "insertion": insertion,
            "deletion_auc": torch.trapezoid(deletion.double(), fractions, dim=1),
            "insertion_auc": torch.trapezoid(insertion.double(), fractions, dim=1),
            # a chosen class (--class) can have probability 0 in float32: no drop then, not 0 / 0
            "drop": (original - masked).clamp(min=0) / original.clamp(min=torch.finfo(original.dtype).tiny),
            "increase": masked > original}
    return {name: {key: value.cpu() for key, value in result.items()} for name, result in results.items()}


def concat(batches: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """Join the per-image results of several `evaluate` calls."""
    return {name: {key: torch.cat([batch[name][key] for batch in batches]) for key in batches[0][name]}
            for name in batches[0]}


def summarize(results: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Means over the images (AUCs with their standard error, Average Drop and Increase in Confidence in %) and the
    mean curves, per map."""
    def mean_and_sem(values: torch.Tensor) -> tuple[float, float | None]:
        sem = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else None  # undefined for one image
        return values.mean().item(), sem

    summary = {}
    for name, result in results.items():
        (deletion, deletion_sem), (insertion, insertion_sem) = (mean_and_sem(result[key].double())
                                                                for key in ("deletion_auc", "insertion_auc"))
        summary[name] = {
            "label": MAP_LABELS.get(name, name), "deletion_auc": deletion, "deletion_auc_sem": deletion_sem,
            "insertion_auc": insertion, "insertion_auc_sem": insertion_sem,
            "average_drop_percent": 100 * result["drop"].double().mean().item(),
            "increase_in_confidence_percent": 100 * result["increase"].double().mean().item(),
            "deletion_curve": result["deletion"].double().mean(0).tolist(),
            "insertion_curve": result["insertion"].double().mean(0).tolist()}
    return summary


def record_problem(record) -> str | None:
    """What makes `record` not a faithfulness.json that cam.py --faithfulness writes (the fields report.py reads, each
    of its type and in its range), or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [key for key in ("checkpoint", "dataset", "class", "num_images", "maps") if key not in record]
    if missing:
        return f"no {', '.join(missing)}"
    if not (isinstance(record["num_images"], int) and record["num_images"] > 0):
        return f"num_images {record['num_images']!r} is not a positive integer"
    if not all(isinstance(record[key], str) for key in ("checkpoint", "dataset", "class")):
        return "checkpoint, dataset and class are not strings"
    if not isinstance(record["maps"], dict) or not record["maps"]:
        return "it measured no map"
    bounds = {"deletion_auc": 1, "deletion_auc_sem": 1, "insertion_auc": 1, "insertion_auc_sem": 1,
              "average_drop_percent": 100, "increase_in_confidence_percent": 100}
    for name, row in record["maps"].items():
        if not isinstance(row, dict) or not isinstance(row.get("label"), str):
            return f"map {name!r} is not an object with a label"
        for key, high in bounds.items():
            value = row.get(key)
            if value is None and key.endswith("_sem") and key in row:
                continue  # the standard error of a single image
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                return f"map {name!r}: {key} {value!r} is not a number from 0 to {high}"
    labels = [row["label"] for row in record["maps"].values()]
    if len(set(labels)) < len(labels):
        return "two maps share a label"
    return None


def format_table(summary: dict[str, dict]) -> str:
    """The summary as a Markdown table, one row per map."""
    lines = ["| map | deletion AUC (lower is better) | insertion AUC (higher is better) | Average Drop (lower is "
             "better) | Increase in Confidence (higher is better) |", "|---|---|---|---|---|"]
    def with_sem(row: dict, key: str) -> str:
        sem = row[f"{key}_sem"]
        return f"{row[key]:.3f} ± {'n/a' if sem is None else f'{sem:.3f}'}"

    for row in summary.values():
        lines.append(f"| {row['label']} | {with_sem(row, 'deletion_auc')} | {with_sem(row, 'insertion_auc')} | "
                     f"{row['average_drop_percent']:.1f}% | {row['increase_in_confidence_percent']:.1f}% |")
    return "\n".join(lines)


def plot_curves(summary: dict[str, dict], fractions: list[float], title: str, path: str | Path) -> None:
    """Mean deletion and insertion curves, one line per map, its area in the legend."""
    fig, axes = new_figure(2, panel_size=(5, 4.2))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for row in summary.values():
            ax.plot(fractions, row[f"{kind}_curve"], marker="o", markersize=2.5,
                    label=f"{row['label']} (AUC {row[f'{kind}_auc']:.3f})")
        how = "deleted to the mean colour" if kind == "deletion" else "inserted into the blurred image"
        ax.set(xlabel=f"share of pixels {how}", title=kind, xlim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean probability of the explained class")
    fig.suptitle(f"{title}: pixels perturbed in the order each map ranks them, best first")
    savefig(fig, path)
