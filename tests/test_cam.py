"""Class activation maps: the CAM identity, batching, image sizes, photo reading, and the CLI end to end."""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import cam
import pipeline
import report
import utils
from conftest import ROOT, damage_weights, run_config
from data import DATASETS, load_dataset, normalize
from models import build_model
from runs import RunFiles, load_checkpoint, load_model, save_checkpoint


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(run_config("--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "4",
                                  "--num_levels", "2", "--num_conv_per_level", "2", "--residual_step", "2")).eval()


@pytest.fixture(scope="module")
def checkpoint(cifar_root, tmp_path_factory):
    """A tiny residual CNN trained for one epoch by pipeline.py on the tiny CIFAR-10.

    16 channels, not 4: on the CPU, oneDNN's weight gradient of a channels_last 1x1 stride-2 convolution (the
    shortcut into level 2) with fewer input channels than its block (8 with AVX2, 16 with AVX-512) hangs,
    crashes or is wrong (uxlfoundation/oneDNN#6035).
    """
    out_dir = tmp_path_factory.mktemp("cam_runs")
    pipeline.main(pipeline.get_args_parser().parse_args([
        "--model_name", "ResNet", "--dataset", "CIFAR10", "--data_root", str(cifar_root), "--no-download",
        "--val_size", "50", "--limit_train", "64", "--num_epochs", "1", "--batch_size", "32", "--out_channels",
        "16", "--num_levels", "2", "--num_conv_per_level", "2", "--residual_step", "2", "--stem", "imagenet",
        "--grad_log_every", "0", "--device", "cpu", "--out_dir", str(out_dir), "--run_name", "tiny"]))
    return RunFiles(out_dir / "tiny").checkpoint


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    config = run_config("--dataset", "CIFAR10", "--width", "8", "--num_hidden_layers", "2")
    path = RunFiles(tmp_path_factory.mktemp("mlp")).checkpoint
    save_checkpoint(path, {"model": build_model(config).state_dict(), "optimizer": {}, "epoch": 1,
                                 "config": config.to_dict(), "history": {}})
    return path


@pytest.fixture(scope="module")
def checkpoint_without_lr(checkpoint, tmp_path_factory):
    """The tiny CNN's checkpoint with one setting deleted from its config."""
    saved = load_checkpoint(checkpoint)
    del saved["config"]["lr"]
    path = RunFiles(tmp_path_factory.mktemp("incomplete")).checkpoint
    save_checkpoint(path, saved)
    return path


def run_main(*args: str):
    return cam.main(cam.get_args_parser().parse_args(list(args)))


def run_cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """Run cam.py's CLI path in this process: (exit status, stderr)."""
    try:
        utils.run_cli(cam.main, cam.get_args_parser().parse_args(list(args)))
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_map_mean_plus_bias_is_the_logit(tiny_model):
    images = random_images(4)
    for c in range(10):
        maps, logits = cam.class_activation_maps(tiny_model, images, [c] * 4)
        assert maps.shape == (4, 16, 16)
        torch.testing.assert_close(maps.mean((1, 2)) + tiny_model.fc.bias[c], logits[:, c], atol=1e-4, rtol=0)


