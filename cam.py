"""Class activation maps (Zhou et al. 2016): where a trained CNN looked when it chose a class.

    python cam.py --checkpoint runs/<run>/checkpoint.pt --num_images_to_save 8 --out_dir img_show/cam
    python cam.py --checkpoint runs/<run>/checkpoint.pt --indices 0 1 3 6 --class true
    python cam.py --checkpoint runs/<run>/checkpoint.pt --image photos/cat.jpg --label cat --out_dir img_show/cam

For a network that ends in global average pooling and one linear layer, the logit of class c is
y_c = sum_k w_k^c mean_xy A_k(x, y) + b_c, so the map M_c = sum_k w_k^c A_k over the last feature map A says how
much each position contributed to y_c: its spatial mean plus the bias is exactly the logit.
"""
from __future__ import annotations

import argparse
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

import faithfulness
from data import DATASETS, DatasetError, DatasetInfo, load_dataset, normalize
from models import MLP
from plots import savefig
from runs import CheckpointError, load_checkpoint, model_of, unfinished
from utils import (ArgumentParser, UsageError, atomic_write, check_writable, first_line, name_problem,
                   remove_leftovers, resolve_device, run_cli, write_json)

MAX_PIXELS = 50_000_000  # a bigger photo would need several GB for its float map and overlay
MAX_IMAGES = 100  # the grid has one row per image
MAX_DISPLAY_SCALE = 16  # a 32 x 32 test image shown 512 x 512; 2000 would ask for a 12 GB array
LABEL_BYTES = 150  # a photo's label, in the names of the files written for it, which must fit in 255 bytes
RANDOM_MAP_SEED = 0  # of the random baseline maps of --faithfulness
KINDS = ("orig", "actv_map", "mix")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# what each mode explains, and the flags that choose what it explains or how it draws it; the others (the data, the
# device, the batch size, the output folder) are accepted in every mode, so that one set serves all three commands
MODES = {"faithfulness": ("--faithfulness measures the maps of the first N test images", {"faithfulness", "target"}),
         "image": ("--image explains one photo", {"image", "label", "target", "alpha"}),
         "indices": ("--indices explains these test images", {"indices", "target", "alpha", "display_scale"}),
         "num_images_to_save": ("without --image, --indices or --faithfulness, cam.py explains the first "
                                "--num_images_to_save test images", {"num_images_to_save", "target", "alpha",
                                                                     "display_scale"})}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The CAM tool's flags; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = ArgumentParser(description="Class activation maps of a trained CNN, for test images or a photo.",
                            add_help=add_help)

    parser.add("--checkpoint", "--saved_model", "--saved-model", required=True,
               help="checkpoint.pt written by pipeline.py, of a ResNet (CAM needs GAP + one linear layer) "
             "(default: none, required)")
    parser.add("--data_root", default="data", help="folder holding MNIST/raw and cifar-10-batches-py")
    parser.add("--download", action=argparse.BooleanOptionalAction, default=True,
               help="download the dataset through torchvision when it is missing")
    parser.add("--indices", type=int, nargs="+", default=None, metavar="INDEX",
               help="test-set images to explain (default: the first --num_images_to_save)")
    parser.add("--num_images_to_save", type=int, default=8,
               help="explain the first N test images when --indices is not given")
    parser.add("--image", default=None,
               help=f"explain this JPEG/PNG instead of test images (at most {MAX_PIXELS:,} pixels; transparency is "
             "composited on white; squashed to the training resolution for the model) (default: none)")
    parser.add("--label", default=None, help="true class of --image, used in file names (default: the photo's file "
               "name) and by --class true")
    parser.add("--class", dest="target", default="pred", metavar="CLASS",
               help="class whose map is drawn: pred (each image's prediction), true (its label), or a class index "
                    "or name")
    parser.add("--alpha", type=float, default=0.5, help="weight of the coloured map in the overlay (0 = image only)")
    parser.add("--display_scale", type=int, default=8,
               help=f"test images are saved this many times larger (pixels repeated, map upsampled smoothly), "
                    f"1 to {MAX_DISPLAY_SCALE}")
    parser.add("--faithfulness", type=int, default=None, metavar="N",
               help="instead of drawing maps, measure how faithful the maps of the first N test images are: "
                    "deletion and insertion AUC, Average Drop and Increase in Confidence, beside a random and a "
                    "centred Gaussian map; prints the table, writes faithfulness.json and faithfulness_curves.png "
                    "(default: off)")
    parser.add("--batch_size", type=int, default=128, help="images per forward pass")
    parser.add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add("--out_dir", default="runs/cam", help="folder for the PNGs")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject bad flag values before anything is loaded."""
    for flag in ("num_images_to_save", "batch_size"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if not 1 <= args.display_scale <= MAX_DISPLAY_SCALE:
        raise UsageError(f"--display_scale must be between 1 and {MAX_DISPLAY_SCALE} (a 32 x 32 test image is then "
                         f"{32 * MAX_DISPLAY_SCALE} x {32 * MAX_DISPLAY_SCALE} pixels), got {args.display_scale}")
    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.faithfulness is not None and args.faithfulness <= 0:
        raise UsageError(f"--faithfulness must be a positive number of test images, got {args.faithfulness}")
    mode = next((name for name in MODES if getattr(args, name) is not None), "num_images_to_save")
    what, reads = MODES[mode]
    ignored = get_args_parser().given_flags(args, set().union(*(flags for _, flags in MODES.values())) - reads)
    if ignored:
        raise UsageError(f"{what}: it does not use {', '.join(ignored)}; leave {'it' if len(ignored) == 1 else 'them'}"
                         " out")
    if args.image is not None:
        flag, label = (("--label", args.label) if args.label is not None
                       else ("--image's file name", Path(args.image).stem))
        if problem := name_problem(label, LABEL_BYTES):
            raise UsageError(f"{flag} {label[:80]!r} {problem}; it names the files written for the photo"
                             + ("" if args.label is not None else ": give a --label"))
    count = len(args.indices) if args.indices is not None else args.num_images_to_save
    if args.image is None and count > MAX_IMAGES:
        raise UsageError(f"at most {MAX_IMAGES} test images per run (the grid has a row per image), got {count}")
    check_writable(Path(args.out_dir), "--out_dir")


def check_cam_model(model: nn.Module, path: str | Path) -> None:
    """CAM needs `forward_features` (the last feature map) followed by GAP and one linear layer `fc`."""
    if not (callable(getattr(model, "forward_features", None)) and isinstance(getattr(model, "fc", None), nn.Linear)
            and isinstance(getattr(model, "pool", None), nn.AdaptiveAvgPool2d)):
        what = "an MLP" if isinstance(model, MLP) else f"a {type(model).__name__}"
        raise UsageError(f"CAM needs a convolutional network ending in global average pooling and one linear "
                         f"layer; {path} holds {what}")


@torch.no_grad()
def class_activation_maps(model: nn.Module, images: torch.Tensor,
                          classes: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps M_c = sum_k w_k^c A_k, (N, h, w), for one class per image (None: its prediction), and the logits.

    The maps are neither normalised nor upsampled; put the model in eval mode first.
    """
    features = model.forward_features(images)
    logits = model.forward_head(features)
    classes = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=logits.device)
    weights = model.fc.weight[classes].to(features.dtype)
    return torch.einsum("nk,nkhw->nhw", weights, features), logits


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (N, h, w) maps to (N, *size)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of (N, H, W) to [0, 1]; a constant map becomes zeros."""
    low = maps.amin((1, 2), keepdim=True)
    span = maps.amax((1, 2), keepdim=True) - low
    return (maps - low) / torch.where(span > 0, span, torch.ones_like(span))


def colorize(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps in [0, 1] to uint8 RGB heatmaps (N, H, W, 3) with matplotlib's jet colormap."""
    import matplotlib
    rgba = matplotlib.colormaps["jet"](maps.cpu().numpy(), bytes=True)
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3]))


