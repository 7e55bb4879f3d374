"""The README's results tables, made from run folders (and cam.py's faithfulness.json) so that no number in them is
typed by hand.

    python report.py --ex1 runs/reproduce/ex1 --ex2 runs/reproduce/ex2            # print the tables
    python report.py --ex1 runs/reproduce/ex1 --ex2 runs/reproduce/ex2 --readme README.md docs/analysis.md
    python report.py --best_checkpoint runs/reproduce/ex2                        # the CAM model of Exercise 3
    python report.py --ex1 runs/reproduce/ex1 --ex2 runs/reproduce/ex2 --keep results  # keep what they are made of
    python report.py --faithfulness img_show/cam/faithfulness.json                # Exercise 3's faithfulness table

Every run folder it does not use is listed on stderr with the reason, and so is every run a complete sweep would
hold (each network with each seed the others have) that is missing; --readme then writes nothing unless given
--allow_missing, and a table written with it names the runs it lacks. --keep copies the few kilobytes of each run
that the tables read into results/ex1 and results/ex2, from which `--ex1 results/ex1 --ex2 results/ex2` remakes
the same tables without the run folders.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import faithfulness
from config import PRESETS, RunConfig
from data import DATASETS, num_batches
from plots import (STALL_LAYERS, TRAINED, TimedRun, in_stall_study, init_gradient_points, init_gradient_threshold,
                   plot_time_to_accuracy, timed_run)
from runs import CheckpointError, RunFiles, load_checkpoint
from utils import (ArgumentParser, UsageError, atomic_write, check_writable, first_line, read_json,
                   reporting_full_disk, run_cli)

FAMILIES = {"--ex1": ("MLP", "Exercise 1's MLP runs"), "--ex2": ("ResNet", "Exercise 2's CNN runs"),
            "--fast": ("ResNet", "CNN runs of --preset resnet20_fast"),
            "--ablation": ("ResNet", "CNN runs of --preset resnet20_fast with levers changed"),
            "--best_checkpoint": ("ResNet", "Exercise 2's CNN runs")}
PUBLISHED = ("He et al. 2016, ResNet-20", 0.9125)  # Table 6: 8.75% test error
KEPT = {"ex1": "ex1", "ex2": "ex2", "fast": "fast", "fast-ablation": "ablation"}  # KEEP's folders: the flag they keep


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The report's flags; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = ArgumentParser(description="Results tables of Exercises 1 and 2 from their run folders.",
                            add_help=add_help)
    parser.add("--ex1", default=None, help="out_dir of the Exercise 1 sweep (MLPs on MNIST)")
    parser.add("--ex2", default=None, help="out_dir of the Exercise 2 sweep (CNNs on CIFAR-10)")
    parser.add("--fast", default=None,
               help="out_dir of the time-to-accuracy runs (--preset resnet20_fast, and the same recipe at other depths "
                    "and shortcuts): their table beside He et al.'s ResNet-20, and with --ex2 how the degradation of "
                    "plain networks compares after 10 epochs and after this recipe")
    parser.add("--ablation", default=None,
               help="out_dir of runs that each change levers of --preset resnet20_fast (each given its own "
                    "--run_name): a table of every run's changes from the recipe and what it reached, beside the "
                    "--fast runs of the recipe itself")
    parser.add("--time_to_accuracy", default=None, metavar="PNG",
               help="draw accuracy against minutes of training of the residual depth-20 runs of --fast (and of --ex2 "
                    "when given) into this file")
    parser.add("--faithfulness", default=None, metavar="JSON",
               help="faithfulness.json written by cam.py --faithfulness: its table as the ex3-faithfulness block")
    parser.add("--readme", nargs="+", default=None, metavar="FILE",
               help="also rewrite the tables between <!-- report:NAME --> and <!-- /report:NAME --> in these "
                    "Markdown files, each where its block is")
    parser.add("--best_checkpoint", default=None,
               help="print the checkpoint of the residual run with the best final validation accuracy in this "
                    "out_dir, and nothing else")
    parser.add("--allow_missing", action="store_true", default=False,
               help="let --readme write tables that lack runs of the sweep (unfinished, unreadable or missing); "
                    "the tables name them")
    parser.add("--keep", default=None,
               help="also copy what the tables are made of (each run's config.json, history.json and the step-0 row "
                    "of its grad_norms.csv) into KEEP/ex1, KEEP/ex2, KEEP/fast and KEEP/fast-ablation (those of "
                    "--ex1, --ex2, --fast and --ablation), replacing those folders; report.py "
                    "remakes the same tables from them")
    return parser


# how a run folder's damaged side file comes back (sweep.plan_run rebuilds it from the checkpoint)
RESTORE = "; pipeline.py with the run's flags and --resume restores it from checkpoint.pt"


@dataclass(frozen=True)
class LeftOut:
    """A run folder the report does not use, why, and its config when that could be read."""
    folder: str
    reason: str
    config: RunConfig | None = None


def read_runs(out_dir: Path) -> tuple[list[tuple[RunConfig, dict]], list[LeftOut]]:
    """(config, history) of every finished run folder directly under `out_dir`, in name order, and every other
    run folder there with the reason it is not used (folders holding no run file, such as plots/, are not runs)."""
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a folder; run the sweep first")
    runs, left_out = [], []
    for run_dir in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        files = RunFiles(run_dir)
        if not files.exist():
            continue
        config, history = files.read_config(), files.read_history()
        if config is None:
            left_out.append(LeftOut(run_dir.name, f"no readable config.json{RESTORE}"))
        elif config.run_name != run_dir.name:  # a copy or a renamed folder: one run must not count twice
            left_out.append(LeftOut(run_dir.name, f"its config.json is run {config.run_name}'s: a copy or a renamed "
                                    f"folder, which pipeline.py would not resume either (rename it back or move it "
                                    "away)"))
        elif history is None:
            left_out.append(LeftOut(run_dir.name, f"no readable history.json (none yet, or damaged){RESTORE}",
                                    config))
        elif not finished(config, history):
            tested = "a test result all the same" if "test" in history else "no test result"
            left_out.append(LeftOut(run_dir.name, f"unfinished: {len(history['epochs'])} of {config.num_epochs} "
                                    f"epochs, {tested}", config))
        else:
            runs.append((config, history))
    return runs, left_out


def missing_runs(configs: list[RunConfig]) -> list[str]:
    """The runs a complete sweep of these configs would hold, every network with every seed that any has, that are
    not among them, by the folder name the sweep gives them."""
    networks = {dataclasses.replace(c, seed=0).default_run_name(): c for c in configs}
    seeds = sorted({c.seed for c in configs})
    present = {c.default_run_name() for c in configs}
    return [name for config in networks.values() for seed in seeds
            if (name := dataclasses.replace(config, seed=seed).default_run_name()) not in present]


def check_family(configs: list[RunConfig], flag: str, out_dir: Path) -> None:
    """Refuse runs of the other model family than `flag`'s exercise takes."""
    model_name, what = FAMILIES[flag]
    wrong = [c for c in configs if c.model_name != model_name]
    if wrong:
        raise UsageError(f"{flag} takes {what}, but {out_dir} holds {wrong[0].model_name} runs ({len(wrong)}, such as "
                         f"{wrong[0].run_name})")