def test_batch_matches_one_by_one_and_honours_each_target(tiny_model):
    images = random_images(5, seed=1)
    classes = torch.tensor([3, 0, 9, 3, 7])
    maps, logits = cam.class_activation_maps(tiny_model, images, classes)
    for i in range(5):
        one, one_logits = cam.class_activation_maps(tiny_model, images[i:i + 1], classes[i:i + 1])
        torch.testing.assert_close(one[0], maps[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one_logits[0], logits[i], atol=1e-5, rtol=1e-5)
    fixed = torch.stack([cam.class_activation_maps(tiny_model, images, [c] * 5)[0][i] for i, c in enumerate(classes)])
    torch.testing.assert_close(maps, fixed)
    predicted, _ = cam.class_activation_maps(tiny_model, images)
    torch.testing.assert_close(predicted, cam.class_activation_maps(tiny_model, images, logits.argmax(1))[0])


def test_normalize_maps_range_and_constant_map():
    maps = torch.stack([torch.arange(12.0).view(3, 4) - 5, torch.full((3, 4), 2.5)])
    out = cam.normalize_maps(maps)
    assert out[0].min() == 0 and out[0].max() == 1
    assert torch.equal(out[1], torch.zeros(3, 4))
    heatmaps = cam.colorize(out)
    assert heatmaps.dtype == torch.uint8 and heatmaps.shape == (2, 3, 4, 3)


def test_colorize_is_rgb_jet_and_overlay_blends():
    heat = cam.colorize(torch.tensor([[[0.0, 1.0]]]))
    assert heat[0, 0, 0].tolist() == [0, 0, 127]  # jet starts dark blue: blue is the last RGB channel
    assert heat[0, 0, 1].tolist() == [127, 0, 0]  # and ends dark red
    image = torch.full((1, 1, 2, 3), 200, dtype=torch.uint8)
    assert torch.equal(cam.overlay(image, heat, 0.0), image)
    assert torch.equal(cam.overlay(image, heat, 1.0), heat)
    assert cam.overlay(image, heat, 0.5)[0, 0, 0].tolist() == [100, 100, 164]


@pytest.mark.parametrize("size", [(45, 77), (256, 256), (32, 32)])
def test_render_keeps_the_image_size(tiny_model, size):
    maps, _ = cam.class_activation_maps(tiny_model, random_images(2))
    images = torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    heatmaps, mixes = cam.render(images, maps, 0.5)
    assert heatmaps.shape == mixes.shape == (2, *size, 3)
    assert heatmaps.dtype == mixes.dtype == torch.uint8
    heatmaps, mixes = cam.render(images, torch.zeros(2, 4, 4), 0.5)  # a constant map: finite, valid, blue
    assert (heatmaps == torch.tensor([0, 0, 127], dtype=torch.uint8)).all()


def test_to_display_repeats_pixels_and_greys_become_rgb():
    grey = torch.arange(6, dtype=torch.uint8).view(1, 1, 2, 3)
    shown = cam.to_display(grey, 4)
    assert shown.shape == (1, 8, 12, 3)
    assert torch.equal(shown[0, ::4, ::4], grey[0, 0, :, :, None].expand(2, 3, 3))
    assert torch.equal(shown[0, 4:8, 8:12], torch.full((4, 4, 3), 5, dtype=torch.uint8))


def test_upsample_is_smooth_and_exact_in_size():
    maps = torch.tensor([[[0.0, 1.0], [1.0, 2.0]]])
    up = cam.upsample(maps, (45, 77))
    assert up.shape == (1, 45, 77)
    assert up.min() >= 0 and up.max() <= 2 and len(up.unique()) > 4  # interpolated, not repeated blocks


@pytest.mark.parametrize("mode,channels,expect", [("LA", 3, "RGB"), ("RGBA", 1, "L"), ("P", 3, "RGB"),
                                                  ("CMYK", 3, "RGB"), ("1", 1, "L"), ("I;16", 1, "L")])
def test_load_photo_converts_any_mode(tmp_path, mode, channels, expect):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 77, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode not in ("LA", "I;16") else None
    if mode == "LA":
        image = Image.merge("LA", (rgb.convert("L"), Image.new("L", rgb.size, 0)))  # fully transparent
    if mode == "I;16":
        image = Image.fromarray(np.full((45, 77), 40000, dtype=np.uint16))
    path = tmp_path / ("photo.jpg" if mode == "CMYK" else "photo.png")
    image.save(path)
    photo = cam.load_photo(path, channels)
    assert photo.mode == expect and photo.size == (77, 45)
    if mode == "LA":  # transparent pixels are composited on white
        assert np.asarray(photo).min() == 255
    if mode == "I;16":  # scaled from 16 bits, not clipped to white
        assert np.asarray(photo).max() == round(40000 / 257)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces a size but holds no pixels: enough for PIL's size checks, which run before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"") + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(20_000, 20_000), (8_000, 7_000)])
def test_load_photo_refuses_huge_images(tmp_path, width, height):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(width, height))
    with pytest.raises(utils.UsageError, match="more than 50,000,000 pixels"):
        cam.load_photo(path, 3)


