"""The lab's figures, drawn without pyplot (Agg, whatever display there is) and saved atomically."""
from __future__ import annotations

from pathlib import Path

import dataclasses
import re

import numpy as np

from dataclasses import dataclass

from config import RunConfig
from runs import HELD_OUT, held_out_accuracies, held_out_key
from utils import atomic_write, remove_leftovers

GRAD_PLOT_LAYERS = 5  # the first weights of an MLP shown in its gradient figure
GRAD_FLOOR = 1e-20  # gradient norms below this (exact zeros among them) are drawn at it and marked as clipped
GRAD_CEILING = 1e20  # and those above it (an overflowing run's, infinite or not a number among them) at this
HEATMAP_BLOCKS = 50  # columns of a gradient heat map: training split into this many blocks of steps
TRAINED = 0.2  # a run "trains" when its accuracy reaches twice chance; a stalled MLP predicts one class (~11%)
STALL_LAYERS = (14, 34)  # the plain MLPs whose stall is compared with their gradient at initialisation


def new_figure(panels: int = 1, columns: int | None = None, panel_size: tuple[float, float] = (5.5, 4.2),
               sharey: bool = True):
    """A figure and its axes (a flat list), `columns` panels a row (default: all in one row), without pyplot."""
    from matplotlib.figure import Figure
    columns = min(columns or panels, panels)
    rows = -(-panels // columns)
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, columns, sharex=rows > 1, sharey=sharey, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def savefig(fig, path: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def shortcut_label(config: RunConfig) -> str:
    return f"residual (step {config.residual_step})" if config.residual_step else "plain"


def depth_label(config: RunConfig) -> str:
    """How a network's depth is named: the MLP by its hidden layers (the lab's "depth"), the CNN by He et al.'s
    count of weight layers."""
    if config.model_name == "MLP":
        return f"{config.num_hidden_layers} hidden layers, width {config.width}"
    return f"depth {config.depth}"


def plot_curves(panels: dict[str, dict[str, list[list[float]]]], ylabel: str, title: str, path: str | Path,
                logy: bool = False, columns: int | None = None) -> None:
    """One panel per group, one colour per curve label (the same in every panel), one thin line per seed: seeds
    are drawn each on its own, never averaged, so runs that train and runs that stall both stay visible."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    labels = list(dict.fromkeys(label for curves in panels.values() for label in curves))
    colours = dict(zip(labels, curve_colours(len(labels))))
    fig, axes = new_figure(len(panels), columns)
    for ax, (panel, curves) in zip(axes, panels.items()):
        for label, runs in curves.items():
            for values in runs:
                ax.plot(np.arange(1, len(values) + 1), values, color=colours[label], marker="o", markersize=2,
                        linewidth=1, alpha=0.8)
        ax.set_title(panel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if logy:
            ax.set_yscale("log")
            plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("epoch")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(ylabel)
    seeds = {label: sorted({len(curves[label]) for curves in panels.values() if label in curves})
             for label in labels}
    handles = [Line2D([], [], color=colours[label], marker="o", markersize=3,
                      label=f"{label}: {'/'.join(map(str, seeds[label]))} seed{'' if seeds[label] == [1] else 's'}")
               for label in labels]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(labels), 4), fontsize=10)
    fig.suptitle(f"{title} (one line per seed)")
    savefig(fig, path)


def curve_colours(count: int) -> list:
    """`count` colours told apart at a glance: matplotlib's tab10, then tab20 beyond ten."""
    from matplotlib import colormaps
    return [colormaps["tab10" if count <= 10 else "tab20"](i) for i in range(count)]


def plain_number(value: float, digits: int = 6) -> str:
    """A number as a student writes it: 0.8, 1.5, 0.0001, 1e-6 (no zero-padded exponent)."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.{digits}g}").replace("e+", "e")


def plain_log_ticks(ax, which: str = "y") -> None:
    """Label a log axis with plain numbers (0.8, 1, 1.5, 2; 0.001; 1e-6), not 2x10^0, with more ticks when it
    spans few decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    low, high = ax.get_ylim() if which == "y" else ax.get_xlim()
    decades = np.log10(max(low, high) / min(low, high))
    subs = (1, 1.5, 2, 3, 4, 5, 6, 8) if decades < 1.2 else (1, 2, 5) if decades < 3 else (1,)
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: plain_number(value)))
    axis.set_minor_formatter(NullFormatter())