def check_one_sweep(configs: list[RunConfig], flag: str, out_dir: Path) -> None:
    """Refuse runs that differ in more than what the exercise's table compares (depth, shortcut and seed): a width or
    learning rate of their own would be mixed into a row as if it were another seed. --fast's runs may differ in
    --ema too: its tables compare the trained weights, which an average only watches, and name the runs with one."""
    swept = ("num_hidden_layers" if flag == "--ex1" else "num_conv_per_level", "residual_step", "seed",
             *(("ema",) if flag == "--fast" else ()))

    def unswept(config: RunConfig) -> RunConfig:
        return dataclasses.replace(config, run_name=None, **{name: getattr(configs[0], name) for name in swept})

    if len(configs) < 2:  # nothing to mix (no runs at all is refused where they are counted)
        return
    reference = unswept(configs[0])
    for config in configs[1:]:
        changed = unswept(config).changed_flag(reference, more_epochs=False)
        if changed:
            raise UsageError(f"{flag} {out_dir} mixes runs of several sweeps: {config.run_name} was trained with "
                             f"{changed} as {configs[0].run_name} was; give each sweep its own --out_dir")


def finished_runs(out_dir: Path, flag: str) -> tuple[list[tuple[RunConfig, dict]], list[str]]:
    """The finished runs of `out_dir` for the exercise of `flag`, after listing on stderr every run folder not used
    and every run missing from the sweep; with the names of those."""
    runs, left_out = read_runs(out_dir)
    configs = [c for c, _ in runs] + [item.config for item in left_out if item.config]
    check_family(configs, flag, out_dir)
    if flag not in ("--best_checkpoint", "--ablation"):  # the CAM model is the best residual run; levers differ
        check_one_sweep(configs, flag, out_dir)
    # --fast: residual depth 20 has three seeds, the degradation question's other networks one
    missing = [] if flag in ("--fast", "--ablation") else missing_runs(configs)
    for item in left_out:
        print(f"{out_dir}: not used: {item.folder}: {item.reason}", file=sys.stderr)
    for name in missing:
        print(f"{out_dir}: missing: {name} (no run folder; the other networks have this seed)", file=sys.stderr)
    if not runs:
        raise UsageError(f"{out_dir} holds no finished runs" + (" (see the folders not used, above)" if left_out
                                                                 else "; run the sweep first"))
    return runs, [item.folder for item in left_out] + missing


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def percent2(value: float) -> str:
    """An accuracy to the image of 10,000 test images, for tables that set it beside a published 91.25%."""
    return f"{100 * value:.2f}%"


def median_range(values: list[float], fmt) -> str:
    """The median of `values` and their range, each written with `fmt`: "93.5% (92.9% to 94.1%)"; one value alone."""
    values = sorted(values)
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(values[0])} to {fmt(values[-1])})"