def test_cli_test_set_writes_the_documented_files(checkpoint, cifar_root, tmp_path):
    out_dir = tmp_path / "cam"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    written = run_main("--checkpoint", str(checkpoint), "--data_root", str(cifar_root), "--no-download",
                       "--num-images-to-save", "8", "--batch_size", "3", "--device", "cpu", "--out_dir", str(out_dir))
    _, model = load_model(checkpoint)
    model.eval()
    raw = load_dataset("CIFAR10", cifar_root, download=False)
    predictions = model(normalize(raw.test_images[:8], DATASETS["CIFAR10"])).argmax(1).tolist()
    names = DATASETS["CIFAR10"].classes
    expected = {f"{i}_{kind}_{names[raw.test_labels[i]]}_p_{names[p]}_{i}.png"
                for i, p in enumerate(predictions) for kind in ("orig", "actv_map", "mix")}
    assert {p.name for p in out_dir.iterdir()} == expected | {"cam_grid.png", "notes.txt"}
    assert {p.name for p in written} == expected | {"cam_grid.png"}
    assert (out_dir / "notes.txt").read_text() == "mine"
    for name in expected:
        with Image.open(out_dir / name) as image:
            assert image.mode == "RGB" and image.size == (256, 256)
    with Image.open(out_dir / f"0_orig_{names[raw.test_labels[0]]}_p_{names[predictions[0]]}_0.png") as image:
        shown = np.asarray(image)[::8, ::8].transpose(2, 0, 1)
    assert np.array_equal(shown, raw.test_images[0].numpy())  # the test image itself, each pixel 8 x 8


def test_cli_indices_and_true_class(checkpoint, cifar_root, tmp_path):
    written = run_main("--checkpoint", str(checkpoint), "--data-root", str(cifar_root), "--no-download",
                       "--indices", "0", "1", "3", "6", "--class", "true", "--device", "cpu",
                       "--out-dir", str(tmp_path))
    assert len(written) == 13 and {p.name.split("_")[0] for p in written} == {"0", "1", "3", "6", "cam"}
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in written}


@pytest.mark.parametrize("name,make", [
    ("grey_alpha.png", lambda: Image.merge("LA", (Image.linear_gradient("L").resize((77, 45)),
                                                  Image.new("L", (77, 45), 128)))),
    ("photo.jpg", lambda: Image.radial_gradient("L").resize((45, 77)).convert("RGB")),
])
def test_cli_photo_keeps_every_pixel(checkpoint, tmp_path, name, make):
    make().save(tmp_path / name)
    out_dir = tmp_path / "out"
    written = run_main("--saved_model", str(checkpoint), "--image", str(tmp_path / name), "--device", "cpu",
                       "--out_dir", str(out_dir), *(["--label", "cat"] if name.endswith("jpg") else []))
    label = "cat" if name.endswith("jpg") else "grey_alpha"  # without --label, the photo's own name
    assert {p.name for p in out_dir.iterdir()} == {p.name for p in written}
    assert len(written) == 3 and all(p.name.startswith(f"single_{kind}_{label}_p_")
                                      for p, kind in zip(written, ("orig", "actv_map", "mix")))
    with Image.open(tmp_path / name) as photo:
        size = photo.size
    for path in written:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == size


