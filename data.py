"""MNIST and CIFAR-10 as tensors: read from disk once, split, normalised once, served in a seeded order by a
TrainLoader."""
from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils import existing_ancestor, first_line

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class DatasetError(ValueError):
    """Data that is missing, unreadable, or too small for the split asked for."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the normalisation need to know about a dataset."""
    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    num_train: int  # images in the official training set


DATASETS = {
    "MNIST": DatasetInfo(1, 28, (0.1307,), (0.3081,), tuple(str(d) for d in range(10)), 60000),
    "CIFAR10": DatasetInfo(3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"), 50000),
}

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)


@dataclass
class RawData:
    """A dataset as it is on disk: uint8 images (N, C, H, W) and int64 labels, train and test."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class Split:
    """Images and their labels: uint8 as stored on disk, or normalised on the training device (`normalized`)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def normalized(self, info: DatasetInfo, device: torch.device | str = "cpu", channels_last: bool = False) -> Split:
        """This split's uint8 images normalised with the dataset's mean and std, and its labels, on `device`."""
        return Split(normalize(self.images, info, device, channels_last), self.labels.to(device))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, refusing anything but plain numpy arrays, so a hostile file cannot run code."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("_codecs", "encode"): codecs.encode}  # how Python 3 writes bytes into a protocol-2 pickle

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self._allowed[module, name]


