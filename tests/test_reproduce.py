"""`make reproduce` end to end at toy size, from a data folder that holds only what the suite downloads."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, write_cifar10, write_mnist
from runs import RunFiles
from test_report import cnn, write_run

# 5 batches an epoch: OneCycleLR divides by zero when its 30% warm-up rounds to a single step (4 batches or fewer)
TOY = {"EPOCHS": "1", "IMAGES": "640", "VAL_SIZE": "100", "JOBS": "1",
       "EX1_DEPTHS": "2 4", "EX1_SEEDS": "0",
       "EX1_GRADIENT_FIGURES": "gradients_mlp_d4.png gradients_mlp_d4_res2.png gradients_mlp_d22.png",
       "EX2_CONVS": "2", "EX2_SEEDS": "0", "EX2_GRADIENT_FIGURES": "Conv_gradients_d8.png",
       "FAITHFULNESS": "2"}
# the figures README.md shows from img_show/ whose names do not depend on the depths or the predictions
FIXED_FIGURES = ("mlp_training_loss.png", "mlp_Val_acc.png", "mlp_trainability.png", "Conv_train_loss.png",
                 "Conv_val_accuracy.png", "cam/cam_grid.png")


def folder_digest(folder) -> str:
    """A digest of every file's path and bytes under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.longest
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reproduce_at_toy_size_puts_figures_cam_files_and_tables_where_the_readme_says(tmp_path):
    data = write_cifar10(write_mnist(tmp_path / "data", n_train=800), n_per_batch=150, n_test=100)
    assert sorted(p.name for p in data.iterdir()) == ["MNIST", "cifar-10-batches-py"]
    img_show, runs, before = tmp_path / "img_show", tmp_path / "runs", folder_digest(ROOT / "img_show")
    variables = dict(TOY, PY=sys.executable, DATA_ROOT=str(data), RUNS=str(runs), IMG_SHOW=str(img_show))
    done = subprocess.run(["make", "-o", ".venv/.installed", "reproduce", *(f"{k}={v}" for k, v in variables.items())],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    readme = (ROOT / "README.md").read_text()
    for name in FIXED_FIGURES:
        assert f"img_show/{name}" in readme and (img_show / name).is_file(), name
    for name in TOY["EX1_GRADIENT_FIGURES"].split()[:2] + [TOY["EX2_GRADIENT_FIGURES"]]:
        assert (img_show / name).is_file(), name
    # a depth the toy sweep left out: named, not copied, and the reproduction goes on
    assert f"not copied: {runs}/ex1/plots/gradients_mlp_d22.png (this sweep did not draw it" in done.stdout
    assert not (img_show / "gradients_mlp_d22.png").exists()
    for i in range(8):  # {i}_orig_{true}_p_{pred}_{i}.png, the map and the overlay, as the README names them
        for kind in ("orig", "actv_map", "mix"):
            assert len(list((img_show / "cam").glob(f"{i}_{kind}_*_p_*_{i}.png"))) == 1, (i, kind)
    assert len(list((img_show / "cam").glob("single_mix_cat_p_*.png"))) == 1
    assert (img_show / "cam" / "faithfulness.json").is_file()
    assert "<!-- report:ex1 -->" in done.stdout and "<!-- report:ex2-checks -->" in done.stdout
    assert re.search(r"^\| 4 \| [01]/1 \|", done.stdout, re.M)  # the tables of both exercises, printed
    assert "| depth 8, residual (step 2, identity shortcuts) |" in done.stdout
    assert folder_digest(ROOT / "img_show") == before  # the repository's figures are never touched by a test


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_reproduce_ex3_puts_the_earlier_maps_back_when_a_step_fails(tmp_path):
    """It removed runs/.../ex3 first, so a cam.py that then failed (here on the best run's damaged checkpoint) left
    nothing of the earlier maps and faithfulness results."""
    runs = tmp_path / "runs"
    write_run(runs / "ex2", cnn(1, 1), [2.0], [0.5], 0.5)
    RunFiles(runs / "ex2" / cnn(1, 1).run_name).checkpoint.write_bytes(b"not a checkpoint")
    (runs / "ex3").mkdir()
    (runs / "ex3" / "faithfulness.json").write_text("the earlier results")
    done = subprocess.run(["make", "-o", ".venv/.installed", "reproduce-ex3", f"PY={sys.executable}", f"RUNS={runs}",
                           f"IMG_SHOW={tmp_path / 'img_show'}", f"DATA_ROOT={tmp_path / 'data'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "not a loadable checkpoint" in done.stderr, done.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["ex2", "ex3"]
    assert [p.name for p in (runs / "ex3").iterdir()] == ["faithfulness.json"]
    assert (runs / "ex3" / "faithfulness.json").read_text() == "the earlier results"
    assert not (tmp_path / "img_show").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reproduce_fast_at_toy_size_trains_the_recipe_and_draws_time_to_accuracy(tmp_path):
    data = write_cifar10(tmp_path / "data", n_per_batch=150, n_test=100)
    img_show, runs = tmp_path / "img_show", tmp_path / "runs"
    variables = dict(PY=sys.executable, DATA_ROOT=str(data), RUNS=str(runs), IMG_SHOW=str(img_show), EPOCHS="2",
                     IMAGES="640", FAST_SEEDS="0", FAST_CONVS="1")
    done = subprocess.run(["make", "-o", ".venv/.installed", "reproduce-fast",
                           *(f"{k}={v}" for k, v in variables.items())],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(p.name for p in runs.joinpath("fast").iterdir())
    assert names == ["plots", "resnet_cifar10_d20_c16x3_res2_s0", "resnet_cifar10_d5_c16x3_plain_s0",
                     "resnet_cifar10_d5_c16x3_res2_s0"]
    assert (img_show / "time_to_accuracy.png").stat().st_size > 10_000
    assert "<!-- report:fast -->" in done.stdout
    assert "| depth 20, residual (step 2, identity shortcuts) | 1 |" in done.stdout
