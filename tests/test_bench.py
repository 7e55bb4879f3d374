"""bench.py's correctness (never its speed), through its command line and its output on tiny data: the JSON and the
table of both paths, that every row trains on the threads and memory format it records (watched from inside the
models), the ablation's one lever at a time; and what the output cannot show: FLOP counting, the conventional
loaders, the interleaved timing, the target checks."""
import contextlib
import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torchvision
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torchvision import transforms

import bench
import train
from conftest import write_cifar10, write_mnist
from data import CIFAR10_FOLDER, CIFAR10_TRAIN_FILES, read_cifar10_batches
from utils import UsageError

TINY = bench.Sizes(mlp_steps=2, cnn_steps=1, warmup_steps=1, repeats=1, matmul_size=64, matmul_count=1,
                   cam_images=8, exercises=False, exercise1=("--preset", "exercise1", "--num_hidden_layers", "2", "4",
                                                             "--seed", "0", "1", "--num_epochs", "1"),
                   limit_train=64, val_size=100, batch_size=8)
TOP_KEYS = {"meta", "mlp", "cnn", "cam", "targets"}  # and "exercises" without --quick
SETUP_KEYS = {"code", "threads", "memory_format", "precision", "data", "optimizer", "grad_norms", "compiled"}
EXERCISE1_SEED0 = {"mlp_mnist_h2_w16_plain_s0", "mlp_mnist_h2_w16_res2_s0", "mlp_mnist_h4_w16_plain_s0",
                   "mlp_mnist_h4_w16_res2_s0"}
RESIDENT, MNIST_LOADER = "resident tensors, index batches", "DataLoader, per-image ToTensor+Normalize"



@pytest.fixture
def restore_threads():
    """Put torch's thread count back for the tests after us, even when a test fails half-way."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One root holding both tiny datasets, as --data_root expects."""
    return write_cifar10(write_mnist(tmp_path_factory.mktemp("bench_data")))


def run_bench(capture, data_root, out, sizes, *flags) -> tuple[dict, str]:
    """bench.py's main on these flags: its results as the JSON file holds them, and the table it printed (read from
    pytest's capsys, or capfd to see what other processes print too)."""
    args = bench.get_args_parser().parse_args(["--data_root", str(data_root), "--device", "cpu", "--out", str(out),
                                               *flags])
    returned = bench.main(args, sizes)
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    return results, capture.readouterr().out


def layout(tensor: torch.Tensor) -> str | None:
    """How a 4-D tensor is stored: channels_last, contiguous, or None where both describe it (one channel, 1x1)."""
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last)
    if channels_last and tensor.is_contiguous():
        return None
    return "channels_last" if channels_last else "contiguous" if tensor.is_contiguous() else "strided"


@contextlib.contextmanager
def watch_training():
    """For every model that trains inside the block, the set of (torch threads, layouts of its 4-D input and
    weights) of its training forward passes, seen from inside torch's module calls. Keyed by the model itself, which
    keeps it alive: by id(), a freed model's id could be reused by the next one and merge their passes."""
    seen, depth = {}, [0]

    def before(module, inputs):
        if depth[0] == 0 and module.training and inputs and isinstance(inputs[0], torch.Tensor):
            layouts = {layout(t) for t in [inputs[0], *module.parameters()] if t.ndim == 4} - {None}
            seen.setdefault(module, set()).add((torch.get_num_threads(), frozenset(layouts)))
        depth[0] += 1

    def after(module, inputs, output):
        depth[0] -= 1

    hooks = register_module_forward_pre_hook(before), register_module_forward_hook(after)
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def check_rows_trained_as_recorded(results: dict, seen: dict) -> None:
    """Each model trained on one thread count and layout, and those are the ones the rows record."""
    mixed = {type(model).__name__: passes for model, passes in seen.items() if len(passes) != 1}
    assert not mixed, f"models trained on several thread counts or layouts: {mixed}"
    recorded = {(row["threads"], frozenset({row["memory_format"]} if section == "cnn" else ()))
                for section in ("mlp", "cnn") if section in results for row in results[section]["rows"].values()}
    assert {next(iter(passes)) for passes in seen.values()} == recorded


