"""Loading the official formats, splits, the training loader's batches and batch-level augmentation."""
import dataclasses
import pickle

import pytest
import torch

import data
from conftest import SHARED_DATASETS, write_cifar10, write_mnist
from data import DATASETS, DatasetError, Shard, Split, TrainLoader, augment, load_dataset, make_splits, normalize


def test_mnist_loads_from_idx_files(mnist_root):
    raw = load_dataset("MNIST", mnist_root, download=False)
    assert raw.train_images.shape == (600, 1, 28, 28) and raw.train_images.dtype == torch.uint8
    assert raw.test_images.shape == (200, 1, 28, 28) and raw.test_labels.dtype == torch.int64


def test_cifar_loads_from_pickles(cifar_root):
    raw = load_dataset("CIFAR10", cifar_root, download=False)
    assert raw.train_images.shape == (500, 3, 32, 32) and raw.test_images.shape == (100, 3, 32, 32)
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    first = torch.from_numpy(batch[b"data"][0].reshape(3, 32, 32))
    assert torch.equal(raw.train_images[100], first)  # batch order and channel-first layout kept
    assert raw.train_labels[100] == batch[b"labels"][0]


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    root = write_cifar10(tmp_path, n_per_batch=4, n_test=4)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("CIFAR10", root, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("name,expected", [("MNIST", "MNIST/raw"), ("CIFAR10", "cifar-10-batches-py")])
def test_missing_data_without_download_says_where(tmp_path, name, expected):
    with pytest.raises(DatasetError, match=expected):
        load_dataset(name, tmp_path / "nowhere", download=False)


@pytest.mark.parametrize("name", ["MNIST", "CIFAR10"])
def test_a_failed_download_is_one_line_and_leaves_no_folder_behind(tmp_path, monkeypatch, name):
    """torchvision's own download, from a server that refuses the connection (nothing listens on port 9 here)."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetError, match="and the download failed") as failed:
        load_dataset(name, tmp_path / "mine" / "data", download=True)
    assert not list((tmp_path / "mine").iterdir())
    assert "refused" in str(failed.value)  # the cause, which MNIST's message gives on its last line, not its first


def test_truncated_idx_file_is_a_usage_error(tmp_path):
    root = write_mnist(tmp_path, n_train=20, n_test=10)
    path = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("MNIST", root, download=False)


def normalized_splits(raw, val_size: int, seed: int, limit_train: int | None) -> list[Split]:
    """make_splits' three splits, normalised as MNIST on the CPU."""
    return [split.normalized(DATASETS["MNIST"]) for split in make_splits(raw, val_size, seed, limit_train)]


def test_splits_are_seeded_disjoint_and_complete(mnist_root):
    raw = load_dataset("MNIST", mnist_root, download=False)
    info = DATASETS["MNIST"]
    train, val, test = normalized_splits(raw, 100, 0, None)
    assert (len(train), len(val), len(test)) == (500, 100, 200)
    train2, val2, _ = normalized_splits(raw, 100, 0, None)
    assert torch.equal(val.images, val2.images)
    _, val3, _ = normalized_splits(raw, 100, 1, None)
    assert not torch.equal(val.images, val3.images)
    # labelled with their indices, the training images show where each one went: to train or to val, never both
    numbered = dataclasses.replace(raw, train_labels=torch.arange(len(raw.train_labels)))
    train_index, val_index = (split.labels for split in make_splits(numbered, 100, 0, None)[:2])
    assert torch.equal(torch.cat([train_index, val_index]).sort().values, torch.arange(600))
    assert torch.equal(train.images, normalize(raw.train_images[train_index], info))
    assert torch.equal(val.images, normalize(raw.train_images[val_index], info))
    limited, _, _ = normalized_splits(raw, 100, 0, 50)
    assert torch.equal(limited.images, train.images[:50])


@pytest.mark.parametrize("val_size,limit", [(-1, None), (600, None), (100, 501)])  # 0: no validation (legal)
def test_bad_split_sizes(mnist_root, val_size, limit):
    raw = load_dataset("MNIST", mnist_root, download=False)
    with pytest.raises(DatasetError, match="val_size|limit_train"):
        make_splits(raw, val_size, 0, limit)


def test_normalize_uses_dataset_constants():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x = normalize(images, DATASETS["CIFAR10"])
    expected = (1 - torch.tensor(DATASETS["CIFAR10"].mean)) / torch.tensor(DATASETS["CIFAR10"].std)
    assert torch.allclose(x[0, :, 0, 0], expected)


def numbered_split(n: int) -> Split:
    """`n` one-pixel images whose value is their index, labelled with their index too."""
    return Split(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))