def loss(value: float) -> str:
    """A loss as the tables write it: 0.942."""
    return f"{value:.3f}"


def exercise1_table(runs: list[tuple[RunConfig, dict]]) -> str:
    """Per hidden-layer count and shortcut kind: how many seeds trained, median and range of test accuracy."""
    kinds = sorted({c.residual_step for c, _ in runs})
    cells: dict[tuple[int, int], list[float]] = {}
    for config, history in runs:
        cells.setdefault((config.num_hidden_layers, config.residual_step), []).append(history["test"]["acc"])
    header = "| hidden layers | " + " | ".join(
        f"{name}: trained | {name}: median test acc (range)"
        for name in ("plain" if k == 0 else f"residual (step {k})" for k in kinds)) + " |"
    lines = [header, "|---:|" + "---:|---|" * len(kinds)]
    for layers in sorted({c.num_hidden_layers for c, _ in runs}):
        row = [str(layers)]
        for kind in kinds:
            accs = cells.get((layers, kind), [])
            if not accs:
                row += ["", ""]
                continue
            trained = sum(a >= TRAINED for a in accs)
            row += [f"{trained}/{len(accs)}", median_range(accs, percent)]
        lines.append("| " + " | ".join(row) + " |")
    seeds = sorted({c.seed for c, _ in runs})
    epochs = sorted({c.num_epochs for c, _ in runs})
    seconds = sum(e["seconds"] for _, h in runs for e in h["epochs"])
    lines.append("")
    lines.append(f"{len(runs)} runs (seeds {', '.join(map(str, seeds))}; {'/'.join(map(str, epochs))} epochs; "
                 f"width {'/'.join(str(w) for w in sorted({c.width for c, _ in runs}))}). \"Trained\": test accuracy "
                 f"of at least {percent(TRAINED)} (twice chance). Training time, all runs together: "
                 f"{seconds / 60:.1f} min of epoch wall time.")
    return "\n".join(lines)


def init_gradient_check(points: list[tuple[int, float, float]]) -> str:
    """Whether the first layer's gradient norm at step 0 tells which plain MLPs will train, from (hidden layers,
    norm, final validation accuracy) per run."""
    runs = f"plain runs of {STALL_LAYERS[0]} to {STALL_LAYERS[1]} hidden layers"
    if not points:
        return f"No {runs} with their gradient norms logged at step 0."
    trained = sum(acc >= TRAINED for _, _, acc in points)
    threshold = init_gradient_threshold(points)
    return (f"{len(points)} {runs}, {trained} of which train (a final validation accuracy of at least "
            f"{percent(TRAINED)}): {threshold.statement('a first-layer gradient norm at step 0')}.")


def network_label(config: RunConfig) -> str:
    """A CNN by its depth and shortcuts: "depth 20, residual (step 2, identity shortcuts)"."""
    if not config.residual_step:
        return f"depth {config.depth}, plain"
    return f"depth {config.depth}, residual (step {config.residual_step}, {config.shortcut} shortcuts)"


def exercise2_table(runs: list[tuple[RunConfig, dict]]) -> str:
    """One row per network (its seeds together): size, seeds, precision, median and range over seeds of the final
    training loss and of the test accuracy, and the median time per epoch."""
    networks: dict[tuple, list[tuple[RunConfig, dict]]] = {}
    for config, history in runs:
        networks.setdefault((config.depth, config.residual_step, config.shortcut or ""), []).append((config, history))
    lines = ["| network | parameters | seeds | epochs | precision | final train loss: median (range) | "
             "test acc: median (range) | time per epoch |", "|---|---:|---:|---:|---|---|---|---:|"]
    for key in sorted(networks):
        group = networks[key]
        config = group[0][0]
        epochs = "/".join(str(n) for n in sorted({len(h["epochs"]) for _, h in group}))
        precision = "/".join(sorted({"bf16 autocast" if c.amp else "float32" for c, _ in group}))
        seconds = statistics.median(e["seconds"] for _, h in group for e in h["epochs"])
        lines.append(f"| {network_label(config)} | {config.num_params:,} | {len(group)} | {epochs} | {precision} | "
                     f"{median_range([h['epochs'][-1]['train_loss'] for _, h in group], loss)} | "
                     f"{median_range([h['test']['acc'] for _, h in group], percent)} | {seconds:.0f} s |")
    seeds = sorted({c.seed for c, _ in runs})
    lines.append("")
    lines.append(f"{len(runs)} run{'s' if len(runs) > 1 else ''} (seed{'s' if len(seeds) > 1 else ''} "
                 f"{', '.join(map(str, seeds))}); median and range over each network's seeds.")
    return "\n".join(lines)


def images_seen(config: RunConfig, history: dict) -> int | None:
    """Training images a run saw: its epochs times the images its config leaves for training, when its steps agree
    (None for a run on a smaller copy of the dataset, whose size its files do not hold)."""
    images = config.limit_train or DATASETS[config.dataset].num_train - config.val_size
    steps = history["epochs"][-1]["steps"]
    return config.num_epochs * images if steps == config.num_epochs * num_batches(images, config.batch_size) else None