def table_rows(table: str) -> list[tuple[str, str, str]]:
    """Each measured row of the table, in order: its label, the rest of its line, and the line under it."""
    lines = table.splitlines()
    return [(match[1], match[2], lines[i + 1]) for i, line in enumerate(lines[:-1])
            if (match := re.match(r"  (\S.*?)\s{2,}(\S.*)$", line))]


def table_row(table: str, label: str) -> str:
    """The value and the words after it of the table's last row with this label."""
    return [rest for name, rest, _ in table_rows(table) if name == label][-1]


def what_it_ran(row: dict) -> str:
    """The line the table prints under a training row: what the row's record says it ran."""
    threads = f"{row['threads']} thread" + ("s" if row["threads"] != 1 else "")
    return (f"    {threads}, {row['memory_format']}, {row['precision']}, {row['data']}, {row['optimizer']}, "
            f"norms: {row['grad_norms']}" + (", compiled" if row["compiled"] else ""))


def test_quick_path_writes_the_documented_json_and_table(data_root, tmp_path, capsys, restore_threads):
    torch.set_num_threads(2)  # which no row asks for
    with watch_training() as seen:
        results, table = run_bench(capsys, data_root, tmp_path / "results" / "bench.json", TINY, "--quick",
                                   "--threads", "1")
    assert torch.get_num_threads() == 2  # every row put the count back
    check_rows_trained_as_recorded(results, seen)
    assert set(results) == TOP_KEYS
    assert results["meta"]["quick"] and results["meta"]["threads"] == 1 and results["meta"]["device"] == "cpu"
    mlp, cnn = results["mlp"], results["cnn"]
    # --threads 1: nothing runs on more, so there are no one-thread variants and no one-thread lever; an --amp row
    # where this CPU has bfloat16
    amp = {"ours, --amp"} if train.amp_precision(torch.device("cpu")) == "bfloat16" else set()
    assert set(mlp["rows"]) == {"ours", "ours, norm log off", "conventional loop", "+ resident data",
                                "+ fused Adam", "+ fused norm log"} | amp
    assert set(cnn["rows"]) == {"ours", "ours, contiguous", "conventional loop"} | amp
    for name, row in [*mlp["rows"].items(), *cnn["rows"].items()]:
        precision = "bfloat16 autocast" if name == "ours, --amp" else "float32"
        assert set(row) >= SETUP_KEYS and row["threads"] == 1 and row["precision"] == precision
    assert mlp["rows"]["ours"]["data"] == RESIDENT and mlp["rows"]["conventional loop"]["data"] == MNIST_LOADER
    assert mlp["config"] == {"num_hidden_layers": 22, "width": 16, "batch_size": 8, "optimizer": "adam", "lr": 3e-4}
    assert mlp["speedup_over"] == "conventional loop"
    assert mlp["speedup"] == pytest.approx(mlp["rows"]["ours"]["images_per_s"] / mlp["rows"]["conventional loop"]
                                           ["images_per_s"])
    assert cnn["config"]["num_conv_per_level"] == 6 and cnn["config"]["residual_step"] == 2
    assert (cnn["rows"]["ours"]["memory_format"], cnn["rows"]["ours, contiguous"]["memory_format"],
            cnn["rows"]["conventional loop"]["memory_format"]) == ("channels_last", "contiguous", "contiguous")
    assert cnn["flops_per_step"] > 0 and cnn["matmul_threads"] == 1
    assert cnn["fraction_of_matmul"] == pytest.approx(cnn["rows"]["ours"]["gflops"] / cnn["matmul_gflops"])
    assert cnn["channels_last_speedup"] == pytest.approx(
        cnn["rows"]["ours"]["images_per_s"] / cnn["rows"]["ours, contiguous"]["images_per_s"])
    assert results["cam"]["map_shape"] == [8, 8, 8]  # 32 px, two stride-2 levels
    assert not any(t["name"].startswith("Exercise 1") for t in results["targets"])  # --quick: no exercises
    assert all(math.isfinite(x) for x in all_numbers(results))
    rows = {(label, under) for label, _, under in table_rows(table)}
    assert all((name, what_it_ran(row)) in rows for name, row in [*mlp["rows"].items(), *cnn["rows"].items()])
    assert table_row(table, "+ fused Adam").endswith("on + resident data")  # the row above it: no one-thread lever
    assert "Exercise 1" not in table and "one epoch" not in table
    assert "Targets" in table and table.rstrip().endswith(f"wrote {tmp_path / 'results' / 'bench.json'}")
    cpu = table.splitlines()[1]  # the CPU, its instruction sets and what --amp chooses on it, under the title
    assert cpu.startswith("CPU: ") and "AVX2 " in cpu and "AVX512-BF16 " in cpu and "AMX " in cpu
    assert cpu.endswith(f"--amp trains in {train.amp_precision(torch.device('cpu'))} on cpu")