def drawable(norms: np.ndarray) -> np.ndarray:
    """Gradient norms as the figures draw them: between GRAD_FLOOR and GRAD_CEILING, those beyond at the nearer one
    and those that are not a number at the ceiling (where they mark clipped values: drawable(x) != x)."""
    return np.clip(np.nan_to_num(norms, nan=GRAD_CEILING), GRAD_FLOOR, GRAD_CEILING)


def plot_grad_norms(panels: dict[str, tuple[list[int], dict[str, list[np.ndarray]]]], title: str,
                    path: str | Path, ylim: tuple[float, float]) -> None:
    """Gradient L2 norms over training steps, one panel per group of curves, one colour per curve label (the same
    in every panel) with a line for each of its series, one legend, log scale on `ylim`; norms below GRAD_FLOOR
    or above GRAD_CEILING are drawn at it (drawable) and marked clipped."""
    from matplotlib.lines import Line2D
    labels = list(dict.fromkeys(label for _, curves in panels.values() for label in curves))
    colours = dict(zip(labels, curve_colours(len(labels))))
    fig, axes = new_figure(len(panels), panel_size=(4.2, 4.5) if len(panels) > 1 else (7, 4.5))
    clipped = {GRAD_FLOOR: False, GRAD_CEILING: False}
    for ax, (panel, (steps, curves)) in zip(axes, panels.items()):
        for label, series in curves.items():
            for norms in series:
                shown = drawable(norms)
                for bound in clipped:
                    clipped[bound] |= bool(((shown == bound) & (shown != norms)).any())
                ax.plot(steps, shown, color=colours[label], linewidth=0.8, alpha=1 if len(series) == 1 else 0.6)
        ax.set(xlabel="training step", title=panel, yscale="log", ylim=ylim)
        plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient L2 norm")
    handles = [Line2D([], [], color=colours[label], label=label) for label in labels]
    beyond = {GRAD_FLOOR: f"below {GRAD_FLOOR:g}", GRAD_CEILING: f"above {GRAD_CEILING:g} (or not a number)"}
    for bound in (bound for bound, any_clipped in clipped.items() if any_clipped):
        for ax in axes:
            ax.axhline(bound, color="black", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="black", linestyle=":",
                              label=f"clipped: norms {beyond[bound]} drawn at it"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle(title)
    savefig(fig, path)


def layer_names(parameter_names: list[str]) -> list[str]:
    """Logged weights (in the model's order) named in words: "input layer", "hidden layer 1", ... "output layer"
    for the MLP; "stem convolution", "convolution 1 (level 1)", "shortcut projection (level 2)", ... for the CNN."""
    words, hidden, convs = [], 0, 0
    for name in parameter_names:
        level = re.match(r"levels\.(\d+)\.", name)
        if name in ("input.1.weight",):
            words.append("input layer")
        elif name in ("head.weight", "fc.weight"):
            words.append("output layer")
        elif name.startswith("stem."):
            words.append("stem convolution")
        elif name.startswith("hidden."):
            hidden += 1
            words.append(f"hidden layer {hidden}")
        elif level and ".shortcut." in name:
            words.append(f"shortcut projection (level {int(level[1]) + 1})")
        elif level:
            convs += 1
            words.append(f"convolution {convs} (level {int(level[1]) + 1})")
        else:
            words.append(name)
    return words


def block_log_norms(steps: list[int], grad_norms: dict[str, np.ndarray],
                    blocks: int = HEATMAP_BLOCKS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training split into `blocks` blocks of consecutive logged steps: the block edges (in steps), the mean over
    each block of log10 of each weight's gradient norm, (weights, blocks), and where a block held a norm that is
    drawn clipped (drawable)."""
    norms = np.stack(list(grad_norms.values()))
    parts = np.array_split(np.arange(len(steps)), min(blocks, len(steps)))
    shown = drawable(norms)
    logs = np.log10(shown)
    means = np.stack([logs[:, part].mean(axis=1) for part in parts], axis=1)
    clipped = np.stack([(shown != norms)[:, part].any(axis=1) for part in parts], axis=1)
    step_of = np.asarray(steps)
    edges = np.array([step_of[part[0]] for part in parts] + [step_of[-1] + 1])
    return edges, means, clipped


def plot_grad_heatmap(edges: np.ndarray, log_norms: np.ndarray, clipped: np.ndarray, names: list[str], title: str,
                      path: str | Path, scale: tuple[float, float]) -> None:
    """Every weight layer's gradient norm over training as a heat map: one row per layer (input at the top), one
    column per block of steps, colour log10 of the norm on the colour `scale` (shared by the figures compared);
    cells holding a clipped value are crossed."""
    fig, (ax,) = new_figure(panel_size=(7, 2 + 0.16 * len(names)))
    rows = np.arange(len(names) + 1) - 0.5
    mesh = ax.pcolormesh(edges, rows, log_norms, cmap="viridis", vmin=scale[0], vmax=scale[1])
    ax.set_yticks(np.arange(len(names)), names, fontsize=7 if len(names) <= 40 else 5)
    ax.invert_yaxis()  # the input layer at the top
    ax.set(xlabel="training step", title=title)
    if clipped.any():
        rows_clipped, cols = np.nonzero(clipped)
        centres = (edges[:-1] + edges[1:]) / 2
        ax.scatter(centres[cols], rows_clipped, marker="x", s=12, color="white", linewidths=0.8,
                   label=f"block with a norm below {GRAD_FLOOR:g} or above {GRAD_CEILING:g}, drawn at that bound "
                         "(clipped)")
        fig.legend(loc="outside lower center", fontsize=7)
    steps_per_block = int(np.median(np.diff(edges)))
    fig.colorbar(mesh, ax=ax, label=f"log10 of gradient L2 norm (mean over blocks of {steps_per_block} steps)")
    savefig(fig, path)


def plot_trainability(points: dict[str, list[tuple[int, float]]], xlabel: str, title: str, path: str | Path) -> None:
    """Each run's final validation accuracy against depth, one mark per seed, one colour per group."""
    fig, (ax,) = new_figure(panel_size=(7, 4.5))
    offsets = np.linspace(-0.3, 0.3, len(points))
    for offset, (label, marks) in zip(offsets, points.items()):
        x, y = np.array(marks, dtype=float).T
        ax.scatter(x + offset, y, s=22, alpha=0.8, label=f"{label} ({len(marks)} runs)")
    ax.set(xlabel=xlabel, ylabel="final validation accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    savefig(fig, path)


@dataclass(frozen=True)
class Threshold:
    """The best rule "a run trains when its value is above (or below) `value`" and how many runs it gets wrong,
    against the best rule that ignores the value (every run trains, or none does)."""
    value: float
    above_trains: bool
    misclassified: int
    runs: int
    without_value: int

    def statement(self, what: str) -> str:
        """The rule in words, `what` naming the value."""
        if self.misclassified >= self.without_value:
            return (f"no threshold on {what} separates the runs that train from those that stall better than "
                    f"calling them all alike ({self.without_value} of {self.runs} wrong)")
        side = "above" if self.above_trains else "below"
        wrong = "separates them exactly" if self.misclassified == 0 else (
            f"misclassifies {self.misclassified} of {self.runs} runs")
        return (f"runs with {what} {side} {plain_number(self.value, 2)} train and the others stall: this threshold "
                f"{wrong}")


def separating_threshold(values: np.ndarray, trained: np.ndarray) -> Threshold:
    """The threshold on positive `values` (between two neighbours, at their geometric mean) that best separates
    the `trained` runs from the others, in either direction; ties go to the widest gap."""
    order = np.argsort(values)
    values, trained = np.asarray(values, dtype=float)[order], np.asarray(trained, dtype=bool)[order]
    cuts = np.concatenate([[values[0] / 2], np.sqrt(values[:-1] * values[1:]), [values[-1] * 2]])
    gaps = np.concatenate([[np.inf], values[1:] / values[:-1], [np.inf]])
    below_trained = np.concatenate([[0], np.cumsum(trained)])  # trained runs below each cut
    below_stalled = np.arange(len(values) + 1) - below_trained
    above_errors = below_trained + (len(values) - trained.sum() - below_stalled)
    below_errors = len(values) - above_errors
    candidates = [(int(errors[i]), -gaps[i], not above, i) for above, errors in ((True, above_errors),
                                                                              (False, below_errors))
                  for i in range(len(cuts)) if gaps[i] > 1]  # no cut between two equal values
    misclassified, _, below, best = min(candidates)
    return Threshold(float(cuts[best]), not below, misclassified, len(values),
                     int(min(trained.sum(), len(values) - trained.sum())))


def in_stall_study(config: RunConfig) -> bool:
    """Whether a run is one of the plain MLPs whose stall is compared with their gradient at initialisation."""
    return (config.model_name == "MLP" and not config.residual_step
            and STALL_LAYERS[0] <= config.num_hidden_layers <= STALL_LAYERS[1])


def init_gradient_points(runs: list[tuple[RunConfig, dict, tuple[list[int], dict[str, np.ndarray]]]]
                         ) -> list[tuple[int, float, float]]:
    """(hidden layers, first layer's gradient norm at step 0, final validation accuracy) of every run of the stall
    study whose step 0 was logged."""
    return [(c.num_hidden_layers, float(next(iter(norms.values()))[0]), held_out_accuracies(h)[-1])
            for c, h, (steps, norms) in runs if in_stall_study(c) and steps and steps[0] == 0]


def init_gradient_threshold(points: list[tuple[int, float, float]]) -> Threshold:
    """The threshold on the first layer's gradient norm at step 0 that best tells the runs that train apart."""
    _, norms, accs = np.array(points, dtype=float).T
    return separating_threshold(drawable(norms), accs >= TRAINED)


def plot_init_gradients(points: list[tuple[int, float, float]], path: str | Path) -> None:
    """Each plain run's first-layer gradient norm at initialisation (x, log) against its final validation
    accuracy, coloured by depth, with the threshold that best separates the runs that train."""
    from matplotlib import colormaps
    fig, (ax,) = new_figure(panel_size=(7.5, 4.8))
    layers, norms, accs = np.array(points, dtype=float).T
    depths = sorted(set(layers.astype(int)))
    colours = colormaps["viridis"](np.linspace(0, 0.9, len(depths)))
    for colour, depth in zip(colours, depths):
        mine = layers == depth
        ax.scatter(drawable(norms[mine]), accs[mine], s=30, color=colour, alpha=0.85,
                   edgecolors="black", linewidths=0.3, label=f"{depth} hidden layers ({mine.sum()} runs)")
    threshold = init_gradient_threshold(points)
    ax.axhline(TRAINED, color="grey", linestyle=":", linewidth=1)
    ax.text(0.01, TRAINED, f"trains: {TRAINED:.0%} or more", va="bottom", fontsize=7, color="grey",
            transform=ax.get_yaxis_transform())
    if threshold.misclassified < threshold.without_value:
        ax.axvline(threshold.value, color="black", linestyle="--", linewidth=1,
                   label=f"threshold {plain_number(threshold.value, 2)}")
    ax.set(xscale="log", ylim=(0, 1), xlabel="first layer's gradient L2 norm at step 0 (before any update)",
           ylabel="final validation accuracy")
    plain_log_ticks(ax, "x")
    if (drawable(norms) != norms).any():
        ax.set_xlabel(ax.get_xlabel() + f"; below {GRAD_FLOOR:g} or above {GRAD_CEILING:g} drawn at that bound "
                      "(clipped)")
    ax.set_title(f"plain MLPs of {STALL_LAYERS[0]} to {STALL_LAYERS[1]} hidden layers, one point per run:\n"
                 f"{threshold.statement('this norm')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    savefig(fig, path)


def grad_range(series: list[np.ndarray]) -> tuple[float, float]:
    """One log-scale y range that holds every series as drawn (drawable), so figures can be compared."""
    values = drawable(np.concatenate(series))
    return float(values.min()) / 2, float(values.max()) * 2


def plot_sweep(runs: list[tuple[RunConfig, dict, tuple[list[int], dict[str, np.ndarray]]]],
               plots_dir: Path) -> list[Path]:
    """The lab's comparison figures over every run of a sweep, from (config, history, gradient norms) per run;
    return the files written. A gradient figure of these runs that cannot be drawn now (their norms are missing) is
    removed rather than left from an earlier command, and so are the temporary files of a writer that was killed."""
    remove_leftovers(plots_dir)
    mlp = runs[0][0].model_name == "MLP"
    loss: dict[str, dict[str, list[list[float]]]] = {}
    acc: dict[str, dict[str, list[list[float]]]] = {}
    # the MLP's many depths as small multiples, plain against residual in each; the CNN's few depths in one panel
    # per shortcut kind, so that the deeper plain network's curve sits beside the shallower one's
    order = sorted(runs, key=lambda r: (r[0].depth, r[0].width or 0, r[0].residual_step, r[0].seed))
    for config, history, _ in order:
        panel, curve = (depth_label(config), shortcut_label(config)) if mlp else (shortcut_label(config),
                                                                                 depth_label(config))
        loss.setdefault(panel, {}).setdefault(curve, []).append([e["train_loss"] for e in history["epochs"]])
        acc.setdefault(panel, {}).setdefault(curve, []).append(held_out_accuracies(history))
    family = "MLP" if mlp else "CNN"
    scored_on = HELD_OUT[held_out_key(runs[0][1])]  # one --val_size for every run of a sweep
    paths = [plots_dir / ("mlp_training_loss.png" if mlp else "Conv_train_loss.png"),
             plots_dir / ("mlp_Val_acc.png" if mlp else "Conv_val_accuracy.png")]
    columns = 3 if mlp else None
    plot_curves(loss, "training loss", f"{family} training loss", paths[0], logy=True, columns=columns)
    plot_curves(acc, f"{scored_on} accuracy", f"{family} {scored_on} accuracy", paths[1], columns=columns)
    if mlp:  # from the histories alone
        paths.append(plots_dir / "mlp_trainability.png")
        points: dict[str, list[tuple[int, float]]] = {}
        for config, history, _ in runs:
            points.setdefault(shortcut_label(config), []).append(
                (config.num_hidden_layers, held_out_accuracies(history)[-1]))
        plot_trainability(points, "hidden layers (--num_hidden_layers)", "MLP: which depths train", paths[-1])
    logged = [(c, g) for c, _, g in runs if g[0]]
    if logged:
        paths += plot_gradient_heatmaps(logged, plots_dir)
    if logged and mlp:
        paths += plot_mlp_gradients(logged, plots_dir)
        init_points = init_gradient_points(runs)
        if init_points:
            paths.append(plots_dir / "mlp_init_gradient_vs_accuracy.png")
            plot_init_gradients(init_points, paths[-1])
    elif logged:
        paths += plot_cnn_gradients(logged, plots_dir)
    for stale in gradient_figures([c for c, _, _ in runs], plots_dir) - set(paths):
        stale.unlink(missing_ok=True)  # drawn earlier, from runs these may have replaced: never shown as theirs
    return paths


def mlp_gradients_name(config: RunConfig, several_widths: bool) -> str:
    """The name of the figure of this MLP's first layers' gradient norms, shared with its other seeds."""
    return (f"gradients_mlp_d{config.num_hidden_layers}" + (f"_res{config.residual_step}" if config.residual_step
                                                            else "") + (f"_w{config.width}" if several_widths else ""))


def gradient_figures(configs: list[RunConfig], plots_dir: Path) -> set[Path]:
    """Every gradient figure that runs of these configs draw when all of them logged gradient norms."""
    several_widths = len({c.width for c in configs}) > 1
    names = [f"gradient_heatmap_{c.run_name}" for c in configs]
    if configs[0].model_name == "MLP":
        names += [mlp_gradients_name(c, several_widths) for c in configs] + ["mlp_init_gradient_vs_accuracy"]
    else:
        names += [f"Conv_gradients_d{c.depth}" for c in configs]
    return {plots_dir / f"{name}.png" for name in names}


def plot_mlp_gradients(runs: list[tuple[RunConfig, tuple[list[int], dict[str, np.ndarray]]]],
                       plots_dir: Path) -> list[Path]:
    """gradients_mlp_d<hidden layers>[_res<k>][_w<width>].png: the first layers' gradient norms, a panel per
    seed, every figure on the same y range."""
    groups: dict[str, list[tuple[RunConfig, tuple]]] = {}
    widths = {c.width for c, _ in runs}
    for config, grads in runs:
        groups.setdefault(mlp_gradients_name(config, len(widths) > 1), []).append((config, grads))
    first = [{n: norms for n, norms in list(g[1].items())[:GRAD_PLOT_LAYERS]} for _, g in runs]
    ylim = grad_range([s for layers in first for s in layers.values()])
    paths = []
    for name, group in groups.items():
        panels = {f"seed {c.seed}": (steps, {name: [series] for name, series in list(zip(
            layer_names(list(norms)), norms.values()))[:GRAD_PLOT_LAYERS]}) for c, (steps, norms) in group}
        paths.append(plots_dir / f"{name}.png")
        plot_grad_norms(panels, f"gradients of the first layers: {depth_label(group[0][0])}, "
                        f"{shortcut_label(group[0][0])}", paths[-1], ylim)
    return paths


def plot_cnn_gradients(runs: list[tuple[RunConfig, tuple[list[int], dict[str, np.ndarray]]]],
                       plots_dir: Path) -> list[Path]:
    """Conv_gradients_d<depth>.png: the first convolution's gradient norm of every run of that depth, one colour
    for plain and one for residual (a line per seed), on one y range across depths."""
    by_depth: dict[int, dict[str, list[np.ndarray]]] = {}
    steps_of: dict[int, list[int]] = {}
    for config, (steps, norms) in sorted(runs, key=lambda r: (r[0].residual_step, r[0].seed)):
        by_depth.setdefault(config.depth, {}).setdefault(shortcut_label(config), []).append(next(iter(norms.values())))
        steps_of[config.depth] = steps
    ylim = grad_range([s for curves in by_depth.values() for series in curves.values() for s in series])
    paths = []
    for depth, curves in by_depth.items():
        named = {f"{label}, {len(series)} seeds" if len(series) > 1 else label: series
                 for label, series in curves.items()}
        paths.append(plots_dir / f"Conv_gradients_d{depth}.png")
        plot_grad_norms({f"depth {depth}": (steps_of[depth], named)},
                        "gradient norm of the first convolution (the stem's)", paths[-1], ylim)
    return paths


def plot_gradient_heatmaps(runs: list[tuple[RunConfig, tuple[list[int], dict[str, np.ndarray]]]],
                           plots_dir: Path) -> list[Path]:
    """gradient_heatmap_<run name>.png: every weight layer's gradient norm over training, for the lowest seed of
    each network, all on one colour scale."""
    networks: dict[str, tuple[RunConfig, tuple]] = {}
    for config, grads in sorted(runs, key=lambda r: r[0].seed):
        networks.setdefault(dataclasses.replace(config, seed=0).default_run_name(), (config, grads))
    maps = {config: block_log_norms(*grads) for config, grads in networks.values()}
    values = np.concatenate([means.ravel() for _, means, _ in maps.values()])
    scale = float(np.floor(values.min())), float(np.ceil(values.max()))
    paths = []
    for config, grads in networks.values():
        paths.append(plots_dir / f"gradient_heatmap_{config.run_name}.png")
        plot_grad_heatmap(*maps[config], layer_names(list(grads[1])),
                          f"gradient norm of every weight layer: {depth_label(config)}, {shortcut_label(config)}, "
                          f"seed {config.seed}", paths[-1], scale)
    return paths


@dataclass(frozen=True)
class TimedRun:
    """One run as the time-to-accuracy figure draws it: its recipe's label and seed, each epoch's held-out accuracy
    against the minutes trained by its end, and the final test accuracies (by label) when the test ends."""
    recipe: str
    seed: int
    minutes: list[float]
    accuracies: list[float]
    scored_on: str  # "validation" or "test"
    final_minutes: float
    finals: dict[str, float]


def timed_run(recipe: str, config: RunConfig, history: dict) -> TimedRun:
    """A finished run's TimedRun: minutes are its epochs' seconds (training and each epoch's scoring) summed, the
    final test's seconds after them where its history holds them."""
    minutes = list(np.cumsum([e["seconds"] for e in history["epochs"]]) / 60)
    test = history["test"]
    finals = {"test": test["acc"], **{f"test, {key.removeprefix('acc_').replace('_', ' ')}": value
                                      for key, value in test.items() if key.startswith("acc_")}}
    return TimedRun(recipe, config.seed, minutes, held_out_accuracies(history), HELD_OUT[held_out_key(history)],
                    minutes[-1] + test.get("seconds", 0) / 60, finals)


def plot_time_to_accuracy(runs: list[TimedRun], target: tuple[str, float], machines: str, path: str | Path) -> None:
    """Held-out accuracy against minutes of training, one colour per recipe and one line per seed, each run's
    final test accuracies as markers where its test ends, and the published accuracy `target` as a line."""
    from matplotlib.lines import Line2D
    recipes = list(dict.fromkeys(run.recipe for run in runs))
    colours = dict(zip(recipes, curve_colours(len(recipes))))
    finals = list(dict.fromkeys(label for run in runs for label in run.finals))
    markers = dict(zip(finals, "o^sDv"))
    fig, (ax,) = new_figure(panel_size=(8.5, 5.2))
    for run in runs:
        ax.plot(run.minutes, 100 * np.array(run.accuracies), color=colours[run.recipe], linewidth=1, alpha=0.8,
                linestyle="-" if run.scored_on == "test" else "--")
        for label, acc in run.finals.items():
            ax.plot(run.final_minutes, 100 * acc, linestyle="none", marker=markers[label], markersize=5,
                    color=colours[run.recipe], markeredgecolor="black", markeredgewidth=0.4)
    ax.axhline(100 * target[1], color="black", linestyle=":", linewidth=1)
    ax.text(0.01, 100 * target[1], f"{target[0]}: {100 * target[1]:.2f}%", va="bottom", fontsize=8,
            transform=ax.get_yaxis_transform())
    low = min(min(run.accuracies[len(run.accuracies) // 3:]) for run in runs)  # leave the first epochs' climb out
    ax.set(xlabel="minutes of training (each epoch's scoring included)", ylabel="accuracy (%)",
           ylim=(100 * low - 1, 100 * max(target[1], *(max(r.finals.values()) for r in runs)) + 1))
    ax.grid(alpha=0.3)
    seeds = {recipe: sum(run.recipe == recipe for run in runs) for recipe in recipes}
    handles = [Line2D([], [], color=colours[recipe], label=f"{recipe}: {seeds[recipe]} seed"
                      f"{'s' if seeds[recipe] > 1 else ''}, per epoch on "
                      f"{next(run.scored_on for run in runs if run.recipe == recipe)}") for recipe in recipes]
    handles += [Line2D([], [], linestyle="none", marker=markers[label], color="grey", markeredgecolor="black",
                       label=f"final {label}") for label in finals]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_title(f"Time to accuracy on {machines}", fontsize=10)
    savefig(fig, path)