def test_cli_faithfulness_writes_the_table_json_and_curves(checkpoint, cifar_root, tmp_path, capsys):
    args = ["--checkpoint", str(checkpoint), "--data_root", str(cifar_root), "--no-download", "--faithfulness", "6",
            "--batch_size", "4", "--device", "cpu"]
    written = run_main(*args, "--out_dir", str(tmp_path / "a"))
    assert [p.name for p in written] == ["faithfulness.json", "faithfulness_curves.png"]
    assert {p.name for p in (tmp_path / "a").iterdir()} == {p.name for p in written}  # no CAM PNGs
    out = capsys.readouterr().out
    assert "first 6 CIFAR10 test images" in out
    for label in ("| CAM |", "| random |", "| centred Gaussian |"):
        assert out.count(label) == 1
    record = json.loads((tmp_path / "a" / "faithfulness.json").read_text())
    assert record["num_images"] == 6 and record["dataset"] == "CIFAR10" and len(record["fractions"]) == 21
    assert set(record["maps"]) == {"cam", "random", "centre"}
    for row in record["maps"].values():
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
        assert 0 <= row["average_drop_percent"] <= 100 and len(row["deletion_curve"]) == 21
    run_main(*args, "--out_dir", str(tmp_path / "b"))  # the random map is seeded: the same numbers again
    again = json.loads((tmp_path / "b" / "faithfulness.json").read_text())
    assert again["maps"] == record["maps"]
    # report.py makes the README's block of the same table from the file
    block = report.main(report.get_args_parser().parse_args(["--faithfulness", str(written[0])]))["ex3-faithfulness"]
    table, what = block.split("\n\n")
    assert table in out
    assert what == f"6 CIFAR10 test images, maps of the predicted class, model {checkpoint.parent.name}."


GOOD_ROW = {"label": "CAM", "deletion_auc": 0.2, "deletion_auc_sem": 0.01, "insertion_auc": 0.7,
            "insertion_auc_sem": None, "average_drop_percent": 30.0, "increase_in_confidence_percent": 5.0}
GOOD_RECORD = {"checkpoint": "a/b.pt", "dataset": "CIFAR10", "class": "pred", "num_images": 5,
               "maps": {"cam": GOOD_ROW, "random": dict(GOOD_ROW, label="random")}}


@pytest.mark.parametrize("content,problem", [
    ("not json", "not JSON"), ('{"maps": {}}', "no checkpoint, dataset, class, num_images"),
    (dict(GOOD_RECORD, checkpoint=3), "not strings"), (dict(GOOD_RECORD, maps={}), "it measured no map"),
    # impossible values once went into the README's table: nan, inf%, -5 test images, a map twice
    (dict(GOOD_RECORD, maps={"cam": dict(GOOD_ROW, deletion_auc=float("nan"))}), "deletion_auc nan is not a number"),
    (dict(GOOD_RECORD, maps={"cam": dict(GOOD_ROW, average_drop_percent=float("inf"))}), "average_drop_percent inf"),
    (dict(GOOD_RECORD, num_images=-5), "num_images -5 is not a positive integer"),
    (dict(GOOD_RECORD, maps={"cam": GOOD_ROW, "cam2": GOOD_ROW}), "two maps share a label"),
    pytest.param(bytes(range(128, 256)), "not JSON: 'utf-8' codec can't decode", id="binary"),  # a traceback once
    pytest.param(b"[" * 100_000, "not JSON: maximum recursion depth exceeded", id="nested_too_deep"),  # the same
])
def test_report_refuses_a_file_that_is_not_a_faithfulness_json(tmp_path, content, problem):
    path = tmp_path / "faithfulness.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(utils.UsageError, match="is not a faithfulness.json of cam.py --faithfulness") as refused:
        report.main(report.get_args_parser().parse_args(["--faithfulness", str(path)]))
    assert problem in str(refused.value)


def test_report_reads_a_well_formed_faithfulness_json_and_says_when_there_is_none(tmp_path):
    path = tmp_path / "faithfulness.json"
    path.write_text(json.dumps(GOOD_RECORD))
    block = report.main(report.get_args_parser().parse_args(["--faithfulness", str(path)]))["ex3-faithfulness"]
    assert "| CAM | 0.200 ± 0.010 | 0.700 ± n/a | 30.0% | 5.0% |" in block and block.endswith("model a.")
    with pytest.raises(utils.UsageError, match="missing.json: No such file or directory$"):
        report.main(report.get_args_parser().parse_args(["--faithfulness", str(tmp_path / "missing.json")]))