def all_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in all_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in all_numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_policy_threads_and_the_ablation_one_lever_at_a_time(tmp_path, capsys, restore_threads):
    """--threads 0: pipeline.py's policy for ours (one thread for the MLP), torch's count (here 3, which neither
    policy gives) for the conventional loop, which is also timed on one thread; each ablation row adds one lever."""
    torch.set_num_threads(3)
    with watch_training() as seen:
        results, table = run_bench(capsys, write_mnist(tmp_path / "mnist"), tmp_path / "b.json", TINY, "--quick",
                                   "--mnist_only", "--threads", "0")
    assert torch.get_num_threads() == 3
    check_rows_trained_as_recorded(results, seen)
    mlp = results["mlp"]
    assert mlp["ablation"] == ["conventional loop", "+ resident data", "+ one thread", "+ fused Adam",
                               "+ fused norm log"]
    setups = [{k: mlp["rows"][name][k] for k in SETUP_KEYS} for name in mlp["ablation"]]
    changed = [[k for k in sorted(SETUP_KEYS) if before[k] != after[k]] for before, after in zip(setups, setups[1:])]
    assert changed == [["data"], ["threads"], ["optimizer"], ["grad_norms"]]
    assert setups[0] == {"code": "conventional loop", "threads": 3, "memory_format": "contiguous",
                         "precision": "float32", "data": MNIST_LOADER, "optimizer": "Adam",
                         "grad_norms": ".item() per weight each step", "compiled": False}
    ours = {k: mlp["rows"]["ours"][k] for k in SETUP_KEYS}
    assert ours["threads"] == 1 and dict(setups[-1], code="ours") == ours  # every lever of ours, in the loop
    conventional_1_thread = mlp["rows"]["conventional loop, 1 thread"]
    assert conventional_1_thread["threads"] == 1 and conventional_1_thread["data"] == MNIST_LOADER
    best = max(("conventional loop", "conventional loop, 1 thread"), key=lambda name: mlp["rows"][name]["images_per_s"])
    assert mlp["speedup_over"] == best
    assert mlp["speedup"] == pytest.approx(mlp["rows"]["ours"]["images_per_s"] / mlp["rows"][best]["images_per_s"])
    for before, name in zip(mlp["ablation"], mlp["ablation"][1:]):
        factor = mlp["rows"][name]["images_per_s"] / mlp["rows"][before]["images_per_s"]
        assert table_row(table, name).endswith(f"ms/step, x{factor:.2f} on {before}")
    # --mnist_only, what make gpu-check runs where only MNIST is carried: the MLP rows, their targets, Exercise 1
    assert set(results) == TOP_KEYS - {"cnn", "cam"}
    assert not any(t["name"].startswith("CNN") for t in results["targets"])
    assert "MLP 22x16 on MNIST" in table and "ResNet-20" not in table