def run_minutes(history: dict) -> float:
    """A run's minutes from its first step to its test result: its epochs (training and each epoch's scoring) and its
    final test (where its history holds that time)."""
    return (sum(e["seconds"] for e in history["epochs"]) + history["test"].get("seconds", 0)) / 60


def split_machine(name: str) -> tuple[str, int | None]:
    """A machine as a run's history names it (utils.machine_description): the CPU's model and its thread count, or a
    GPU's name and None."""
    match = re.fullmatch(r"(.*), (\d+) threads?", name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def machines(runs: list[tuple[RunConfig, dict]]) -> str:
    """The machines the runs' histories name, each CPU once with the thread counts it trained with ("Intel Xeon, 1
    and 2 threads")."""
    counts: dict[str, set[int]] = {}
    for _, history in runs:
        for name in history.get("machines", []):
            model, threads = split_machine(name)
            counts.setdefault(model, set()).update([threads] if threads else [])
    named = [model + (f", {' and '.join(map(str, sorted(n)))} thread{'s' if n != {1} else ''}" if n else "")
             for model, n in sorted(counts.items())]
    return "; ".join(named) or "machines the runs did not record"


def threads(history: dict) -> str:
    """The CPU thread counts a run trained with, from the machines its history names: "1", "1 and 2"; "-" when it
    names none (a GPU, or a run of before 7 December 2026)."""
    counts = sorted({n for name in history.get("machines", []) if (n := split_machine(name)[1])})
    return " and ".join(map(str, counts)) or "-"


def fast_table(runs: list[tuple[RunConfig, dict]]) -> str:
    """One row per network of the time-to-accuracy runs: images seen, median and range over seeds of the test
    accuracy of the kept weights, with flip test-time augmentation and of the trained weights without an average,
    and minutes per run; then the published accuracy, the machines and any flags the runs add to the preset."""
    networks: dict[tuple, list[tuple[RunConfig, dict]]] = {}
    for config, history in runs:
        # an --ema run's kept weights are its average: a row of its own, so that each column scores one kind
        networks.setdefault((config.residual_step > 0, config.depth, config.ema), []).append((config, history))
    lines = ["| network | seeds | training images seen | test acc: median (range) | with flip TTA | "
             "trained weights, no average | minutes per run |", "|---|---:|---:|---|---|---|---:|"]

    def column(values: list[float | None]) -> str:
        return median_range(values, percent2) if None not in values else "-"

    for key in sorted(networks, reverse=True):
        group = networks[key]
        config = group[0][0]
        images = "/".join(sorted({f"{n:,}" if n else "-" for n in (images_seen(c, h) for c, h in group)}))
        average = f", --ema {config.ema:g}" if config.ema else ""
        lines.append(f"| {network_label(config)}{average} | {len(group)} | {images} | "
                     f"{column([h['test']['acc'] for _, h in group])} | "
                     f"{column([h['test'].get('acc_flip') for _, h in group])} | "
                     f"{column([trained_test_acc(h) for _, h in group])} | "
                     f"{statistics.median(run_minutes(h) for _, h in group):.1f} |")
    lines.append("")
    lines.append(f"{PUBLISHED[0]}: {PUBLISHED[1]:.2%} test accuracy. Minutes: each run's epochs (training and each "
                 f"epoch's scoring) and its final test, without reading the data; trained on {machines(runs)}.")
    recipe = preset_config("resnet20_fast")
    changes = [recipe_changes(c, dataclasses.replace(recipe, num_conv_per_level=c.num_conv_per_level,
                                                     residual_step=c.residual_step)) for c, _ in runs]
    extra = sorted(set(changes) - {"the recipe"})
    if extra:
        lines.append("Trained with flags beyond --preset resnet20_fast and its network: " + "; ".join(
            f"{flags} ({changes.count(flags)} of {len(runs)} runs)" for flags in extra) + ".")
    return "\n".join(lines)


def preset_config(name: str) -> RunConfig:
    """The first run a preset describes (its first value of each swept flag)."""
    return RunConfig(**{key: value[0] if isinstance(value, list) else value for key, value in PRESETS[name].items()})


def recipe_changes(config: RunConfig, recipe: RunConfig) -> str:
    """The flags by which a run differs from `recipe` (where it ran and its seed aside; a warm-up that follows the
    length of training is no change of its own), as a command line gives them; "the recipe" when none."""
    same_length = dataclasses.replace(recipe, num_epochs=config.num_epochs, warmup_epochs=None, run_name=None)
    ignored = {"run_name", "seed", *RunConfig.RESUMABLE_CHANGES}
    mine, theirs = dataclasses.asdict(config), dataclasses.asdict(same_length)
    changes = [f"--{name} {mine[name]}" for name in mine if name not in ignored and mine[name] != theirs[name]]
    if config.num_epochs != recipe.num_epochs:
        changes.insert(0, f"--num_epochs {config.num_epochs}")
    return " ".join(changes) or "the recipe"


def ablation_table(runs: list[tuple[RunConfig, dict]]) -> str:
    """One row per run: its changes from --preset resnet20_fast, seed, images seen, final validation accuracy where
    it has a validation split, test accuracies (the kept weights, with flip TTA, the trained weights) and minutes."""
    recipe = preset_config("resnet20_fast")
    lines = ["| change from the recipe | seed | training images seen | final validation acc | test acc | "
             "with flip TTA | trained weights, no average | minutes (threads) |",
             "|---|---:|---:|---|---|---|---|---:|"]
    rows = sorted(((recipe_changes(c, recipe), c.seed, c, h) for c, h in runs), key=lambda row: row[:2])
    for changes, seed, config, history in rows:
        images = images_seen(config, history)
        val = percent2(history["epochs"][-1]["val_acc"]) if "val_acc" in history["epochs"][-1] else "none"
        tests = [percent2(history["test"][key]) if key in history["test"] else "-"
                 for key in ("acc", "acc_flip", "acc_trained_weights")]
        lines.append(f"| {changes} | {seed} | {f'{images:,}' if images else '-'} | {val} | {' | '.join(tests)} | "
                     f"{run_minutes(history):.1f} ({threads(history)}) |")
    lines.append("")
    lines.append(f"The recipe: --preset resnet20_fast. Trained on {machines(runs)}.")
    return "\n".join(lines)


def trained_test_acc(history: dict) -> float:
    """A run's test accuracy of its trained weights: an --ema run's without the average, which trains the same
    weights, so that networks are compared as trained whichever weights their runs scored."""
    return history["test"].get("acc_trained_weights", history["test"]["acc"])


def degradation_gap(ex2: list[tuple[RunConfig, dict]], fast: list[tuple[RunConfig, dict]]) -> str:
    """How far the deepest plain network tests below the shallower plain ones, and residual above plain, after
    Exercise 2's 10 epochs and after the time-to-accuracy recipe: medians over the seeds each network has."""
    def medians(runs: list[tuple[RunConfig, dict]]) -> dict[tuple[int, bool], float]:
        by_net: dict[tuple[int, bool], list[float]] = {}
        for config, history in runs:
            by_net.setdefault((config.depth, config.residual_step > 0), []).append(trained_test_acc(history))
        return {net: statistics.median(accs) for net, accs in by_net.items()}

    recipes = {f"Exercise 2 ({'/'.join(str(n) for n in sorted({c.num_epochs for c, _ in ex2}))} epochs)": medians(ex2),
               f"resnet20_fast ({'/'.join(str(n) for n in sorted({c.num_epochs for c, _ in fast}))} epochs)":
                   medians(fast)}
    nets = sorted(set.intersection(*(set(m) for m in recipes.values())))
    if not nets:
        return "No network was trained with both recipes."
    lines = ["| network | " + " | ".join(f"{name}: median test acc, trained weights" for name in recipes) + " |",
             "|---|" + "---|" * len(recipes)]
    for depth, residual in nets:
        label = f"depth {depth}, {'residual' if residual else 'plain'}"
        lines.append(f"| {label} | " + " | ".join(percent(m[(depth, residual)]) for m in recipes.values()) + " |")
    plain = sorted(d for d, r in nets if not r)
    if len(plain) > 1:
        deep = plain[-1]
        for shallow in plain[:-1]:
            gaps = [100 * (m[(shallow, False)] - m[(deep, False)]) for m in recipes.values()]
            below = [f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'}" for gap in gaps]
            lines.append("")
            lines.append(f"Plain depth {deep} tests {below[0]} plain depth {shallow} after {list(recipes)[0]} and "
                         f"{below[1]} it after {list(recipes)[1]}.")
    return "\n".join(lines)


def exercise2_checks(runs: list[tuple[RunConfig, dict]], shortcuts_at_shallowest: bool = False) -> str:
    """What the lab expects to see, judged seed by seed: each line says for how many of the seeds that both
    networks were trained with it holds, and holds only when it does for every one of them. Shortcuts are judged
    at the shallowest depth only when asked: Exercise 2's depth 8 is not expected to need them, while depth 20 is
    where He et al.'s comparison of plain and residual networks (their Fig. 6) starts."""
    by_run = {(c.depth, c.residual_step > 0, c.seed): h for c, h in runs}
    depths = sorted({c.depth for c, _ in runs})
    checks = []

    def losses(history: dict) -> list[float]:
        return [e["train_loss"] for e in history["epochs"]]

    def check(text: str, first: tuple[int, bool], second: tuple[int, bool], holds, medians: bool = False) -> None:
        """Add `text` judged by `holds(history of first, history of second)` on every seed both networks have."""
        seeds = sorted(s for d, r, s in by_run if (d, r) == first and (*second, s) in by_run)
        if not seeds:
            return
        held = sum(bool(holds(by_run[(*first, s)], by_run[(*second, s)])) for s in seeds)
        if medians:
            text += " (median test acc {} vs {})".format(
                *(percent(statistics.median(trained_test_acc(by_run[(*net, s)]) for s in seeds))
                  for net in (first, second)))
        checks.append((f"{text}: for {held} of {len(seeds)} seeds", held == len(seeds)))

    deepest = depths[-1]
    for shallow in depths[:-1]:
        check(f"plain depth {deepest} has a higher training loss than plain depth {shallow} at every epoch",
              (deepest, False), (shallow, False), lambda a, b: all(x > y for x, y in zip(losses(a), losses(b))))
        check(f"plain depth {deepest} tests worse than plain depth {shallow}", (deepest, False), (shallow, False),
              lambda a, b: trained_test_acc(a) < trained_test_acc(b), medians=True)
        check(f"residual depth {deepest} ends with a training loss at most that of residual depth {shallow}",
              (deepest, True), (shallow, True), lambda a, b: losses(a)[-1] <= losses(b)[-1])
        check(f"residual depth {deepest} tests at least as well as residual depth {shallow}", (deepest, True),
              (shallow, True), lambda a, b: trained_test_acc(a) >= trained_test_acc(b), medians=True)
    for depth in depths if shortcuts_at_shallowest else depths[1:]:
        check(f"at depth {depth} the residual network's training loss is below the plain one's at every epoch and "
              "it tests better", (depth, True), (depth, False),
              lambda a, b: all(x < y for x, y in zip(losses(a), losses(b)))
              and trained_test_acc(a) > trained_test_acc(b), medians=True)
    return "\n".join(f"- {'holds' if ok else '**does not hold**'}: {text}" for text, ok in checks)


def best_checkpoint(runs: list[tuple[RunConfig, dict]], out_dir: Path) -> Path:
    """The checkpoint of the residual run with the best final validation accuracy over every network and seed
    (its checkpoint holds the final weights; never chosen on the test set)."""
    residual = [(h["epochs"][-1]["val_acc"], c.run_name) for c, h in runs if c.residual_step and c.val_size]
    if not residual:
        raise UsageError(f"{out_dir} holds no finished residual run with a validation split to choose by")
    val_acc, name = max(residual)
    checkpoint = RunFiles(out_dir / name).checkpoint
    if not checkpoint.is_file():
        raise UsageError(f"the best residual run of {out_dir}, {name} (validation accuracy {val_acc:.1%}), has no "
                         f"{checkpoint.name}: give the out_dir that trained it (kept results hold no checkpoints), "
                         "or train it again with --overwrite")
    try:
        load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise UsageError(f"the best residual run of {out_dir}, {name}: {e}") from None
    return checkpoint


def with_missing(table: str, missing: list[str]) -> str:
    """`table`, followed by the names of the sweep's runs it lacks when there are any."""
    if not missing:
        return table
    return (f"{table}\n\nNot in this table ({len(missing)} runs of the sweep, unfinished, unreadable or not trained "
            f"yet): {', '.join(sorted(missing))}.")


def check_keep(keep: Path, sweeps: dict[str, Path]) -> None:
    """Finish or undo the replacements of KEEP's folders (KEPT) that a kill cut short (finish_swap), then refuse a
    --keep folder whose kept folders hold anything but kept results (a sweep's own run folders, files of the
    user's), which keep_results would replace, and kept results that a sweep would replace by fewer runs or by runs
    trained otherwise (a toy make reproduce: the README's tables are made from them)."""
    check_writable(keep, "--keep")
    for name in KEPT:
        target = keep / name
        finish_swap(target)
        if target.is_file() or target.is_dir() and not all(RunFiles(p).is_kept_summary() for p in target.iterdir()):
            raise UsageError(f"--keep {keep}: {target} holds more than kept results (run folders with checkpoints, "
                             "other files) or is a file; give another folder (the repository keeps them in results/)")
        if name in sweeps and target.is_dir():
            check_same_sweep(target, sweeps[name])


def check_same_sweep(kept: Path, out_dir: Path) -> None:
    """A UsageError unless the sweep in `out_dir` has every run kept in `kept`, trained with the same settings
    (where it ran aside), and finished where the kept one had."""
    names = [p.name for p in kept.iterdir()]
    for name in names:
        old, new = RunFiles(kept / name), RunFiles(out_dir / name)
        saved, config = old.read_config(), new.read_config()
        differ = None if config is None or saved is None else config.changed_flag(saved, more_epochs=False)
        if config is None:
            problem = "is missing"
        elif differ:
            problem = f"was trained with {differ}"
        else:
            was_finished = saved is not None and finished(saved, old.read_history())
            problem = "has not finished" if was_finished and not finished(config, new.read_history()) else None
        if problem:
            raise UsageError(f"--keep: {out_dir} would replace the {len(names)} runs kept in {kept}, but its {name} "
                             f"{problem}; to replace them all the same, remove {kept} first")


def finished(config: RunConfig, history: dict | None) -> bool:
    """Whether a run's history holds its test result after every epoch its config asks for."""
    return history is not None and "test" in history and len(history["epochs"]) == config.num_epochs


def keep_results(keep: Path, sweeps: dict[str, Path]) -> None:
    """Replace keep/<exercise> with the summaries (RunFiles.keep_summary) of every run folder of that exercise's
    out_dir that report.py reads, finished or not, so that the tables made from them are the same."""
    for name, out_dir in sweeps.items():
        target, staging, old = keep / name, keep / f".{name}.tmp", set_aside(keep / name)
        shutil.rmtree(staging, ignore_errors=True)
        runs = [RunFiles(p) for p in sorted(out_dir.iterdir()) if p.is_dir() and RunFiles(p).exist()]
        try:
            with reporting_full_disk(staging):
                staging.mkdir(parents=True)
                for files in runs:
                    files.keep_summary(staging / files.run_dir.name)
        except BaseException:  # what was kept before stays; no half-written copy is left beside it
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # the old folder goes aside and is removed last: a kill at any moment leaves it, or the new one, for
        # finish_swap to put in place
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        print(f"kept the {len(runs)} run folders of {out_dir} in {target}")


def set_aside(target: Path) -> Path:
    """Where keep_results moves a kept folder while it puts the new one in its place."""
    return target.with_name(f".{target.name}.old")


def finish_swap(target: Path) -> None:
    """Finish or undo a replacement of the kept folder `target` that a kill cut short: the old folder set aside is
    removed once the new one is in place, and put back where it is not."""
    old = set_aside(target)
    if not old.is_dir():
        return
    if target.exists():
        shutil.rmtree(old)
    else:
        old.rename(target)
        print(f"{target}: put back, as kept before a report.py --keep that was cut short", file=sys.stderr)


def replace_block(texts: dict[Path, str], name: str, content: str) -> dict[Path, str]:
    """`texts` (by file) with the lines between <!-- report:name --> and <!-- /report:name --> replaced by `content`
    in whichever of them holds that block."""
    pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.S)
    if not any(pattern.search(text) for text in texts.values()):
        raise UsageError(f"--readme: no <!-- report:{name} --> ... <!-- /report:{name} --> block in "
                         f"{' or '.join(map(str, texts))}")
    return {path: pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)
            for path, text in texts.items()}