def test_cli_photo_honours_the_exif_orientation(checkpoint, tmp_path):
    """A phone photo stored landscape, red left and blue right, tagged "rotate 90 degrees clockwise to view" (EXIF
    orientation 6): cam.py must explain and save it upright, portrait with red on top."""
    stored = Image.new("RGB", (40, 20), "blue")
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    written = run_main("--checkpoint", str(checkpoint), "--image", str(tmp_path / "phone.jpg"), "--device", "cpu",
                       "--out_dir", str(tmp_path / "out"))
    for path in written:
        with Image.open(path) as image:
            assert image.size == (20, 40), path.name
    with Image.open(written[0]) as image:
        upright = np.asarray(image).astype(int)
    top, bottom = upright[:18].reshape(-1, 3).mean(0), upright[22:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, (top, bottom)


def test_help_states_defaults_and_dashed_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cam.get_args_parser().parse_args(["-h"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--num-images-to-save" in out and "--saved_model" in out and "(default: 0.5)" in out


def test_cli_class_by_name_or_index_maps_that_class(checkpoint, cifar_root, tmp_path):
    _, model = load_model(checkpoint)
    model.eval()
    raw = load_dataset("CIFAR10", cifar_root, download=False)
    images = raw.test_images[:2]
    with torch.no_grad():
        predicted = model(normalize(images, DATASETS["CIFAR10"])).argmax(1)
    target = (predicted[0].item() + 1) % 10  # a class whose map is not the prediction's, for image 0 at least
    maps, _ = cam.class_activation_maps(model, normalize(images, DATASETS["CIFAR10"]), [target, target])
    expected, _ = cam.render(cam.to_display(images, 8), maps, 0.5)
    for choice in (DATASETS["CIFAR10"].classes[target], str(target)):
        written = run_main("--checkpoint", str(checkpoint), "--data_root", str(cifar_root), "--no-download",
                           "--indices", "0", "1", "--class", choice, "--device", "cpu",
                           "--out_dir", str(tmp_path / choice))
        maps_written = sorted((p for p in written if "_actv_map_" in p.name), key=lambda p: p.name)
        for path, heatmap in zip(maps_written, expected):
            with Image.open(path) as image:
                assert np.array_equal(np.asarray(image), heatmap.numpy()), (choice, path.name)
        assert len(maps_written) == 2


def test_a_map_of_another_class_never_shares_a_file_with_the_prediction_s(checkpoint, cifar_root, tmp_path):
    """The lab's names say only the true and the predicted class; a map of another class (--class) once replaced the
    prediction's map under the same name."""
    _, model = load_model(checkpoint)
    with torch.no_grad():
        image = load_dataset("CIFAR10", cifar_root, download=False).test_images[:1]
        predicted = model.eval()(normalize(image, DATASETS["CIFAR10"])).argmax(1).item()
    other = DATASETS["CIFAR10"].classes[(predicted + 1) % 10]
    common = ["--checkpoint", str(checkpoint), "--data_root", str(cifar_root), "--no-download", "--indices", "0",
              "--device", "cpu", "--out_dir", str(tmp_path)]
    lab = {p.name for p in run_main(*common)}
    grid = (tmp_path / "cam_grid.png").read_bytes()
    mapped = {p.name for p in run_main(*common, "--class", other)}
    true = {p.name for p in run_main(*common, "--class", "true")}
    assert len(lab) == len(mapped) == 4 and all(name.endswith("_0.png") for name in lab - {"cam_grid.png"})
    assert all(name.endswith(f"_map_{other}.png") for name in mapped) and f"cam_grid_map_{other}.png" in mapped
    assert "cam_grid_map_true.png" in true
    assert lab | mapped | true <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "cam_grid.png").read_bytes() == grid  # the predictions' grid, as the first command drew it


def error_cases(tmp_path, checkpoint, mlp_checkpoint, checkpoint_without_lr,
                cifar_root) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), "red").save(photo)
    (tmp_path / "cut.png").write_bytes(photo.read_bytes()[:60])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    data = ["--data_root", str(cifar_root), "--no-download", "--device", "cpu"]
    ckpt = ["--checkpoint", str(checkpoint), "--out_dir", str(tmp_path / "out"), *data]
    return {
        "missing checkpoint": (["--checkpoint", str(tmp_path / "nope.pt"), *data], "no such file"),
        "not a checkpoint": (["--checkpoint", str(tmp_path / "garbage.pt"), *data], "not a loadable checkpoint"),
        "MLP": (["--checkpoint", str(mlp_checkpoint), *data], "holds an MLP"),
        "config without lr": (["--checkpoint", str(checkpoint_without_lr), *data], "missing lr"),
        "empty image": ([*ckpt, "--image", str(tmp_path / "empty.png")], "cannot read it as an image"),
        "image is a folder": ([*ckpt, "--image", str(tmp_path)], "a folder, not an image file"),  # said "no such file"
        "not an image": ([*ckpt, "--image", str(tmp_path / "notes.txt")], "cannot read it as an image"),
        "truncated image": ([*ckpt, "--image", str(tmp_path / "cut.png")], "cannot read it as an image"),
        "index": ([*ckpt, "--indices", "3", "100"], "test set has images 0 to 99"),
        "class name": ([*ckpt, "--class", "unicorn"], "--class 'unicorn'"),
        "alpha": ([*ckpt, "--alpha", "1.5"], "--alpha"),
        "out_dir is a file": ([*ckpt, "--out_dir", str(tmp_path / "notes.txt")], "is not a folder"),
        "display_scale huge": ([*ckpt, "--display_scale", "2000"], "--display_scale must be between 1 and 16"),
        "display_scale 0": ([*ckpt, "--display_scale", "0"], "--display_scale must be between 1 and 16"),
        "faithfulness 0": ([*ckpt, "--faithfulness", "0"], "--faithfulness must be a positive number"),
        "faithfulness beyond the test set": ([*ckpt, "--faithfulness", "101"], "test set has 100 images"),
        "faithfulness of a photo": ([*ckpt, "--faithfulness", "5", "--image", str(photo)], "does not use --image;"),
        # a flag of another mode would be silently ignored
        "faithfulness with an overlay": ([*ckpt, "--faithfulness", "5", "--alpha", "0.3"], "does not use --alpha;"),
        "photo enlarged": ([*ckpt, "--image", str(photo), "--display_scale", "8"], "does not use --display_scale;"),
        "photo and indices": ([*ckpt, "--image", str(photo), "--indices", "1"], "does not use --indices;"),
        "indices and a count": ([*ckpt, "--indices", "1", "--num_images_to_save", "3"],
                                "does not use --num_images_to_save;"),
        "test images with a label": ([*ckpt, "--label", "cat", "--class", "true"], "does not use --label;"),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "MLP", "config without lr", "empty image",
                                  "image is a folder",
                                  "not an image", "truncated image", "index", "class name", "alpha",
                                  "out_dir is a file", "display_scale huge", "display_scale 0", "faithfulness 0",
                                  "faithfulness beyond the test set", "faithfulness of a photo",
                                  "faithfulness with an overlay", "photo enlarged", "photo and indices",
                                  "indices and a count", "test images with a label"])
