"""Prove the CUDA paths on a GPU machine in one command (`make gpu-check`), and write what ran and what it measured.

    python gpu_check.py --mnist_gz /path/to/mnist   # the folder holding MNIST's four .gz files

Runs tests/test_cuda.py, a real MNIST MLP sweep on CUDA (plain and residual, 3 epochs) and bench.py's MNIST rows on
CUDA, each step whatever the others did, and writes <out_dir>/report.json. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import torch

import bench
import pipeline
from data import MNIST_FILES
from train import amp_precision
from utils import ArgumentParser, CLIError, UsageError, check_writable, first_line, resolve_device, run_cli, write_json

SWEEP = ["--model_name", "MLP", "--dataset", "MNIST", "--num_hidden_layers", "2", "10", "18", "--residual_step", "0",
         "2", "--num_epochs", "3"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The check's flags; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = ArgumentParser(description="Run the CUDA tests, an MNIST sweep and bench.py's MNIST rows on a GPU, and "
                            "write a JSON report.", add_help=add_help)
    parser.add("--mnist_gz", required=True, help="folder holding MNIST's four .gz files (train-images-idx3-ubyte.gz, "
               "...)")
    parser.add("--device", default="cuda", help="cuda or cuda:N")
    parser.add("--out_dir", default="gpu_check", help="folder for the report, the data, the runs and the logs")
    return parser


def unpack_mnist(gz_folder: Path, raw: Path) -> None:
    """MNIST's .gz files uncompressed into `raw` (torchvision's MNIST/raw), as the loader reads them; a missing or
    damaged one is a UsageError."""
    names = [n for pair in MNIST_FILES.values() for n in pair]
    missing = [f"{name}.gz" for name in names if not (gz_folder / f"{name}.gz").is_file()]
    if missing:
        raise UsageError(f"--mnist_gz {gz_folder}: no {missing[0]}; it must hold MNIST's four .gz files")
    raw.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            with gzip.open(gz_folder / f"{name}.gz") as f, open(raw / name, "wb") as out:
                shutil.copyfileobj(f, out)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise UsageError(f"--mnist_gz {gz_folder}: cannot unpack {name}.gz ({first_line(e)}); fetch MNIST's "
                             "four .gz files again") from None


def timed(step: Callable[[], dict]) -> dict:
    """Run one step of the check: its result, or the one-line error that stopped it, and its wall time."""
    start = time.perf_counter()
    try:
        result = dict(step(), ok=True)
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- a failed step is reported and the check goes on
        result = {"ok": False, "error": f"{type(e).__name__}: {first_line(e)}"}
    return dict(result, seconds=time.perf_counter() - start)


def cuda_tests(out_dir: Path) -> dict:
    """pytest on tests/test_cuda.py in a fresh process; the counts from its JUnit XML and the failed tests."""
    xml, log = out_dir / "test_cuda.xml", out_dir / "test_cuda.log"
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py", "--junitxml",
                               str(xml)], cwd=Path(__file__).parent, stdout=f, stderr=subprocess.STDOUT).returncode
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
              or case.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if code != 0:
        raise RuntimeError(f"pytest exited {code}: failed {', '.join(failed) or 'before any test'} (see {log})")
    return dict(counts, failed=failed, log=str(log))


def mnist_sweep(data_root: Path, device: str, out_dir: Path) -> dict:
    """The real MNIST sweep on CUDA; per run its device, precision, test accuracy and seconds per epoch."""
    args = pipeline.get_args_parser().parse_args(SWEEP + ["--device", device, "--data_root", str(data_root),
                                                          "--no-download", "--out_dir", str(out_dir), "--overwrite"])
    with contextlib.redirect_stdout(io.StringIO()):
        runs = pipeline.main(args)
    return {"command": "pipeline.py " + " ".join(SWEEP), "runs": {
        config.run_name: {"device": config.device, "precision": config.precision, "test_acc": history["test"]["acc"],
                          "epoch_seconds": [e["seconds"] for e in history["epochs"]]} for config, history in runs}}


def mnist_bench(data_root: Path, device: str, out: Path) -> dict:
    """bench.py --quick --mnist_only on CUDA: the MLP's rows (images/s)."""
    args = bench.get_args_parser().parse_args(["--device", device, "--data_root", str(data_root), "--no-download",
                                               "--quick", "--mnist_only", "--out", str(out)])
    results = bench.main(args)
    return {"json": str(out), "mlp_images_per_s": {name: row["images_per_s"] for name, row in
                                                    results["mlp"]["rows"].items()}}


def main(args: argparse.Namespace) -> dict:
    """Run the three steps, write the report and print where it is; exit status 1 when a step failed."""
    if not torch.cuda.is_available():  # resolve_device's advice, --device cpu, is no GPU check
        raise UsageError("the GPU check needs a CUDA device, and this machine has none (torch.cuda.is_available() "
                         "is False); run it on a machine with a GPU")
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise UsageError(f"--device {args.device}: the GPU check needs a CUDA device")
    out_dir = Path(args.out_dir)
    check_writable(out_dir, "--out_dir")
    data_root = out_dir / "data"
    unpack_mnist(Path(args.mnist_gz), data_root / "MNIST" / "raw")
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(device),
              "device_count": torch.cuda.device_count(),
              "compute_capability": list(torch.cuda.get_device_capability(device)),
              "amp_precision": amp_precision(device), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    report["test_cuda"] = timed(lambda: cuda_tests(out_dir))
    report["mnist_sweep"] = timed(lambda: mnist_sweep(data_root, str(device), out_dir / "runs"))
    report["bench_mnist"] = timed(lambda: mnist_bench(data_root, str(device), out_dir / "bench.json"))
    write_json(out_dir / "report.json", report)
    failed = [step for step in ("test_cuda", "mnist_sweep", "bench_mnist") if not report[step]["ok"]]
    print(f"wrote {out_dir / 'report.json'}" + (f"; failed: {', '.join(failed)}" if failed else "; every step passed"))
    if failed:
        raise CLIError(f"{', '.join(failed)} failed: " + "; ".join(report[s]["error"] for s in failed))
    return report


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