def test_loader_serves_every_image_once_an_epoch_in_a_new_order():
    loader = TrainLoader(numbered_split(300), 128, seed=0)
    first, second = list(loader), list(loader)
    assert [len(labels) for _, labels in first] == [128, 128, 44] == loader.batch_sizes() and len(loader) == 3
    for epoch in (first, second):
        assert torch.equal(torch.cat([labels for _, labels in epoch]).sort().values, torch.arange(300))
        assert all(torch.equal(images.flatten().long(), labels) for images, labels in epoch)
    assert not torch.equal(first[0][1], second[0][1])
    assert len(TrainLoader(numbered_split(257), 128, 0)) == 2  # a lone last image is skipped: batch norm needs two


@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 130, 256, 257, 300])
def test_loader_length_and_batch_sizes_count_what_it_serves(n):
    loader = TrainLoader(numbered_split(n), 128, seed=0)
    served = [len(labels) for _, labels in loader]
    assert data.num_batches(n, 128) == len(loader) == len(served) and loader.batch_sizes() == served


def test_loader_state_continues_the_order():
    loader = TrainLoader(numbered_split(100), 32, seed=3)
    list(loader)
    resumed = TrainLoader(numbered_split(100), 32, seed=99)
    resumed.load_state_dict(loader.state_dict())
    torch.Generator().set_state(loader.state_dict())  # a generator's state, as checkpoints stored before the loader
    assert all(torch.equal(a[1], b[1]) for a, b in zip(loader, resumed))


def test_ranks_share_out_the_global_batch_with_the_same_crops():
    images = torch.randn(70, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    split, info = Split(images, torch.arange(70)), DATASETS["CIFAR10"]
    whole = list(TrainLoader(split, 20, 5, info))
    ranks = [list(TrainLoader(split, 20, 5, info, Shard(rank, 2))) for rank in (0, 1)]
    for step, (batch_images, batch_labels) in enumerate(whole):
        for rank in (0, 1):
            assert torch.equal(ranks[rank][step][0], batch_images[rank::2])
            assert torch.equal(ranks[rank][step][1], batch_labels[rank::2])


def crop_and_flip_of(images: torch.Tensor, out: torch.Tensor, info, padding: int = 4) -> list[tuple]:
    """For each augmented image, every (dy, dx, flipped) window of its black-padded original that it equals."""
    n, c, h, w = images.shape
    black = -torch.tensor(info.mean) / torch.tensor(info.std)
    padded = black.view(1, c, 1, 1).repeat(n, 1, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding:padding + h, padding:padding + w] = images
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (n, c, dy, dx, h, w)
    matches = []
    for i in range(n):
        same = [(windows[i] == out[i, :, None, None]).all(-1).all(-1).all(0),
                (windows[i] == out[i, :, None, None].flip(-1)).all(-1).all(-1).all(0)]
        matches.append([(dy, dx, flipped) for flipped in (False, True) for dy, dx in same[flipped].nonzero().tolist()])
    return matches


def test_augment_crops_and_flips_each_image_its_own_way():
    info = DATASETS["CIFAR10"]
    images = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment(images, torch.Generator().manual_seed(0), info)
    assert out.shape == images.shape and out.dtype == images.dtype
    matches = crop_and_flip_of(images, out, info)
    assert all(len(m) == 1 for m in matches)  # each output is one window of the padded input, flipped or not
    crops = [m[0] for m in matches]
    flipped = sum(f for _, _, f in crops)
    assert 40 < flipped < 88  # both flips, about half each
    offsets = {(dy, dx) for dy, dx, _ in crops}
    assert len(offsets) > 40 and {dy for dy, _ in offsets} == {dx for _, dx in offsets} == set(range(9))


def test_augment_keeps_channels_last_and_the_crops():
    info = DATASETS["CIFAR10"]
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = augment(images, torch.Generator().manual_seed(1), info)
    fast = augment(images.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(1), info)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast, plain)


@pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="needs ../shared/datasets")
def test_real_datasets_load():
    mnist = load_dataset("MNIST", SHARED_DATASETS, download=False)
    assert (len(mnist.train_labels), len(mnist.test_labels)) == (60000, 10000)
    cifar = load_dataset("CIFAR10", SHARED_DATASETS, download=False)
    assert (len(cifar.train_labels), len(cifar.test_labels)) == (50000, 10000)
    assert torch.equal(torch.bincount(cifar.train_labels), torch.full((10,), 5000))