def overlay(images: torch.Tensor, heatmaps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Blend uint8 RGB heatmaps over uint8 RGB images (both (N, H, W, 3)): alpha * heatmap + (1 - alpha) * image."""
    blend = heatmaps.float().mul_(alpha).add_(images.float().mul_(1 - alpha))
    return blend.round_().clamp_(0, 255).to(torch.uint8)


def render(images: torch.Tensor, maps: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps and overlays for uint8 RGB images (N, H, W, 3): each raw map upsampled to H x W and normalised."""
    heatmaps = colorize(normalize_maps(upsample(maps.cpu(), tuple(images.shape[1:3]))))
    return heatmaps, overlay(images, heatmaps, alpha)


def to_display(images: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (N, C, H, W) images to uint8 RGB (N, H * scale, W * scale, 3), each pixel repeated scale x scale."""
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    return rgb.permute(0, 2, 3, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2).contiguous()


def class_name(index: int, info: DatasetInfo) -> str:
    """A class's name, or its index for classes beyond the dataset's (a model with extra outputs)."""
    return info.classes[index] if index < len(info.classes) else str(index)


def parse_target(target: str, info: DatasetInfo, num_classes: int) -> int | str:
    """--class: "pred", "true", or a class index in range or a class name, as an index."""
    if target in ("pred", "true"):
        return target
    if target in info.classes:
        return info.classes.index(target)
    if re.fullmatch(r"\d+", target) and int(target) < num_classes:
        return int(target)
    raise UsageError(f"--class {target!r} is not pred, true, a class index below {num_classes} or one of "
                     f"{', '.join(info.classes)}")


def target_classes(target: int | str, labels: torch.Tensor) -> torch.Tensor | None:
    """The class whose map is drawn for each image: None (its prediction), its label, or one fixed class."""
    if target == "pred":
        return None
    if target == "true":
        return labels
    return torch.full_like(labels, target)


def safe_name(text: str) -> str:
    """A label usable inside a file name: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    return re.sub(r"[^\w.-]", "_", text)


def map_suffix(shown: str, pred: str) -> str:
    """The end of a file name, before .png: the lab's names say nothing of whose map is drawn, which is the
    prediction's unless --class chose another class; then "_map_<class>", so that the two never share a file."""
    return "" if shown == pred else f"_map_{shown}"


def save_png(path: Path, rgb: torch.Tensor) -> None:
    """Save a uint8 (H, W, 3) RGB tensor as a PNG, atomically."""
    image = Image.fromarray(np.ascontiguousarray(rgb.numpy()), "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def load_photo(path: str | Path, in_channels: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read a JPEG/PNG upright as RGB (in_channels 3) or L (1): transparency on white, 16-bit scaled to 8."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--image {path}: {'a folder, not an image file' if path.is_dir() else 'no such file'}")
    too_big = UsageError(f"--image {path} has more than {max_pixels:,} pixels; shrink it first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit, as an error
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    raise too_big
                image = ImageOps.exif_transpose(image)  # upright, as viewers show it; also decodes the pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_big from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"--image {path}: cannot read it as an image ({first_line(e)})") from None
    return convert_photo(image, "RGB" if in_channels == 3 else "L")


def convert_photo(image: Image.Image, mode: str) -> Image.Image:
    """Any PIL image as RGB or L: 16-bit grey scaled (PIL would clip it), transparency composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert(mode)


def photo_tensor(photo: Image.Image) -> torch.Tensor:
    """An RGB or L PIL image as a uint8 (1, C, H, W) tensor."""
    array = np.asarray(photo)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)[None]


def plot_cam_grid(rows: list[tuple[torch.Tensor, ...]], titles: list[list[str]], path: Path) -> None:
    """One row per image: the image, its map and the overlay, each with its title."""
    from matplotlib.figure import Figure  # no pyplot: the figure renders with Agg whatever the backend
    fig = Figure(figsize=(4.2, 1.6 * len(rows)))
    for ax_row, images, row_titles in zip(fig.subplots(len(rows), 3, squeeze=False), rows, titles):
        for ax, image, title in zip(ax_row, images, row_titles):
            ax.imshow(image.numpy())
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    savefig(fig, path)


def explain_test_images(args: argparse.Namespace, model: nn.Module, info: DatasetInfo, dataset: str,
                        target: int | str, device: torch.device) -> list[Path]:
    """CAMs of test-set images: three PNGs per image and cam_grid.png; return the files written."""
    raw = load_dataset(dataset, args.data_root, args.download)
    n = len(raw.test_labels)
    indices = list(dict.fromkeys(args.indices)) if args.indices is not None else list(range(args.num_images_to_save))
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UsageError(f"--indices {' '.join(map(str, bad))}: the {dataset} test set has images 0 to {n - 1}")
    if args.indices is None and args.num_images_to_save > n:
        raise UsageError(f"--num_images_to_save {args.num_images_to_save}: the {dataset} test set has {n} images")
    images, labels = raw.test_images[indices], raw.test_labels[indices]
    classes = target_classes(target, labels)
    maps, logits = [], []
    for start in range(0, len(indices), args.batch_size):
        stop = start + args.batch_size
        batch_classes = None if classes is None else classes[start:stop].to(device)
        batch_maps, batch_logits = class_activation_maps(model, normalize(images[start:stop], info, device),
                                                         batch_classes)
        maps.append(batch_maps.cpu())
        logits.append(batch_logits.cpu())
    probabilities, predictions = torch.cat(logits).softmax(1).max(1)
    classes = predictions if classes is None else classes
    display = to_display(images, args.display_scale)
    heatmaps, mixes = render(display, torch.cat(maps), args.alpha)
    out_dir = Path(args.out_dir)
    written, titles = [], []
    for row, i in enumerate(indices):
        true, pred = class_name(labels[row].item(), info), class_name(predictions[row].item(), info)
        shown = class_name(classes[row].item(), info)
        for kind, image in zip(KINDS, (display[row], heatmaps[row], mixes[row])):
            written.append(out_dir / f"{i}_{kind}_{true}_p_{pred}_{i}{map_suffix(shown, pred)}.png")
            save_png(written[-1], image)
        titles.append([f"#{i} true: {true}\npred: {pred} ({probabilities[row]:.0%})", f"map of {shown}", "overlay"])
        print(f"test image {i}: true {true}, predicted {pred} ({probabilities[row]:.1%}), map of {shown}")
    grid = "" if target == "pred" else f"_map_{target if target == 'true' else class_name(target, info)}"
    written.append(out_dir / f"cam_grid{grid}.png")  # a grid of other maps never replaces the predictions' grid
    plot_cam_grid(list(zip(display, heatmaps, mixes)), titles, written[-1])
    return written


def explain_photo(args: argparse.Namespace, model: nn.Module, info: DatasetInfo, input_size: int,
                  target: int | str, device: torch.device) -> list[Path]:
    """CAM of one photo, computed at the training resolution and drawn at the photo's own; return the files."""
    if target == "true" and args.label not in info.classes:
        raise UsageError(f"--class true needs --label to be one of {', '.join(info.classes)}"
                         + (f", got {args.label!r}" if args.label is not None else ""))
    photo = load_photo(args.image, info.in_channels)
    small = photo.resize((input_size, input_size), Image.Resampling.BILINEAR)
    classes = None if target == "pred" else torch.tensor(
        [info.classes.index(args.label) if target == "true" else target], device=device)
    maps, logits = class_activation_maps(model, normalize(photo_tensor(small), info, device), classes)
    probability, prediction = logits.softmax(1).max(1)
    pred = class_name(prediction.item(), info)
    shown = class_name((prediction if classes is None else classes).item(), info)
    original = photo_tensor(photo.convert("RGB")).permute(0, 2, 3, 1)
    heatmaps, mixes = render(original, maps, args.alpha)
    written = []
    label = safe_name(Path(args.image).stem if args.label is None else args.label)
    for kind, image in zip(KINDS, (original[0], heatmaps[0], mixes[0])):
        written.append(Path(args.out_dir) / f"single_{kind}_{label}_p_{pred}{map_suffix(shown, pred)}.png")
        save_png(written[-1], image)
    print(f"{args.image}: predicted {pred} ({probability.item():.1%}), map of {shown}")
    return written


def evaluate_faithfulness(args: argparse.Namespace, model: nn.Module, info: DatasetInfo, dataset: str,
                          target: int | str, device: torch.device) -> list[Path]:
    """Deletion, insertion, Average Drop and Increase in Confidence of the CAMs of the first --faithfulness test
    images beside a random map (seeded, drawn at the CAM's resolution and upsampled like it) and a centred Gaussian
    map; print the table, write faithfulness.json and faithfulness_curves.png; return the files written."""
    raw = load_dataset(dataset, args.data_root, args.download)
    count, available = args.faithfulness, len(raw.test_labels)
    if count > available:
        raise UsageError(f"--faithfulness {count}: the {dataset} test set has {available} images")
    images, labels = raw.test_images[:count], raw.test_labels[:count]
    classes = target_classes(target, labels)
    size = tuple(images.shape[-2:])
    centre = normalize_maps(faithfulness.centred_gaussian(size)[None]).to(device)
    generator = torch.Generator().manual_seed(RANDOM_MAP_SEED)
    model.to(memory_format=torch.channels_last)  # 130 forward passes per image: channels_last saves ~20% on a CPU
    started, batches = time.perf_counter(), []
    for start in range(0, count, args.batch_size):
        batch = normalize(images[start:start + args.batch_size], info, device)
        batch_classes = None if classes is None else classes[start:start + args.batch_size].to(device)
        cams, logits = class_activation_maps(model, batch, batch_classes)
        coarse = {"cam": cams, "random": torch.rand(cams.shape, generator=generator).to(device)}
        maps = {name: normalize_maps(upsample(m, size)) for name, m in coarse.items()}
        maps["centre"] = centre.expand(len(batch), -1, -1)
        explained = logits.argmax(1) if batch_classes is None else batch_classes
        batches.append(faithfulness.evaluate(model, batch, explained, maps, args.batch_size))
    elapsed = time.perf_counter() - started
    summary = faithfulness.summarize(faithfulness.concat(batches))
    fractions = faithfulness.step_fractions(size[0] * size[1]).tolist()
    record = {"checkpoint": str(args.checkpoint), "dataset": dataset, "num_images": count, "class": args.target,
              "protocol": faithfulness.protocol(min(size), RANDOM_MAP_SEED), "seconds": round(elapsed, 1),
              "fractions": fractions, "maps": summary}
    out_dir = Path(args.out_dir)
    written = [out_dir / "faithfulness.json", out_dir / "faithfulness_curves.png"]
    write_json(written[0], record)
    faithfulness.plot_curves(summary, fractions, f"{count} {dataset} test images", written[1])
    shown = {"pred": "predicted class", "true": "true class"}.get(target) or f"class {class_name(target, info)}"
    print(f"faithfulness of the maps of the {shown}, first {count} {dataset} test images ({elapsed:.0f} s; "
          "AUC ± its standard error):")
    print(faithfulness.format_table(summary))
    return written


def main(args: argparse.Namespace) -> list[Path]:
    """Load the checkpoint's model; write the CAM PNGs of test images or a photo, or measure the maps' faithfulness;
    return the files written."""
    try:
        return explain(args)
    except (CheckpointError, DatasetError) as e:
        raise UsageError(str(e)) from None


@torch.no_grad()
def explain(args: argparse.Namespace) -> list[Path]:
    """main() without the translation of library errors into CLI messages."""
    check_args(args)
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint)
    config, model = model_of(checkpoint, args.checkpoint)
    check_cam_model(model, args.checkpoint)
    state = unfinished(checkpoint, config)
    if state:
        print(f"note: {args.checkpoint} is the model of {config.run_name}, {state}")
    model.to(device).eval()
    remove_leftovers(Path(args.out_dir))  # of an earlier cam.py killed mid-write
    info = DATASETS[config.dataset]
    target = parse_target(args.target, info, model.fc.out_features)
    if args.faithfulness is not None:
        written = evaluate_faithfulness(args, model, info, config.dataset, target, device)
    elif args.image is not None:
        written = explain_photo(args, model, info, config.input_size, target, device)
    else:
        written = explain_test_images(args, model, info, config.dataset, target, device)
    print(f"wrote {len(written)} files to {args.out_dir}")
    return written


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