def test_full_path_runs_the_exercises_for_real(data_root, tmp_path, capfd, restore_threads):
    """Exercise 1's first seed for real with --jobs 1 (and 2 where there are two cores), the second seed counted at
    its cost; one real epoch of the ResNet-20 shape. What the sweeps print, in this process or in their workers,
    stays out of the table."""
    results, table = run_bench(capfd, data_root, tmp_path / "bench.json", replace(TINY, exercises=True))
    assert "epoch 1/1" not in table and "test acc" not in table and table.startswith("bench.py on cpu")
    exercise1, epoch = results["exercises"]["exercise1"], results["exercises"]["resnet20_epoch"]
    assert set(results) == TOP_KEYS | {"exercises"} and exercise1["estimated"] and not results["meta"]["quick"]
    assert exercise1["runs"] == 8 and exercise1["runs_timed"] == 4 and exercise1["seeds"] == [0, 1]
    assert set(exercise1["epoch_seconds_per_run"]) == EXERCISE1_SEED0
    assert exercise1["seconds_per_run"] == pytest.approx(exercise1["seconds"] / 8)
    assert exercise1["threads"] == 1 and exercise1["data"] == RESIDENT
    assert "Exercise 1: 8 runs (2 depths x residual steps 0/2 x 2 seeds), 1 epoch each" in table
    by_jobs = exercise1["seconds_by_jobs"]
    assert set(by_jobs) in ({"1"}, {"1", "2"})
    assert exercise1["seconds"] == pytest.approx(2 * min(by_jobs.values()))
    assert exercise1["jobs_speedup"] == (pytest.approx(by_jobs["1"] / by_jobs["2"]) if "2" in by_jobs else None)
    fastest = min(by_jobs, key=by_jobs.get)
    assert table_row(table, "all runs").endswith(f"estimate: seed 0's 4 runs measured with --jobs {fastest}, x 2")
    assert all(table_row(table, f"seed 0's 4 runs, --jobs {jobs}").endswith(" s  measured") for jobs in by_jobs)
    assert epoch["train_images"] == 64 and epoch["seconds"] > 0 and epoch["memory_format"] == "channels_last"
    assert "ResNet-20 shape, one epoch of 64 images and validation" in table
    assert table_row(table, "ours").endswith(" s  measured")  # the table's last "ours": the real epoch


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


def test_conventional_loaders_serve_normalised_images(data_root):
    images, labels = read_cifar10_batches(data_root / CIFAR10_FOLDER, CIFAR10_TRAIN_FILES)
    dataset = bench.CIFAR10Images(images, labels, transforms.ToTensor())
    assert len(dataset) == 500
    image, label = dataset[7]
    assert label == labels[7].item() and isinstance(label, int)
    assert torch.equal((image * 255).round().to(torch.uint8), images[7])  # the pixels, in order
    batch, batch_labels = next(iter(bench.conventional_loader("CIFAR10", data_root, batch_size=16)))
    assert batch.shape == (16, 3, 32, 32) and batch.dtype == torch.float32 and batch_labels.shape == (16,)
    batch, labels = next(iter(bench.conventional_loader("MNIST", data_root, batch_size=32)))
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


@pytest.mark.parametrize("flags,message", [(["--threads", "-1"], "--threads"), (["--threads", "9999"], "per core"),
                                           (["--out", "{tmp}"], "is a folder"),
                                           (["--out", "{tmp}/new_folder/"], "is a folder"),
                                           (["--out", "{tmp}/a_file"], "holds something else than bench.py's"),
                                           (["--out", "{tmp}/a_file/b.json"], "is not a folder")])
def test_bad_flags_are_refused_before_anything_is_measured(tmp_path, flags, message):
    (tmp_path / "a_file").write_text("mine")
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--out", str(tmp_path / "b.json"), "--data_root",
                                               str(tmp_path / "no data"), "--no-download",
                                               *[f.format(tmp=tmp_path) for f in flags]])
    with pytest.raises(UsageError, match=message):
        bench.main(args)  # checked before the (missing) data is read
    assert (tmp_path / "a_file").read_text() == "mine"


def test_an_out_file_of_json_nested_too_deep_is_refused_and_kept(tmp_path):
    """An --out file of JSON nested deeper than the parser goes was a RecursionError traceback; it is someone else's
    file, refused in one line and left as it is (utils.read_json, as report.py reads run files)."""
    out = tmp_path / "b.json"
    out.write_bytes(b"[" * 100_000)
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--out", str(out), "--data_root",
                                               str(tmp_path / "no data"), "--no-download"])
    with pytest.raises(UsageError, match="holds something else than bench.py's"):
        bench.main(args)
    assert out.read_bytes() == b"[" * 100_000


def test_a_dataset_smaller_than_the_held_out_images_is_refused(tmp_path):
    """A copy of MNIST with 600 training images was a DatasetError traceback naming --val_size, no flag of bench.py."""
    args = bench.get_args_parser().parse_args(["--data_root", str(write_mnist(tmp_path)), "--no-download", "--device",
                                               "cpu", "--quick", "--mnist_only", "--out", str(tmp_path / "b.json")])
    with pytest.raises(UsageError, match="MNIST has 600 training images; bench.py holds out 5,000"):
        bench.main(args)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("flags,message", [((), "download failed.*no route to host"),
                                           (("--no-download",), "run without --no-download")])
def test_missing_data_is_downloaded_unless_refused(tmp_path, monkeypatch, flags, message):
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
