"""The sweep figures: their file names, and gradient figures that share one y range so they can be compared."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import plots
import utils
from conftest import ROOT, run_config
from models import build_model
from train import logged_weights


def fake_run(config, norms: np.ndarray) -> tuple:
    """(config, history, (steps, gradient norms)) of a 2-epoch run whose first weights (those of the config's real
    model, in its order) had these gradient norms, a row each."""
    history = {"epochs": [{"train_loss": 2.0, "val_acc": 0.2}, {"train_loss": 1.0, "val_acc": 0.5}],
               "test": {"loss": 1.0, "acc": 0.5}}
    names = list(logged_weights(build_model(config)))
    return config, history, (list(range(norms.shape[1])), dict(zip(names, norms)))


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """Every figure plots.py saves, by file name (the files are written too)."""
    saved = {}
    real_savefig = plots.savefig

    def recording_savefig(fig, path):
        saved[path.name] = fig
        real_savefig(fig, path)
    monkeypatch.setattr(plots, "savefig", recording_savefig)
    return saved


def assert_shared_y_range(figures: list, series: list[np.ndarray]) -> None:
    """Every axes of every figure has the same y range, and it holds every series (zeros at the floor)."""
    ranges = {ax.get_ylim() for fig in figures for ax in fig.axes}
    assert len(ranges) == 1
    low, high = ranges.pop()
    values = np.maximum(np.concatenate(series), plots.GRAD_FLOOR)
    assert low <= values.min() and values.max() <= high


def test_mlp_sweep_figures_are_named_by_hidden_layers_shortcuts_and_width(tmp_path, figures):
    small = np.geomspace(1e-3, 1e-1, 4 * 7).reshape(7, 4)  # 7 weight layers, 4 logged steps
    vanished = np.zeros((7, 4))
    large = np.geomspace(1, 10, 4 * 7).reshape(7, 4)
    runs = [fake_run(run_config("--num_hidden_layers", "5", "--width", "8", "--seed", "0"), vanished),
            fake_run(run_config("--num_hidden_layers", "5", "--width", "8", "--seed", "1"), small),
            fake_run(run_config("--num_hidden_layers", "4", "--residual_step", "2", "--width", "8"), small),
            fake_run(run_config("--num_hidden_layers", "4", "--residual_step", "2", "--width", "16"), large)]
    paths = plots.plot_sweep(runs, tmp_path)
    gradients = ["gradients_mlp_d5_w8.png", "gradients_mlp_d4_res2_w8.png", "gradients_mlp_d4_res2_w16.png"]
    heatmaps = [f"gradient_heatmap_{runs[i][0].run_name}.png" for i in (0, 2, 3)]  # seed 0 of each network
    assert sorted(p.name for p in paths) == sorted(["mlp_training_loss.png", "mlp_Val_acc.png",
                                                    "mlp_trainability.png", *gradients, *heatmaps])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert [ax.get_title() for ax in figures["gradients_mlp_d5_w8.png"].axes] == ["seed 0", "seed 1"]
    # the figure with vanished gradients draws the clipped floor too, and says so once
    assert {name: [len(ax.lines) for ax in figures[name].axes] for name in gradients} == {
        gradients[0]: [plots.GRAD_PLOT_LAYERS + 1] * 2, gradients[1]: [plots.GRAD_PLOT_LAYERS],
        gradients[2]: [plots.GRAD_PLOT_LAYERS]}
    assert [[t.get_text() for t in figures[name].legends[0].get_texts()] for name in gradients[:2]] == [
        ["input layer", "hidden layer 1", "hidden layer 2", "hidden layer 3", "hidden layer 4",
         "clipped: norms below 1e-20 drawn at it"],
        ["input layer", "hidden layer 1", "hidden layer 2", "hidden layer 3", "hidden layer 4"]]
    first_layers = [s[:plots.GRAD_PLOT_LAYERS] for s in (vanished, small, large)]
    assert_shared_y_range([figures[name] for name in gradients], first_layers)


def test_cnn_sweep_figures_are_named_by_depth_and_share_the_y_range(tmp_path, figures):
    cnn = ("--model_name", "ResNet", "--out_channels", "4", "--num_levels", "1")
    first_conv = [np.full((3, 5), 1e-4), np.full((3, 5), 2.0), np.full((3, 5), 0.5), np.full((3, 5), 30.0)]
    runs = [fake_run(run_config(*cnn, "--num_conv_per_level", convs, "--residual_step", step), norms)
            for (convs, step), norms in zip([("1", "0"), ("1", "1"), ("3", "0"), ("3", "1")], first_conv)]
    paths = plots.plot_sweep(runs, tmp_path)
    assert sorted(p.name for p in paths if not p.name.startswith("gradient_heatmap_")) == [
        "Conv_gradients_d3.png", "Conv_gradients_d5.png", "Conv_train_loss.png", "Conv_val_accuracy.png"]
    assert [len(figures[name].axes[0].lines) for name in ("Conv_gradients_d3.png", "Conv_gradients_d5.png")] == [2, 2]
    assert_shared_y_range([figures["Conv_gradients_d3.png"], figures["Conv_gradients_d5.png"]],
                          [s[0] for s in first_conv])


@pytest.mark.parametrize("family", ["MLP", "ResNet"])
def test_a_sweep_without_gradient_logs_draws_the_figures_that_need_none_and_removes_its_old_ones(tmp_path, family):
    """The same runs replaced by runs that log no gradient norms (--overwrite --grad_log_every 0): the gradient
    figures drawn from the old runs go, and nothing else in the folder does."""
    flags = ("--num_hidden_layers", "2") if family == "MLP" else ("--model_name", "ResNet", "--out_channels", "4",
                                                                   "--num_levels", "1", "--num_conv_per_level", "1")
    drawn = plots.plot_sweep([fake_run(run_config(*flags), np.ones((3, 4)))], tmp_path)
    assert any(p.name.startswith("gradient_heatmap_") for p in drawn)
    (tmp_path / "gradient_heatmap_of_another_sweep.png").write_bytes(b"mine")
    (tmp_path / "notes.txt").write_text("mine")
    runs = [fake_run(run_config(*flags, "--grad_log_every", "0"), np.zeros((4, 0)))]
    curves = ["mlp_training_loss.png", "mlp_Val_acc.png", "mlp_trainability.png"] if family == "MLP" else [
        "Conv_train_loss.png", "Conv_val_accuracy.png"]
    assert [p.name for p in plots.plot_sweep(runs, tmp_path)] == curves
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(curves + ["gradient_heatmap_of_another_sweep.png",
                                                                          "notes.txt"])


def test_curves_give_each_network_one_colour_and_each_seed_its_own_line(tmp_path, figures):
    cnn = ("--model_name", "ResNet", "--out_channels", "4", "--num_levels", "1")
    runs = [fake_run(run_config(*cnn, "--num_conv_per_level", convs, "--residual_step", step, "--seed", seed),
                     np.ones((3, 2)))
            for convs in ("1", "3") for step in ("0", "1") for seed in ("0", "1", "2")
            if convs == "1" or seed == "0"]
    plots.plot_sweep(runs, tmp_path)
    plain, residual = figures["Conv_train_loss.png"].axes
    assert (plain.get_title(), residual.get_title()) == ("plain", "residual (step 1)")
    colours = [[line.get_color() for line in ax.lines] for ax in (plain, residual)]
    assert colours[0] == colours[1]  # a depth has the same colour in both panels
    assert [len(set(colours[0][i:i + 3])) for i in (0, 3)] == [1, 1]  # the 3 seeds of a network: one colour
    assert colours[0][0] != colours[0][3]
    legend = figures["Conv_train_loss.png"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["depth 3: 3 seeds", "depth 5: 1 seed"]
    gradients = figures["Conv_gradients_d3.png"]
    assert [t.get_text() for t in gradients.legends[0].get_texts()] == ["plain, 3 seeds", "residual (step 1), 3 seeds"]
    assert len({line.get_color() for line in gradients.axes[0].lines}) == 2 and len(gradients.axes[0].lines) == 6


def test_layers_are_named_in_words_from_input_to_output():
    mlp = list(logged_weights(build_model(run_config("--num_hidden_layers", "4", "--residual_step", "2"))))
    assert plots.layer_names(mlp) == ["input layer", "hidden layer 1", "hidden layer 2", "hidden layer 3",
                                      "hidden layer 4", "output layer"]
    cnn = list(logged_weights(build_model(run_config(
        "--model_name", "ResNet", "--out_channels", "4", "--num_levels", "2", "--num_conv_per_level", "2",
        "--residual_step", "2", "--shortcut", "projection"))))
    assert plots.layer_names(cnn) == ["stem convolution", "convolution 1 (level 1)", "convolution 2 (level 1)",
                                      "convolution 3 (level 2)", "convolution 4 (level 2)",
                                      "shortcut projection (level 2)", "output layer"]


def test_heatmap_cells_are_the_mean_log10_norm_of_their_block_and_mark_clipped_values():
    steps = list(range(0, 8, 2))  # logged every 2 steps
    norms = {"a": np.array([1e-2, 1e-4, 10.0, 10.0]), "b": np.array([0.0, 1.0, 1e-25, 1e-3])}
    edges, means, clipped = plots.block_log_norms(steps, norms, blocks=2)
    assert edges.tolist() == [0, 4, 7]
    np.testing.assert_allclose(means, [[-3, 1], [(-20 + 0) / 2, (-20 - 3) / 2]])
    assert clipped.tolist() == [[False, False], [True, True]]


def test_heatmaps_show_every_layer_of_the_lowest_seed_of_each_network_on_one_colour_scale(tmp_path, figures):
    quiet = np.geomspace(1e-9, 1e-3, 6 * 10).reshape(6, 10)  # 4 hidden layers: 6 weights, 10 logged steps
    loud = np.full((6, 10), 5.0)
    loud[0, :3] = 0.0  # clipped at the floor
    runs = [fake_run(run_config("--num_hidden_layers", "4", "--seed", "1"), loud),
            fake_run(run_config("--num_hidden_layers", "4", "--seed", "0"), quiet),
            fake_run(run_config("--num_hidden_layers", "4", "--residual_step", "2"), loud)]
    paths = plots.plot_gradient_heatmaps([(c, g) for c, _, g in runs], tmp_path)
    assert [p.name for p in paths] == [f"gradient_heatmap_{runs[i][0].run_name}.png" for i in (1, 2)]
    plain, residual = (figures[p.name].axes[0] for p in paths)
    legends = [figures[p.name].legends for p in paths]
    assert plain.get_title().endswith("4 hidden layers, width 16, plain, seed 0")
    assert [t.get_text() for t in plain.get_yticklabels()][::5] == ["input layer", "output layer"]
    assert plain.yaxis_inverted()  # the input layer at the top
    meshes = [ax.collections[0] for ax in (plain, residual)]
    assert meshes[0].get_array().shape == (6, 10)
    assert {m.get_clim() for m in meshes} == {(-20.0, 1.0)}  # one scale, from the clipped floor to the loudest
    assert legends[0] == [] and "clipped" in legends[1][0].get_texts()[0].get_text()
    assert len(residual.collections[1].get_offsets()) == 3  # a cross on each clipped cell


@pytest.mark.parametrize("trained, value, above, wrong", [
    ([0, 0, 0, 1, 1, 1], 30 ** 0.5, True, 0),  # the runs with the larger norms train
    ([1, 1, 1, 0, 0, 0], 30 ** 0.5, False, 0),  # the smaller ones do
    ([0, 1, 0, 1, 1, 1], 30 ** 0.5, True, 1),  # two cuts err once each: the widest gap (3 to 10) wins
])
def test_the_separating_threshold_counts_the_runs_it_misclassifies(trained, value, above, wrong):
    shuffled = [4, 0, 2, 5, 1, 3]  # the values in no particular order, each with its run's outcome
    threshold = plots.separating_threshold(np.array([1, 2, 3, 10, 20, 30.0])[shuffled], np.array(trained)[shuffled])
    assert (threshold.value, threshold.above_trains, threshold.misclassified) == (pytest.approx(value), above, wrong)
    assert threshold.statement("x").endswith("separates them exactly" if wrong == 0 else
                                             f"misclassifies {wrong} of 6 runs")


@pytest.mark.parametrize("values, trained", [([1.0, 2.0, 3.0], [1, 1, 1]), ([1.0, 1.0], [1, 0])])
def test_no_threshold_is_claimed_when_none_beats_ignoring_the_value(values, trained):
    threshold = plots.separating_threshold(np.array(values), np.array(trained, dtype=bool))
    assert threshold.statement("x").startswith("no threshold on x separates")


def test_init_scatter_has_a_point_per_plain_run_of_14_to_34_hidden_layers(tmp_path, figures):
    def run(hidden: int, step: int, seed: int, first_norm: float, val_acc: float) -> tuple:
        config, history, grads = fake_run(run_config("--num_hidden_layers", str(hidden), "--residual_step",
                                                     str(step), "--seed", str(seed)),
                                          np.full((hidden + 2, 3), first_norm))
        history["epochs"][-1]["val_acc"] = val_acc
        return config, history, grads
    runs = [run(14, 0, 0, 1e-6, 0.80), run(14, 0, 1, 1e-7, 0.70), run(18, 0, 0, 1e-9, 0.11),
            run(18, 0, 1, 0.0, 0.11), run(18, 2, 0, 1.0, 0.95), run(10, 0, 0, 1e-3, 0.90)]
    paths = plots.plot_sweep(runs, tmp_path)
    assert "mlp_init_gradient_vs_accuracy.png" in [p.name for p in paths]
    ax = figures["mlp_init_gradient_vs_accuracy.png"].axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points.tolist())) == [(1e-20, 0.11), (1e-9, 0.11), (1e-7, 0.7), (1e-6, 0.8)]
    assert "separates them exactly" in ax.get_title() and "clipped" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["14 hidden layers (2 runs)",
                                                                      "18 hidden layers (2 runs)"]


def test_mlp_curves_are_small_multiples_by_depth_with_plain_ticks_on_log_axes(tmp_path, figures):
    runs = []
    for hidden in ("6", "2", "4"):
        for step in ("0", "2"):
            for seed in ("0", "1"):
                config, history, grads = fake_run(run_config("--num_hidden_layers", hidden, "--residual_step", step,
                                                             "--seed", seed), np.ones((2, 0)))  # curves only
                for epoch, loss in zip(history["epochs"], (2.0, 0.8)):
                    epoch["train_loss"] = loss
                runs.append((config, history, grads))
    plots.plot_sweep(runs, tmp_path)
    axes = [ax for ax in figures["mlp_training_loss.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [f"{n} hidden layers, width 16" for n in (2, 4, 6)]
    assert all([line.get_color() for line in ax.lines] == [line.get_color() for line in axes[0].lines]
               for ax in axes)  # plain, plain, residual, residual: the same two colours in every panel
    low, high = axes[0].get_ylim()
    labels = [t.get_text() for t, value in zip(axes[0].get_yticklabels(), axes[0].get_yticks()) if low <= value <= high]
    assert labels == ["0.8", "1", "1.5", "2"]


def test_gradient_norms_below_the_floor_are_marked_clipped_even_when_not_zero(tmp_path, figures):
    tiny = np.full((4, 3), 1e-25)
    plots.plot_sweep([fake_run(run_config("--num_hidden_layers", "2"), tiny)], tmp_path)
    figure = figures["gradients_mlp_d2.png"]
    assert figure.legends[0].get_texts()[-1].get_text() == "clipped: norms below 1e-20 drawn at it"
    assert figure.axes[0].get_ylim()[0] < plots.GRAD_FLOOR == figure.axes[0].lines[0].get_ydata().min()


def test_every_figure_survives_extreme_values(tmp_path, figures):
    """An overflowing run's gradient norms (infinite, not a number, 1e300) and losses near the largest float once
    ended a finished sweep in matplotlib's traceback (an axis limit that is not finite): every figure is drawn,
    the norms beyond the ceiling at it, marked clipped."""
    extreme = np.tile([0.5, np.inf, np.nan, 1e300], (16, 1))  # 14 hidden layers: 16 weights, 4 logged steps
    runs = [fake_run(run_config("--num_hidden_layers", "14", "--seed", str(seed)), extreme) for seed in (0, 1)]
    runs[0][1]["epochs"][0]["train_loss"] = 1.7e308
    paths = plots.plot_sweep(runs, tmp_path)
    assert {p.name for p in paths} == {"mlp_training_loss.png", "mlp_Val_acc.png", "mlp_trainability.png",
                                       "gradient_heatmap_mlp_mnist_h14_w16_plain_s0.png", "gradients_mlp_d14.png",
                                       "mlp_init_gradient_vs_accuracy.png"}
    assert all(p.is_file() for p in paths)
    gradients = figures["gradients_mlp_d14.png"]
    assert gradients.axes[0].lines[0].get_ydata().tolist() == [0.5] + [plots.GRAD_CEILING] * 3
    assert f"clipped: norms above {plots.GRAD_CEILING:g}" in gradients.legends[0].get_texts()[-1].get_text()


# a process killed by SIGKILL while atomic_write writes a file's first bytes
KILLED_WRITING = """
import os, signal, sys
sys.path.insert(0, {root!r})
import utils