def stall_study(out_dir: Path, runs: list[tuple[RunConfig, dict]]
                ) -> tuple[list[tuple[RunConfig, dict, tuple[list[int], dict]]], int]:
    """(config, history, gradient norms) of the runs of the initialisation study; a run whose grad_norms.csv
    cannot be read is listed on stderr and counted."""
    study, unread = [], 0
    for config, history in runs:
        if in_stall_study(config):
            try:
                study.append((config, history, RunFiles(out_dir / config.run_name).read_grad_norms()))
            except (OSError, ValueError, IndexError):
                print(f"{out_dir}: not used for the initialisation check: {config.run_name}: no readable "
                      "grad_norms.csv", file=sys.stderr)
                unread += 1
    return study, unread


def faithfulness_block(path: Path) -> str:
    """The table of a faithfulness.json written by cam.py --faithfulness, and what it measured; or a UsageError."""
    try:
        record = read_json(path)
    except OSError as e:
        raise UsageError(f"--faithfulness {path}: {e.strerror or e}") from None
    except ValueError as e:
        problem = f"not JSON: {first_line(e)}"
    else:
        problem = faithfulness.record_problem(record)
    if problem:
        raise UsageError(f"--faithfulness {path} is not a faithfulness.json of cam.py --faithfulness ({problem})")
    table = faithfulness.format_table(record["maps"])
    what = {"pred": "the predicted class", "true": "the true class"}.get(record["class"], f"class {record['class']}")
    return (f"{table}\n\n{record['num_images']:,} {record['dataset']} test images, maps of {what}, model "
            f"{Path(record['checkpoint']).parent.name}.")


