"""bench.py's correctness (never its speed): both paths end to end on tiny data, FLOP counting, the conventional
CIFAR-10 dataset, the timing helper, the target checks."""
import json
import math

import pytest
import torch
from torchvision import transforms

import bench
from conftest import write_cifar10, write_mnist
from data import CIFAR10_FOLDER, CIFAR10_TRAIN_FILES, read_cifar10_batches
from utils import UsageError

TINY = bench.Sizes(mlp_steps=2, cnn_steps=1, warmup_steps=1, repeats=1, matmul_size=64, matmul_count=1,
                   cam_images=8, val_size=100, exercise1_depths=(2, 4), exercise1_epochs=1,
                   exercise1_sample_steps=1, exercise2_real=False, eval_sample=8, limit_train=64, batch_size=8)
TOP_KEYS = {"meta", "mlp", "cnn", "cam", "exercises", "targets"}


@pytest.fixture
def restore_threads():
    """bench.main sets torch's thread count for the whole process; put it back for the tests after us."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_bench(data_root, out, sizes, *flags) -> dict:
    args = bench.get_args_parser().parse_args(["--data_root", str(data_root), "--device", "cpu", "--threads", "1",
                                               "--out", str(out), *flags])
    return bench.main(args, sizes)


def all_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in all_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in all_numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One root holding both tiny datasets, as --data_root expects."""
    root = tmp_path_factory.mktemp("bench_data")
    return write_cifar10(write_mnist(root))


def test_quick_path_writes_the_documented_json(data_root, tmp_path, capsys, restore_threads):
    out = tmp_path / "results" / "bench.json"
    returned = run_bench(data_root, out, TINY, "--quick")
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert set(results) == TOP_KEYS
    assert results["meta"]["quick"] and results["meta"]["threads"] == 1 and results["meta"]["device"] == "cpu"
    for key in ("ours", "ours_no_logging", "conventional"):
        assert results["mlp"]["images_per_s"][key] > 0
    assert results["mlp"]["config"] == {"num_hidden_layers": 22, "width": 16, "batch_size": 8, "optimizer": "adam",
                                        "lr": 3e-4}
    cnn = results["cnn"]
    assert cnn["config"]["num_conv_per_level"] == 6 and cnn["config"]["residual_step"] == 2
    assert cnn["flops_per_step"] > 0 and cnn["matmul_gflops"] > 0
    assert cnn["fraction_of_matmul"] == pytest.approx(cnn["gflops"]["ours"] / cnn["matmul_gflops"])
    assert results["cam"]["map_shape"] == [8, 8, 8]  # 32 px, two stride-2 levels
    exercise1 = results["exercises"]["exercise1"]
    assert exercise1["estimated"] and set(exercise1["epoch_seconds_per_depth"]) == {"2", "4"}
    assert results["exercises"]["exercise2_epoch"]["estimated"]
    assert [t["name"] for t in results["targets"]][-1] == "Exercise 1 wall time (estimate)"
    assert all(math.isfinite(x) for x in all_numbers(results))
    table = capsys.readouterr().out
    assert "conventional" in table and "Targets" in table and f"wrote {out}" in table


def test_full_path_runs_the_exercises_for_real(data_root, tmp_path, restore_threads):
    sizes = bench.Sizes(**dict(vars(TINY), exercise1_sample_steps=0, exercise2_real=True))
    results = run_bench(data_root, tmp_path / "bench.json", sizes)
    exercise1, exercise2 = results["exercises"]["exercise1"], results["exercises"]["exercise2_epoch"]
    assert not exercise1["estimated"] and not exercise2["estimated"]
    assert set(exercise1["epoch_seconds_per_depth"]) == {"2", "4"}
    assert exercise1["seconds"] >= sum(exercise1["epoch_seconds_per_depth"].values()) > 0
    assert exercise2["train_images"] == 64 and exercise2["seconds"] > 0
    assert not results["meta"]["quick"]


@pytest.mark.parametrize("input_grad", [False, True])
def test_training_flops_of_a_linear_layer(input_grad):
    n, d_in, d_out = 5, 20, 7
    model = torch.nn.Linear(d_in, d_out)
    images = torch.randn(n, d_in, requires_grad=input_grad)
    labels = torch.randint(0, d_out, (n,))
    # forward 2*n*d_in*d_out, the weight's gradient as much again, and the input's gradient when it is needed
    expected = (6 if input_grad else 4) * n * d_in * d_out
    assert bench.training_flops(model, images, labels) == expected
    assert model.weight.grad is None  # the counting pass leaves no gradients behind


def test_conventional_cifar_dataset_serves_the_pixels_in_order(data_root):
    images, labels = read_cifar10_batches(data_root / CIFAR10_FOLDER, CIFAR10_TRAIN_FILES)
    dataset = bench.CIFAR10Images(images, labels, transforms.ToTensor())
    assert len(dataset) == 500
    image, label = dataset[7]
    assert label == labels[7].item() and isinstance(label, int)
    assert torch.equal((image * 255).round().to(torch.uint8), images[7])
    loader = bench.conventional_cifar10_loader(data_root, batch_size=16)
    batch, batch_labels = next(iter(loader))
    assert batch.shape == (16, 3, 32, 32) and batch.dtype == torch.float32 and batch_labels.shape == (16,)


def test_conventional_mnist_loader_normalises(data_root):
    batch, labels = next(iter(bench.conventional_mnist_loader(data_root, batch_size=32)))
    assert batch.shape == (32, 1, 28, 28) and labels.dtype == torch.int64
    assert batch.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)  # black pixels after Normalize


def test_best_seconds_interleaves_and_keeps_the_fastest():
    calls = []
    seconds = bench.best_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3,
                                 torch.device("cpu"))
    assert calls == ["a", "b"] * 3
    assert set(seconds) == {"a", "b"} and all(0 <= s < 1 for s in seconds.values())


def test_check_targets_compares_against_each_bound():
    results = {"mlp": {"speedup": 8.0, "logging_cost": 0.11}, "cnn": {"speedup": 1.2, "fraction_of_matmul": 0.5},
               "exercises": {"exercise1": {"estimated": False, "seconds": 300.0}}}
    met = {t["name"]: t["met"] for t in bench.check_targets(results)}
    assert met == {"MLP training vs conventional": True, "gradient-norm logging cost": False,
                   "CNN training vs conventional": False, "CNN GFLOP/s vs matmul": True,
                   "Exercise 1 wall time": False}


def test_negative_threads_is_a_usage_error(tmp_path):
    args = bench.get_args_parser().parse_args(["--threads", "-1", "--device", "cpu", "--out", str(tmp_path / "b")])
    with pytest.raises(UsageError, match="--threads"):
        bench.main(args)


def test_parser_defaults():
    args = bench.get_args_parser().parse_args([])
    assert (args.data_root, args.device, args.quick, args.out) == ("data", "auto", False, "bench_results/bench.json")


def test_one_thread_lever_runs_ours_on_one_thread_and_restores(restore_threads):
    torch.set_num_threads(2)
    seen = []
    runs = bench.with_one_thread_lever({"ours": lambda: seen.append(torch.get_num_threads())}, torch.device("cpu"))
    runs["ours_1_thread"]()
    runs["ours"]()
    assert seen == [1, 2] and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert set(bench.with_one_thread_lever({"ours": lambda: None}, torch.device("cpu"))) == {"ours"}