def test_errors_exit_2_with_one_line(capsys, tmp_path, checkpoint, mlp_checkpoint, checkpoint_without_lr, cifar_root,
                                     case):
    args, message = error_cases(tmp_path, checkpoint, mlp_checkpoint, checkpoint_without_lr, cifar_root)[case]
    status, err = run_cli_in_process(capsys, *args)
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["cam_grid.png", "faithfulness.json"])
def test_a_folder_where_an_output_file_belongs_is_one_line(capsys, tmp_path, checkpoint, cifar_root, output):
    """It was an IsADirectoryError traceback, after the maps were computed."""
    (tmp_path / "out" / output).mkdir(parents=True)
    mode = ["--faithfulness", "2"] if output == "faithfulness.json" else ["--indices", "0"]
    status, err = run_cli_in_process(capsys, "--checkpoint", str(checkpoint), "--data_root", str(cifar_root),
                                     "--no-download", "--device", "cpu", "--out_dir", str(tmp_path / "out"), *mode)
    assert status == 2 and err.count("\n") == 1 and err.endswith(
        f"error: {tmp_path / 'out' / output} is a folder where a file is written; move it away and run the command "
        "again\n"), err
    assert (tmp_path / "out" / output).is_dir()


def test_cli_subprocess_refuses_an_mlp(tmp_path, mlp_checkpoint):
    result = subprocess.run([sys.executable, "cam.py", "--checkpoint", str(mlp_checkpoint), "--out_dir",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("cam.py: error: CAM needs a convolutional network ending in global average pooling and "
                             f"one linear layer; {mlp_checkpoint} holds an MLP\n")
    assert not (tmp_path / "out").exists()


def test_the_model_of_an_unfinished_run_is_named_as_such(checkpoint, tmp_path, capsys):
    saved = load_checkpoint(checkpoint)
    saved["config"]["num_epochs"] = saved["epoch"] + 4  # as a longer run saves it before its last epoch
    save_checkpoint(tmp_path / "cut.pt", saved)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), "red").save(photo)
    run_main("--checkpoint", str(tmp_path / "cut.pt"), "--image", str(photo), "--device", "cpu", "--out_dir",
             str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert f"is the model of tiny, unfinished: {saved['epoch']} of {saved['epoch'] + 4} epochs" in out


@pytest.mark.parametrize("command", ["cam", "no-train", "best_checkpoint"])
def test_a_damaged_checkpoint_is_refused_in_one_line_by_every_command_that_loads_it(checkpoint, cifar_root, tmp_path,
                                                                                  capsys, command):
    """40 bytes flipped inside the weights: torch.load reads the file, and cam.py once drew the maps of weights no
    run trained; the checksum saved with it tells, and the refusal says what is still good."""
    shutil.copytree(checkpoint.parent.parent, tmp_path / "runs")
    damaged = tmp_path / "runs" / checkpoint.parent.name / checkpoint.name
    damage_weights(damaged, "fc.weight")
    main, parser, line = {
        "cam": (cam.main, cam.get_args_parser(), ["--checkpoint", str(damaged), "--data_root", str(cifar_root),
                                                  "--no-download", "--device", "cpu", "--out_dir", str(tmp_path)]),
        "no-train": (pipeline.main, pipeline.get_args_parser(), ["--no-train", "--checkpoint", str(damaged),
                                                                 "--data_root", str(cifar_root), "--no-download"]),
        "best_checkpoint": (report.main, report.get_args_parser(), ["--best_checkpoint", str(tmp_path / "runs")])}[
        command]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main, parser.parse_args(line))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert f"{damaged} is damaged" in lines[0] and "history.json and figures are unaffected" in lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--label", "a\tb"], "--label 'a\\tb' holds a control character"),
    (["--label", "  "], "--label '  ' is empty or blanks only"),
    (["--label", "x" * 151], "--label 'xxx"),
    (["--label", os.fsdecode(b"caf\xe9")], "holds bytes that are not text (UTF-8)"),
    ([], "--image's file name 'ppp"),  # a photo named with 200 characters: the files named after it would not fit
])
def test_a_label_that_cannot_name_a_file_is_refused_in_one_line(checkpoint, tmp_path, capsys, flags, message):
    """A 300-byte --label was an OSError traceback (file name too long) once the map was computed."""
    photo = tmp_path / f"{'p' * 200}.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(photo)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(cam.main, cam.get_args_parser().parse_args(
            ["--checkpoint", str(checkpoint), "--image", str(photo), "--device", "cpu", "--out_dir",
             str(tmp_path / "cam"), *flags]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "cam").exists()


def test_temporary_files_of_a_killed_cam_py_are_removed_by_the_next(checkpoint, tmp_path):
    """Those of a writer that no longer runs; a running writer's (here this process's) is its own."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    out_dir = tmp_path / "cam"
    out_dir.mkdir()
    left = out_dir / f".single_mix_photo_p_cat.png.{finished.pid}.k2j4x.tmp"
    running = out_dir / f".cam_grid.png.{os.getpid()}.a1b2.tmp"
    for path in (left, running):
        path.write_bytes(b"half an image")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(photo)
    cam.main(cam.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--image", str(photo), "--device",
                                               "cpu", "--out_dir", str(out_dir)]))
    assert not left.exists() and running.exists()