def draw_time_to_accuracy(fast: list[tuple[RunConfig, dict]], ex2: list[tuple[RunConfig, dict]], path: Path) -> None:
    """The time-to-accuracy figure of the recipe's network (the network of --fast with the most seeds: residual depth
    20) under both recipes, He et al.'s accuracy as the target."""
    networks = [(c.depth, c.residual_step) for c, _ in fast]
    network = max(networks, key=networks.count)

    def timed(runs: list[tuple[RunConfig, dict]], recipe: str) -> list[TimedRun]:
        epochs = "/".join(str(n) for n in sorted({c.num_epochs for c, _ in runs}))
        return [timed_run(f"{recipe}, {epochs} epochs", c, h) for c, h in runs if (c.depth, c.residual_step) == network]

    check_writable(path.parent, "--time_to_accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    with reporting_full_disk(path):
        plot_time_to_accuracy(timed(ex2, "Exercise 2") + timed(fast, "resnet20_fast"), PUBLISHED, machines(ex2 + fast),
                              path)
    print(f"wrote {path}")


def read_readme(path: Path) -> str:
    """The text of --readme, or a UsageError saying why it cannot be read."""
    try:
        return path.read_text()
    except IsADirectoryError:
        raise UsageError(f"--readme {path} is a folder; give the README file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--readme {path}: {getattr(e, 'strerror', None) or e}") from None


def main(args: argparse.Namespace) -> dict[str, str]:
    """Print (and with --readme, write) the tables; return them by block name."""
    others = get_args_parser().given_flags(args, vars(args).keys() - {"best_checkpoint"})
    if args.best_checkpoint is not None and others:
        raise UsageError(f"--best_checkpoint prints one path and nothing else; give {', '.join(others)} in another "
                         "command")
    if args.allow_missing and args.readme is None:
        raise UsageError("--allow_missing lets --readme write tables that lack runs; give --readme too, or leave "
                         "--allow_missing out")
    if args.keep is not None and all(getattr(args, name) is None for name in ("ex1", "ex2", "fast", "ablation")):
        raise UsageError("--keep copies the runs of --ex1, --ex2, --fast and --ablation; give one of them too, or "
                         "leave --keep out")
    if args.time_to_accuracy is not None and args.fast is None:
        raise UsageError("--time_to_accuracy draws the runs of --fast (and --ex2); give --fast too")
    if args.time_to_accuracy is not None and Path(args.time_to_accuracy).is_dir():
        raise UsageError(f"--time_to_accuracy {args.time_to_accuracy} is a folder; give the .png file to draw")
    if args.best_checkpoint is not None:
        out_dir = Path(args.best_checkpoint)
        print(best_checkpoint(finished_runs(out_dir, "--best_checkpoint")[0], out_dir))
        return {}
    if all(getattr(args, name) is None for name in ("ex1", "ex2", "fast", "ablation", "faithfulness")):
        raise UsageError("give --ex1, --ex2, --fast and/or --ablation (the out_dir of a sweep) and/or --faithfulness, "
                         "or --best_checkpoint")
    texts = {path: read_readme(path) for path in map(Path, args.readme)} if args.readme is not None else None
    if args.keep is not None:
        check_keep(Path(args.keep), {name: Path(out) for name, flag in KEPT.items() if (out := getattr(args, flag))})
    blocks, incomplete, sweeps = {}, 0, {}
    if args.ex1 is not None:
        out_dir = Path(args.ex1)
        runs, missing = finished_runs(out_dir, "--ex1")
        study, unread = stall_study(out_dir, runs)
        blocks["ex1"] = with_missing(exercise1_table(runs), missing)
        blocks["ex1-init"] = init_gradient_check(init_gradient_points(study))
        incomplete += len(missing) + unread
        sweeps["ex1"] = out_dir
    if args.ex2 is not None:
        out_dir = Path(args.ex2)
        runs, missing = finished_runs(out_dir, "--ex2")
        blocks["ex2"] = with_missing(exercise2_table(runs), missing)
        blocks["ex2-checks"] = exercise2_checks(runs)
        incomplete += len(missing)
        sweeps["ex2"] = out_dir
        ex2_runs = runs
    if args.fast is not None:
        out_dir = Path(args.fast)
        fast_runs = finished_runs(out_dir, "--fast")[0]
        blocks["fast"] = fast_table(fast_runs)
        if len({(c.depth, c.residual_step) for c, _ in fast_runs}) > 1:  # the degradation question's networks too
            blocks["fast-checks"] = exercise2_checks(fast_runs, shortcuts_at_shallowest=True)
            if args.ex2 is not None:
                blocks["fast-degradation"] = degradation_gap(ex2_runs, fast_runs)
        sweeps["fast"] = out_dir
        if args.time_to_accuracy is not None:
            draw_time_to_accuracy(fast_runs, ex2_runs if args.ex2 is not None else [], Path(args.time_to_accuracy))
    if args.ablation is not None:
        out_dir = Path(args.ablation)
        runs = finished_runs(out_dir, "--ablation")[0]
        networks = {(c.depth, c.residual_step) for c, _ in runs}  # and the --fast runs of those networks beside them
        blocks["fast-ablation"] = ablation_table(runs + [(c, h) for c, h in (fast_runs if args.fast else [])
                                                         if (c.depth, c.residual_step) in networks])
        sweeps["fast-ablation"] = out_dir
    if args.faithfulness is not None:
        blocks["ex3-faithfulness"] = faithfulness_block(Path(args.faithfulness))
    for name, content in blocks.items():
        print(f"<!-- report:{name} -->\n{content}\n")
    if texts is not None:
        if incomplete and not args.allow_missing:
            raise UsageError(f"not rewriting {' and '.join(args.readme)}: {incomplete} runs of the sweep are not in "
                             "these tables (listed above); finish them, or pass --allow_missing to write the tables "
                             "without them")
        for name, content in blocks.items():
            texts = replace_block(texts, name, content)
        for path, text in texts.items():
            # through a symbolic link (a README kept elsewhere): the link stays, the file it names is rewritten
            atomic_write(path.resolve(), lambda tmp, text=text: tmp.write_text(text))
        print(f"rewrote {len(blocks)} tables in {' and '.join(args.readme)}")
    if args.keep is not None:
        keep_results(Path(args.keep), sweeps)
    return blocks


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
