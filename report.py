"""The README's results tables, made from run folders so that no number in them is typed by hand.

    python report.py --ex1 runs/reproduce/ex1 --ex2 runs/reproduce/ex2            # print the tables
    python report.py --ex1 runs/reproduce/ex1 --ex2 runs/reproduce/ex2 --readme README.md   # and rewrite them there
    python report.py --best_checkpoint runs/reproduce/ex2                        # the CAM model of Exercise 3
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from config import RunConfig
from runs import RunFiles
from utils import ArgumentParser, UsageError, atomic_write, run_cli

TRAINED = 0.2  # a run "trains" when its test accuracy reaches twice chance; a stalled MLP predicts one class (~11%)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The report's flags; each `--snake_case` flag is also accepted as `--kebab-case`."""
    parser = ArgumentParser(description="Results tables of Exercises 1 and 2 from their run folders.",
                            add_help=add_help)
    parser.add("--ex1", default=None, help="out_dir of the Exercise 1 sweep (MLPs on MNIST)")
    parser.add("--ex2", default=None, help="out_dir of the Exercise 2 sweep (CNNs on CIFAR-10)")
    parser.add("--readme", default=None,
               help="also rewrite the tables between <!-- report:NAME --> and <!-- /report:NAME --> in this file")
    parser.add("--best_checkpoint", default=None,
               help="print the checkpoint of the residual run with the best final validation accuracy in this "
                    "out_dir, and nothing else")
    return parser


def finished_runs(out_dir: Path) -> list[tuple[RunConfig, dict]]:
    """(config, history) of every finished run folder directly under `out_dir`, in name order."""
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a folder; run the sweep first")
    runs = []
    for run_dir in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        files = RunFiles(run_dir)
        config, history = files.read_config(), files.read_history()
        if config is not None and history is not None and "test" in history:
            runs.append((config, history))
    if not runs:
        raise UsageError(f"{out_dir} holds no finished runs; run the sweep first")
    return runs


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def shortcuts(config: RunConfig) -> str:
    return f"residual (step {config.residual_step})" if config.residual_step else "plain"


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
            accs = sorted(cells.get((layers, kind), []))
            if not accs:
                row += ["", ""]
                continue
            trained = sum(a >= TRAINED for a in accs)
            row += [f"{trained}/{len(accs)}",
                    f"{percent(statistics.median(accs))} ({percent(accs[0])} to {percent(accs[-1])})"]
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


def exercise2_table(runs: list[tuple[RunConfig, dict]]) -> str:
    """One row per network: depth, shortcuts, size, final losses and accuracies, and training time."""
    lines = ["| network | parameters | epochs | final train loss | final val acc | test acc | time per epoch |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for config, history in sorted(runs, key=lambda r: (r[0].depth, r[0].residual_step, r[0].seed)):
        last = history["epochs"][-1]
        seconds = statistics.median(e["seconds"] for e in history["epochs"])
        lines.append(f"| depth {config.depth}, {shortcuts(config)}, seed {config.seed} | {config.num_params:,} | "
                     f"{len(history['epochs'])} | {last['train_loss']:.3f} | {percent(last['val_acc'])} | "
                     f"{percent(history['test']['acc'])} | {seconds:.0f} s |")
    return "\n".join(lines)


def exercise2_checks(runs: list[tuple[RunConfig, dict]]) -> str:
    """What the lab expects to see, each marked as holding or not in these runs (seed-0 runs only)."""
    seed = min(c.seed for c, _ in runs)
    by_net = {(c.depth, c.residual_step > 0): h for c, h in runs if c.seed == seed}
    depths = sorted({d for d, _ in by_net})
    deepest, checks = depths[-1], []

    def losses(key):
        return [e["train_loss"] for e in by_net[key]["epochs"]]

    def test(key):
        return by_net[key]["test"]["acc"]

    for shallow in depths[:-1]:
        plain_deep, plain_shallow = (deepest, False), (shallow, False)
        if plain_deep in by_net and plain_shallow in by_net:
            worse = [a > b for a, b in zip(losses(plain_deep), losses(plain_shallow))]
            checks.append((f"plain depth {deepest} has a higher training loss than plain depth {shallow} at every "
                           f"epoch ({sum(worse)} of {len(worse)} epochs)", all(worse)))
            checks.append((f"plain depth {deepest} tests worse than plain depth {shallow} "
                           f"({percent(test(plain_deep))} vs {percent(test(plain_shallow))})",
                           test(plain_deep) < test(plain_shallow)))
        res_deep, res_shallow = (deepest, True), (shallow, True)
        if res_deep in by_net and res_shallow in by_net:
            final = losses(res_deep)[-1], losses(res_shallow)[-1]
            checks.append((f"residual depth {deepest} ends with a training loss at most that of residual depth "
                           f"{shallow} ({final[0]:.3f} vs {final[1]:.3f})", final[0] <= final[1]))
            checks.append((f"residual depth {deepest} tests at least as well as residual depth {shallow} "
                           f"({percent(test(res_deep))} vs {percent(test(res_shallow))})",
                           test(res_deep) >= test(res_shallow)))
    for depth in depths[1:]:  # at the smallest depth shortcuts are not expected to matter
        if (depth, True) in by_net and (depth, False) in by_net:
            lower = [a < b for a, b in zip(losses((depth, True)), losses((depth, False)))]
            checks.append((f"at depth {depth} the residual network's training loss is below the plain one's at "
                           f"every epoch ({sum(lower)} of {len(lower)} epochs) and it tests better "
                           f"({percent(test((depth, True)))} vs {percent(test((depth, False)))})",
                           all(lower) and test((depth, True)) > test((depth, False))))
    return "\n".join(f"- {'holds' if ok else '**does not hold**'}: {text}" for text, ok in checks)


def best_checkpoint(runs: list[tuple[RunConfig, dict]], out_dir: Path) -> Path:
    """The checkpoint of the residual run with the best final validation accuracy (never chosen on the test set)."""
    residual = [(h["epochs"][-1]["val_acc"], c.run_name) for c, h in runs if c.residual_step]
    if not residual:
        raise UsageError(f"{out_dir} holds no finished residual run")
    return RunFiles(out_dir / max(residual)[1]).checkpoint


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with the lines between <!-- report:name --> and <!-- /report:name --> replaced by `content`."""
    pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.S)
    if not pattern.search(text):
        raise UsageError(f"--readme has no <!-- report:{name} --> ... <!-- /report:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)


def main(args: argparse.Namespace) -> dict[str, str]:
    """Print (and with --readme, write) the tables; return them by block name."""
    if args.best_checkpoint is not None:
        out_dir = Path(args.best_checkpoint)
        print(best_checkpoint(finished_runs(out_dir), out_dir))
        return {}
    if args.ex1 is None and args.ex2 is None:
        raise UsageError("give --ex1 and/or --ex2 (the out_dir of a sweep), or --best_checkpoint")
    blocks = {}
    if args.ex1 is not None:
        blocks["ex1"] = exercise1_table(finished_runs(Path(args.ex1)))
    if args.ex2 is not None:
        runs = finished_runs(Path(args.ex2))
        blocks["ex2"] = exercise2_table(runs)
        blocks["ex2-checks"] = exercise2_checks(runs)
    for name, content in blocks.items():
        print(f"<!-- report:{name} -->\n{content}\n")
    if args.readme is not None:
        readme = Path(args.readme)
        text = readme.read_text()
        for name, content in blocks.items():
            text = replace_block(text, name, content)
        atomic_write(readme, lambda tmp: tmp.write_text(text))
        print(f"rewrote {len(blocks)} tables in {readme}")
    return blocks


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
