"""bench.py's correctness (never its speed): both paths end to end on tiny data, that every row runs on the threads
and memory format it records, the ablation's one lever at a time, FLOP counting, the conventional CIFAR-10 dataset,
the timing helper, the target checks."""
import json
import math

import pytest
import torch
import torchvision
from torchvision import transforms

import bench
import train
from conftest import write_cifar10, write_mnist
from data import CIFAR10_FOLDER, CIFAR10_TRAIN_FILES, load_dataset, read_cifar10_batches
from utils import UsageError

TINY = bench.Sizes(mlp_steps=2, cnn_steps=1, warmup_steps=1, repeats=1, matmul_size=64, matmul_count=1,
                   cam_images=8, val_size=100, exercise1_depths=(2, 4), exercise1_residual_steps=(0, 2),
                   exercise1_seeds=(0, 1), exercise1_epochs=1, exercise1_sample_steps=1, resnet20_epoch_real=False,
                   eval_sample=8, limit_train=64, batch_size=8)
TOP_KEYS = {"meta", "mlp", "cnn", "cam", "exercises", "targets"}
SETUP_KEYS = {"code", "threads", "memory_format", "precision", "data", "optimizer", "grad_norms", "compiled"}
EXERCISE1_SEED0 = {"mlp_mnist_h2_w16_plain_s0", "mlp_mnist_h2_w16_res2_s0", "mlp_mnist_h4_w16_plain_s0",
                   "mlp_mnist_h4_w16_res2_s0"}


@pytest.fixture
def restore_threads():
    """Put torch's thread count back for the tests after us, even when a test fails half-way."""
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
    torch.set_num_threads(2)
    out = tmp_path / "results" / "bench.json"
    returned = run_bench(data_root, out, TINY, "--quick")
    assert torch.get_num_threads() == 2  # every row put the count back
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert set(results) == TOP_KEYS
    assert results["meta"]["quick"] and results["meta"]["threads"] == 1 and results["meta"]["device"] == "cpu"
    mlp, cnn = results["mlp"], results["cnn"]
    # --threads 1: nothing runs on more, so there are no one-thread variants and no one-thread lever; an --amp row
    # where this CPU has bfloat16
    amp = {"ours_amp"} if train.amp_precision(torch.device("cpu")) == "bfloat16" else set()
    assert set(mlp["rows"]) == {"ours", "ours_no_logging", "conventional", "plus_resident_data",
                                "plus_fused_optimizer", "plus_fused_norms"} | amp
    assert set(cnn["rows"]) == {"ours", "ours_contiguous", "conventional"} | amp
    for name, row in [*mlp["rows"].items(), *cnn["rows"].items()]:
        precision = "bfloat16 autocast" if name == "ours_amp" else "float32"
        assert set(row) >= SETUP_KEYS and row["threads"] == 1 and row["precision"] == precision
        assert row["images_per_s"] > 0 and row["step_ms"] > 0
    assert mlp["rows"]["ours"]["data"] == bench.RESIDENT and mlp["rows"]["conventional"]["data"] == bench.MNIST_LOADER
    assert mlp["config"] == {"num_hidden_layers": 22, "width": 16, "batch_size": 8, "optimizer": "adam", "lr": 3e-4}
    assert mlp["speedup_over"] == "conventional"
    assert cnn["config"]["num_conv_per_level"] == 6 and cnn["config"]["residual_step"] == 2
    assert (cnn["rows"]["ours"]["memory_format"], cnn["rows"]["ours_contiguous"]["memory_format"],
            cnn["rows"]["conventional"]["memory_format"]) == ("channels_last", "contiguous", "contiguous")
    assert cnn["flops_per_step"] > 0 and cnn["matmul_gflops"] > 0 and cnn["matmul_threads"] == 1
    assert cnn["fraction_of_matmul"] == pytest.approx(cnn["rows"]["ours"]["gflops"] / cnn["matmul_gflops"])
    assert cnn["channels_last_speedup"] == pytest.approx(
        cnn["rows"]["ours"]["images_per_s"] / cnn["rows"]["ours_contiguous"]["images_per_s"])
    assert results["cam"]["map_shape"] == [8, 8, 8]  # 32 px, two stride-2 levels
    assert results["cam"]["memory_format"] == "contiguous"  # as cam.py runs it
    exercise1 = results["exercises"]["exercise1"]
    assert exercise1["estimated"] and exercise1["runs"] == 8 and exercise1["runs_timed"] == 4
    assert set(exercise1["epoch_seconds_per_run"]) == EXERCISE1_SEED0
    assert exercise1["seconds_per_run"] == pytest.approx(exercise1["seconds"] / 8)
    assert exercise1["sweep"] == ("pipeline.py --model_name MLP --dataset MNIST --num_hidden_layers 2 4 --width 16 "
                                  "--residual_step 0 2 --seed 0 1 --num_epochs 1")
    assert exercise1["threads"] == 1 and exercise1["data"] == bench.RESIDENT
    assert results["exercises"]["resnet20_epoch"]["estimated"]
    assert "Exercise 1, all runs (estimate)" in [t["name"] for t in results["targets"]]
    assert all(math.isfinite(x) for x in all_numbers(results))
    table = capsys.readouterr().out
    for name, row in [*mlp["rows"].items(), *cnn["rows"].items()]:
        assert f"{bench.ROW_NAMES[name]} " in table and bench.settings_label(row) in table
    assert "Targets" in table and f"wrote {out}" in table
    cpu = table.splitlines()[1]  # the CPU, its instruction sets and what --amp chooses on it, under the title
    assert cpu.startswith("CPU: ") and "AVX2 " in cpu and "AVX512-BF16 " in cpu and "AMX " in cpu
    assert cpu.endswith(f"--amp trains in {train.amp_precision(torch.device('cpu'))} on cpu")