def read_cifar10_batches(folder: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `cifar-10-batches-py` pickles into uint8 (N, 3, 32, 32) images and int64 labels."""
    images, labels = [], []
    for name in files:
        try:
            with open(folder / name, "rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
            data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError) as e:
            raise DatasetError(f"cannot read CIFAR-10 batch {folder / name} ({first_line(e)}); delete the folder "
                               "and run again with --download to fetch a fresh copy") from None
        except KeyError as e:
            raise DatasetError(f"CIFAR-10 batch {folder / name} has no {e} entry; delete the folder and run again "
                               "with --download to fetch a fresh copy") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"CIFAR-10 batch {folder / name}: data of shape {data.shape} and type {data.dtype}, "
                               "not N x 3072 bytes; delete the folder and run again with --download")
        if batch_labels.dtype.kind not in "iu":
            raise DatasetError(f"CIFAR-10 batch {folder / name}: labels of type {batch_labels.dtype}, not integers; "
                               "delete the folder and run again with --download")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
        check_split(torch.from_numpy(images[-1]), torch.from_numpy(labels[-1]), DATASETS["CIFAR10"], folder / name)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def download_failure(error: Exception) -> str:
    """Why a download failed, in one line: torchvision's message names the file on its first line and the cause
    (no network, a refused connection) on its last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"[:300]


def check_split(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, source: Path) -> None:
    """Images (N, C, H, W) of the dataset's shape, N > 0, with one integer label each, a class of the dataset; or a
    DatasetError naming the file."""
    redo = "; delete it and run again with --download to fetch a fresh copy"
    shape = (info.in_channels, info.input_size, info.input_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape or not len(images):
        raise DatasetError(f"{source}: images of shape {tuple(images.shape)}, not N x {' x '.join(map(str, shape))} "
                           f"with N > 0{redo}")
    if labels.ndim != 1:
        raise DatasetError(f"{source}: labels of shape {tuple(labels.shape)}, not one per image{redo}")
    if len(labels) != len(images):
        raise DatasetError(f"{source}: {len(images)} images but {len(labels)} labels{redo}")
    outside = labels[(labels < 0) | (labels >= len(info.classes))]
    if len(outside):
        raise DatasetError(f"{source}: labels must be classes 0..{len(info.classes) - 1}, found {outside[0].item()}"
                           f"{redo}")


def download_into(folder: Path, fetch: Callable[[], object]) -> None:
    """Call `fetch`, which downloads into `folder`; when it fails, remove the folders it made that it left empty
    (a failed download writes nothing the user keeps) and raise its error."""
    existing = existing_ancestor(folder)
    try:
        fetch()
    except BaseException:
        while folder != existing and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
        raise


def load_cifar10(root: Path, download: bool) -> RawData:
    """CIFAR-10 from `<root>/cifar-10-batches-py`, downloaded through torchvision when missing."""
    folder = root / CIFAR10_FOLDER
    if not all((folder / f).is_file() for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
        hint = f"CIFAR-10 not found: expected {folder}/data_batch_1..5 and test_batch"
        if not download:
            raise DatasetError(f"{hint}; run without --no-download, or point --data_root at the folder "
                             f"that holds {CIFAR10_FOLDER}")
        import torchvision  # imported here only: it takes seconds to import and is needed only to download
        from torchvision.datasets.utils import download_and_extract_archive
        cifar = torchvision.datasets.CIFAR10
        try:
            download_into(root, lambda: download_and_extract_archive(cifar.url, str(root), filename=cifar.filename,
                                                                     md5=cifar.tgz_md5))
        except Exception as e:  # urllib, http and archive errors all mean the same thing to the user
            raise DatasetError(f"{hint}, and the download failed ({download_failure(e)}); download {cifar.url} and "
                             f"unpack it into {root}") from None
    return RawData(*read_cifar10_batches(folder, CIFAR10_TRAIN_FILES),
                   *read_cifar10_batches(folder, CIFAR10_TEST_FILES))


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> torch.Tensor:
    """Read an uncompressed IDX file (MNIST's format) of unsigned bytes into a uint8 tensor."""
    data = path.read_bytes()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes; delete it and run again with --download")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated inside its header ({len(data)} bytes); delete it and run again with "
                           "--download")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated ({body.size} bytes for shape {shape}); delete it and run again "
                         "with --download")
    return torch.from_numpy(body.reshape(shape).copy())


def load_mnist(root: Path, download: bool) -> RawData:
    """MNIST from `<root>/MNIST/raw` (torchvision's layout) as uint8 (N, 1, 28, 28) images,
    downloaded through torchvision when missing."""
    raw = root / "MNIST" / "raw"
    paths = [raw / name for pair in MNIST_FILES.values() for name in pair]
    if not all(p.is_file() for p in paths):
        hint = f"MNIST not found: expected {', '.join(p.name for p in paths)} in {raw}"
        if not download:
            raise DatasetError(f"{hint}; run without --no-download, or point --data_root at the folder "
                             "that holds MNIST/raw")
        import torchvision  # imported here only: it takes seconds to import and is needed only to download
        try:
            download_into(raw, lambda: [torchvision.datasets.MNIST(str(root), train=train, download=True)
                                        for train in (True, False)])
        except Exception as e:  # torchvision raises RuntimeError, URLError or OSError, all meaning "no data"
            raise DatasetError(f"{hint}, and the download failed ({download_failure(e)}); "
                             f"copy the four files there by hand") from None
    train_images, train_labels, test_images, test_labels = (read_idx(p) for p in paths)
    data = RawData(train_images.unsqueeze(1), train_labels.long(), test_images.unsqueeze(1), test_labels.long())
    for images, labels, (image_file, label_file) in ((data.train_images, data.train_labels, paths[:2]),
                                                     (data.test_images, data.test_labels, paths[2:])):
        check_split(images, labels, DATASETS["MNIST"], raw / f"{{{image_file.name},{label_file.name}}}")
    return data


def load_dataset(name: str, root: str | Path, download: bool) -> RawData:
    """Read a dataset's train and test splits from disk (downloading them first if allowed and needed)."""
    root = Path(root)
    if name == "MNIST":
        return load_mnist(root, download)
    if name == "CIFAR10":
        return load_cifar10(root, download)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def normalize(images: torch.Tensor, info: DatasetInfo, device: torch.device | str = "cpu",
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) images to float32 normalised with the dataset's mean and std, on `device`."""
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    x = (images.to(device).float().div_(255).sub_(mean).div_(std))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def check_split_sizes(n: int, val_size: int, limit_train: int | None) -> int:
    """The number of training images left for training by a validation split and a training limit that fit a
    training set of `n` images; a DatasetError when they do not fit."""
    if not 0 <= val_size < n:
        raise DatasetError(f"--val_size {val_size} must be between 0 and {n - 1} (the training set has {n} images)")
    if limit_train is not None and limit_train > n - val_size:
        raise DatasetError(f"--limit_train {limit_train} is larger than the training split "
                         f"({n - val_size} images after --val_size {val_size})")
    return n - val_size if limit_train is None else limit_train


def make_splits(raw: RawData, val_size: int, seed: int, limit_train: int | None) -> tuple[Split, Split, Split]:
    """Train, validation and test splits of uint8 images: `val_size` training images chosen by a seeded permutation
    are held out for validation; `limit_train` keeps the first N of the rest."""
    n = len(raw.train_labels)
    check_split_sizes(n, val_size, limit_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_index, train_index = perm[:val_size].sort().values, perm[val_size:].sort().values
    if limit_train is not None:
        train_index = train_index[:limit_train]
    return (Split(raw.train_images[train_index], raw.train_labels[train_index]),
            Split(raw.train_images[val_index], raw.train_labels[val_index]),
            Split(raw.test_images, raw.test_labels))


def num_batches(n: int, batch_size: int) -> int:
    """How many batches a TrainLoader makes of `n` images: a last batch of one image is dropped (batch norm cannot
    train on a single image; it is a different one each epoch)."""
    batches = -(-n // batch_size)
    return batches - 1 if batches > 1 and n % batch_size == 1 else batches


@dataclass(frozen=True)
class Shard:
    """This process's share of every global batch: under torchrun, every `world_size`-th image from the `rank`-th."""
    rank: int = 0
    world_size: int = 1


class TrainLoader:
    """A training split resident on its device, served in a seeded order: iterating it is one epoch of
    (images, labels) steps, each batch gathered by index, cropped and flipped as a whole when `augment_info` is given,
    and, under torchrun, cut to this rank's share (every `world_size`-th image of the global batch). Every rank
    draws the same global batch: one generator, seeded alike, gives the order and the augmentation."""

    def __init__(self, split: Split, batch_size: int, seed: int, augment_info: DatasetInfo | None = None,
                 shard: Shard = Shard()):
        self.images, self.labels = split.images, split.labels
        self.batch_size, self.augment_info, self.shard = batch_size, augment_info, shard
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Steps per epoch."""
        return num_batches(len(self.labels), self.batch_size)

    def batch_sizes(self) -> list[int]:
        """Each step's global batch size (all ranks together), without drawing from the generator."""
        sizes = [self.batch_size] * len(self)
        sizes[-1] = min(self.batch_size, len(self.labels) - (len(self) - 1) * self.batch_size)
        return sizes

    def epoch_indices(self) -> list[torch.Tensor]:
        """Draw the next epoch's order: its global batches of indices into the split."""
        return list(torch.randperm(len(self.labels), generator=self.generator).split(self.batch_size))[:len(self)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.epoch_indices():
            index = index.to(self.images.device, non_blocking=True)
            # indexing keeps the split's channels_last layout (index_select would return a contiguous NCHW batch)
            images, labels = self.images[index], self.labels.index_select(0, index)
            if self.augment_info is not None:
                images = augment(images, self.generator, self.augment_info)
            if self.shard.world_size > 1:
                share = slice(self.shard.rank, None, self.shard.world_size)
                images, labels = images[share], labels[share]
            yield images, labels

    def state_dict(self) -> torch.Tensor:
        """Where the order stands: the generator's state (the uint8 tensor checkpoints store under rng["data"])."""
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        """Continue the order from a `state_dict()`."""
        self.generator.set_state(state)


def augment(images: torch.Tensor, generator: torch.Generator, info: DatasetInfo, padding: int = 4) -> torch.Tensor:
    """Random crop after `padding` black pixels on each side, and random horizontal flip, on a whole batch."""
    n, c, h, w = images.shape
    device = images.device
    black = (-torch.tensor(info.mean) / torch.tensor(info.std)).to(device=device, dtype=images.dtype)
    padded = black.view(1, c, 1, 1).repeat(n, 1, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding:padding + h, padding:padding + w] = images
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator).to(device)
    flip = (torch.rand(n, 1, generator=generator) < 0.5).to(device)
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    crops = padded[torch.arange(n, device=device).view(n, 1, 1, 1), torch.arange(c, device=device).view(1, c, 1, 1),
                   rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and c > 1
    return crops.contiguous(memory_format=torch.channels_last) if channels_last else crops