def killed(tmp):
    tmp.write_bytes(b"half a figure")
    os.kill(os.getpid(), signal.SIGKILL)
utils.atomic_write({path!r}, killed)
"""


def test_the_temporary_file_of_a_figure_writer_killed_mid_write_is_removed_by_the_next_sweep(tmp_path):
    """A kill while a figure was written left its hidden temporary file in the figures' folder for good; one of a
    writer that still runs is its own."""
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITING.format(root=str(ROOT), path=str(tmp_path / "a.png"))],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left, = tmp_path.glob(".a.png.*.tmp")
    running = tmp_path / f".b.png.{os.getpid()}.x1y2.tmp"
    running.write_bytes(b"being written")
    plots.plot_sweep([fake_run(run_config("--num_hidden_layers", "2"), np.ones((4, 3)))], tmp_path)
    assert not left.exists() and running.exists()


def test_a_leftover_named_with_an_id_no_process_can_have_is_removed(tmp_path):
    """A temporary file's name is all remove_leftovers knows of its writer: a process id beyond a C long was an
    OverflowError traceback once a sweep had trained, before its figures were drawn."""
    left = tmp_path / f".a.png.{10 ** 20}.x1y2.tmp"
    left.write_bytes(b"half a figure")
    utils.remove_leftovers(tmp_path)
    assert not left.exists()


def test_a_users_own_file_named_like_a_leftover_is_kept(tmp_path):
    """Only temporary files of what the figures' and maps' writers write (.png, .json) are theirs to remove."""
    mine = [tmp_path / ".notes.2024.v2.tmp", tmp_path / ".draft.txt.99999999.ab12cd34.tmp"]
    for path in mine:
        path.write_text("mine")
    utils.remove_leftovers(tmp_path)
    assert all(path.read_text() == "mine" for path in mine)