def test_full_path_runs_the_exercises_for_real(data_root, tmp_path, restore_threads):
    sizes = bench.Sizes(**dict(vars(TINY), exercise1_seeds=(0,), exercise1_sample_steps=0, resnet20_epoch_real=True))
    results = run_bench(data_root, tmp_path / "bench.json", sizes)
    exercise1, epoch = results["exercises"]["exercise1"], results["exercises"]["resnet20_epoch"]
    assert not exercise1["estimated"] and not epoch["estimated"]
    assert exercise1["runs"] == exercise1["runs_timed"] == 4
    assert set(exercise1["epoch_seconds_per_run"]) == EXERCISE1_SEED0
    assert exercise1["seconds"] >= sum(exercise1["epoch_seconds_per_run"].values()) > 0
    jobs = bench.exercise1_jobs(torch.device("cpu"))
    assert set(exercise1["seconds_by_jobs"]) == {str(j) for j in jobs}
    assert exercise1["seconds"] == min(exercise1["seconds_by_jobs"].values())
    if 2 in jobs:
        by_jobs = exercise1["seconds_by_jobs"]
        assert exercise1["jobs_speedup"] == pytest.approx(by_jobs["1"] / by_jobs["2"])
    assert epoch["train_images"] == 64 and epoch["seconds"] > 0 and epoch["memory_format"] == "channels_last"
    assert not results["meta"]["quick"]


def test_exercise1_counts_the_other_seeds_at_the_cost_of_the_first(data_root, tmp_path, restore_threads):
    sizes = bench.Sizes(**dict(vars(TINY), exercise1_depths=(2,), exercise1_residual_steps=(0,),
                               exercise1_sample_steps=0))
    options = bench.Options(threads=0, conventional_threads=1, amp=False, compile_model=False)
    exercise1 = bench.run_exercise1(data_root, torch.device("cpu"), sizes, options)
    assert exercise1["estimated"] and exercise1["runs"] == 2 and exercise1["runs_timed"] == 1
    assert set(exercise1["epoch_seconds_per_run"]) == {"mlp_mnist_h2_w16_plain_s0"}
    assert exercise1["seconds"] >= 2 * exercise1["epoch_seconds_per_run"]["mlp_mnist_h2_w16_plain_s0"]


def layout(tensor: torch.Tensor) -> str | None:
    """How a 4-D tensor is stored: channels_last, contiguous, or None where both describe it (one channel, 1x1)."""
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last)
    if channels_last and tensor.is_contiguous():
        return None
    return "channels_last" if channels_last else "contiguous" if tensor.is_contiguous() else "strided"


@pytest.mark.parametrize("contenders, dataset, threads, ours_threads, one_thread_row", [
    (bench.mlp_contenders, "MNIST", 0, 1, "plus_one_thread"),  # pipeline.py's policy: one thread for the MLP
    (bench.cnn_contenders, "CIFAR10", 2, 2, "ours_1_thread"),  # --threads 2
], ids=["mlp", "cnn"])
def test_every_row_trains_on_the_threads_and_memory_format_it_records(data_root, restore_threads, contenders, dataset,
                                                                     threads, ours_threads, one_thread_row):
    # the real loops, watched from inside their models' forward; 3 threads outside, which no row asks for
    raw = load_dataset(dataset, data_root, download=False)
    options = bench.Options(threads=threads, conventional_threads=2, amp=False, compile_model=False)
    rows = contenders(raw, data_root, torch.device("cpu"), TINY, options)
    assert rows["ours"].setup.threads == ours_threads and rows[one_thread_row].setup.threads == 1
    torch.set_num_threads(3)
    for name, row in rows.items():
        seen = []

        def watch(module, inputs):
            weights = [layout(p) for p in module.parameters() if p.ndim == 4]
            seen.append((torch.get_num_threads(), {layout(inputs[0]), *weights} - {None}))

        hook = row.model.register_forward_pre_hook(watch)
        try:
            row.train()
        finally:
            hook.remove()
        assert torch.get_num_threads() == 3, name
        expected = {row.setup.memory_format} if dataset == "CIFAR10" else set()  # MNIST has one channel
        assert seen and all(step == (row.setup.threads, expected) for step in seen), name


def test_ablation_adds_one_lever_at_a_time_and_ends_at_ours(data_root, restore_threads):
    raw = load_dataset("MNIST", data_root, download=False)
    options = bench.Options(threads=0, conventional_threads=2, amp=False, compile_model=False)
    mlp = bench.bench_mlp(raw, data_root, torch.device("cpu"), TINY, options)
    assert mlp["ablation"] == ["conventional", "plus_resident_data", "plus_one_thread", "plus_fused_optimizer",
                               "plus_fused_norms"]
    setups = [{k: mlp["rows"][name][k] for k in SETUP_KEYS} for name in mlp["ablation"]]
    changed = [[k for k in sorted(SETUP_KEYS) if before[k] != after[k]] for before, after in zip(setups, setups[1:])]
    assert changed == [["data"], ["threads"], ["optimizer"], ["grad_norms"]]
    assert setups[0] == {"code": "conventional loop", "threads": 2, "memory_format": "contiguous",
                         "precision": "float32", "data": bench.MNIST_LOADER, "optimizer": "Adam",
                         "grad_norms": bench.ITEM_NORMS, "compiled": False}
    ours = {k: mlp["rows"]["ours"][k] for k in SETUP_KEYS}
    assert dict(setups[-1], code="ours") == ours  # every lever of ours, in the conventional loop
    conventional_1_thread = mlp["rows"]["conventional_1_thread"]
    assert conventional_1_thread["threads"] == 1 and conventional_1_thread["data"] == bench.MNIST_LOADER
    assert mlp["speedup_over"] in bench.CONVENTIONAL_ROWS
    best = max(mlp["rows"][name]["images_per_s"] for name in bench.CONVENTIONAL_ROWS)
    assert mlp["speedup"] == pytest.approx(mlp["rows"]["ours"]["images_per_s"] / best)


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
               "exercises": {"exercise1": {"estimated": False, "seconds": 480.0, "jobs_speedup": 1.8}}}
    met = {t["name"]: t["met"] for t in bench.check_targets(results)}
    assert met == {"MLP training vs conventional at its best thread count": True,
                   "gradient-norm logging cost": False,
                   "CNN training vs conventional at its best thread count": False, "CNN GFLOP/s vs matmul": True,
                   "Exercise 1, all runs": False, "Exercise 1 with --jobs 2 vs --jobs 1": True}


def test_negative_threads_is_a_usage_error(tmp_path):
    args = bench.get_args_parser().parse_args(["--threads", "-1", "--device", "cpu", "--out", str(tmp_path / "b")])
    with pytest.raises(UsageError, match="--threads"):
        bench.main(args)


def test_parser_defaults():
    args = bench.get_args_parser().parse_args([])
    assert (args.data_root, args.device, args.quick, args.out, args.download) == (
        "data", "auto", False, "bench_results/bench.json", True)


@pytest.mark.parametrize("flags,message", [((), "download failed.*no route to host"),
                                           (("--no-download",), "run without --no-download")])
def test_missing_data_is_downloaded_unless_refused(tmp_path, monkeypatch, capsys, flags, message):
    """A fresh clone has no data: bench.py fetches it as pipeline.py does (here the network is down), or with
    --no-download says what to run; either is one line, exit status 2."""
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    args = bench.get_args_parser().parse_args(["--data_root", str(tmp_path), "--device", "cpu", "--out",
                                               str(tmp_path / "b.json"), *flags])
    with pytest.raises(UsageError, match=message):
        bench.main(args)
    assert "shared" not in bench.get_args_parser().format_help()


def test_mnist_only_needs_no_cifar(tmp_path, capsys, restore_threads):
    """What make gpu-check runs where only MNIST is carried: the MLP rows, their targets and Exercise 1."""
    results = run_bench(write_mnist(tmp_path / "mnist_only"), tmp_path / "b.json", TINY, "--quick", "--mnist_only")
    assert set(results) == TOP_KEYS - {"cnn", "cam"} and set(results["exercises"]) == {"exercise1"}
    assert not any(t["name"].startswith("CNN") for t in results["targets"])
    table = capsys.readouterr().out
    assert "MLP 22x16 on MNIST" in table and "ResNet-20" not in table and "Exercise 1, all runs" in table
