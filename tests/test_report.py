"""report.py: the README's tables and checks from run folders, the CAM checkpoint, and the README rewrite."""
import dataclasses
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import report
import utils
from conftest import ROOT, run_config
from runs import RunFiles, save_checkpoint


def write_run(out_dir, config, train_losses, val_accs, test_acc, finished=True, first_grad_norm=None) -> None:
    """A run folder as train_run leaves it: config.json and history.json (test result only when finished), and
    with `first_grad_norm`, a grad_norms.csv of two steps whose first weight had this norm at step 0."""
    if finished:  # a finished run's history holds every epoch its config asks for
        config = dataclasses.replace(config, num_epochs=len(train_losses))
    files = RunFiles(out_dir / config.run_name)
    if first_grad_norm is not None:
        files.start_grad_norms(["input.1.weight", "head.weight"])
        files.append_grad_norms([0, 1], torch.tensor([[first_grad_norm, 1.0], [1.0, 1.0]]))
    utils.write_json(files.config, config.to_dict())
    epochs = [{"epoch": i + 1, "train_loss": loss, "val_loss": 1.0, "val_acc": acc, "lr": 0.1, "seconds": 10.0 + i,
               "steps": 10 * (i + 1)} for i, (loss, acc) in enumerate(zip(train_losses, val_accs))]
    test = {"test": {"loss": 1.0, "acc": test_acc}} if finished else {}
    utils.write_json(files.history, {"epochs": epochs, **test})


def mlp(hidden: int, step: int, seed: int):
    return run_config("--num_hidden_layers", str(hidden), "--residual_step", str(step), "--seed", str(seed))


def cnn(convs: int, step: int, seed: int = 0):
    return run_config("--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "4", "--num_levels", "1",
                      "--num_conv_per_level", str(convs), "--residual_step", str(step), "--seed", str(seed))


def test_exercise1_table_counts_trained_seeds_with_median_and_range(tmp_path):
    for seed, acc in enumerate([0.1135, 0.80, 0.1135]):
        write_run(tmp_path, mlp(4, 0, seed), [2.3], [acc], acc)
    for seed, acc in enumerate([0.95, 0.93, 0.94]):
        write_run(tmp_path, mlp(4, 2, seed), [0.2], [acc], acc)
    write_run(tmp_path, mlp(8, 0, 0), [2.3], [0.5], 0.5, finished=False)  # unfinished: left out
    table = report.exercise1_table(report.read_runs(tmp_path)[0])
    assert "| 4 | 1/3 | 11.3% (11.3% to 80.0%) | 3/3 | 94.0% (93.0% to 95.0%) |" in table
    assert "| 8 |" not in table and "6 runs (seeds 0, 1, 2; 1 epochs; width 16)" in table


def test_exercise1_init_check_finds_the_threshold_on_the_first_layers_gradient_at_step_0(tmp_path):
    for hidden, step, seed, first_norm, acc in [(14, 0, 0, 1e-6, 0.8), (14, 0, 1, 1e-9, 0.11), (18, 0, 0, 1e-10, 0.11),
                                                (14, 2, 0, 1e-12, 0.9), (10, 0, 0, 1e-12, 0.9)]:
        write_run(tmp_path, mlp(hidden, step, seed), [1.0], [acc], acc, first_grad_norm=first_norm)
    blocks = report.main(report.get_args_parser().parse_args(["--ex1", str(tmp_path)]))
    assert blocks["ex1-init"] == (
        "3 plain runs of 14 to 34 hidden layers, 1 of which train (a final validation accuracy of at least 20.0%): "
        "runs with a first-layer gradient norm at step 0 above 3.2e-8 train and the others stall: this threshold "
        "separates them exactly.")


def three_seeds_of_four_networks(out_dir) -> None:
    """Depth 3 and 5, plain and residual, seeds 0-2: the deeper plain net trains worse for every seed; the deeper
    residual net trains better for every seed but tests worse for seed 2 only."""
    for seed in range(3):
        write_run(out_dir, cnn(1, 0, seed), [2.0, 1.5], [0.5, 0.6], 0.60 + seed / 100)
        write_run(out_dir, cnn(1, 1, seed), [1.9, 1.4 + seed / 100], [0.5, 0.6], 0.62)
        write_run(out_dir, cnn(3, 0, seed), [2.1, 1.6], [0.4, 0.5], 0.50)
        write_run(out_dir, cnn(3, 1, seed), [1.8, 1.3], [0.6, 0.7], 0.59 if seed == 2 else 0.64 + seed / 100)


def test_exercise2_table_gives_each_network_the_median_and_range_over_its_seeds(tmp_path):
    three_seeds_of_four_networks(tmp_path)
    table = report.exercise2_table(report.read_runs(tmp_path)[0]).splitlines()
    assert len([line for line in table if line.startswith("| depth")]) == 4
    assert ("| depth 3, plain | 318 | 3 | 2 | float32 | 1.500 (1.500 to 1.500) | 61.0% (60.0% to 62.0%) | 10 s |"
            in table)
    assert ("| depth 3, residual (step 1, identity shortcuts) | 318 | 3 | 2 | float32 | 1.410 (1.400 to 1.420) | "
            "62.0% (62.0% to 62.0%) | 10 s |" in table)
    assert ("| depth 5, residual (step 1, identity shortcuts) | 622 | 3 | 2 | float32 | 1.300 (1.300 to 1.300) | "
            "64.0% (59.0% to 65.0%) | 10 s |" in table)
    assert "12 runs (seeds 0, 1, 2)" in table[-1]


def test_exercise2_checks_are_judged_on_every_seed(tmp_path):
    three_seeds_of_four_networks(tmp_path)
    checks = report.exercise2_checks(report.read_runs(tmp_path)[0]).splitlines()
    assert ("- holds: plain depth 5 has a higher training loss than plain depth 3 at every epoch: for 3 of 3 seeds"
            in checks)
    assert ("- holds: plain depth 5 tests worse than plain depth 3 (median test acc 50.0% vs 61.0%): for 3 of 3 "
            "seeds" in checks)
    assert ("- **does not hold**: residual depth 5 tests at least as well as residual depth 3 (median test acc 64.0% "
            "vs 62.0%): for 2 of 3 seeds" in checks)  # the median holds; one seed does not
    assert ("- holds: residual depth 5 ends with a training loss at most that of residual depth 3: for 3 of 3 seeds"
            in checks)
    assert not any("at depth 3 the residual" in line for line in checks)  # shortcuts are not judged at the smallest
    checks = report.exercise2_checks(report.read_runs(tmp_path)[0], shortcuts_at_shallowest=True).splitlines()
    assert ("- **does not hold**: at depth 3 the residual network's training loss is below the plain one's at every "
            "epoch and it tests better (median test acc 62.0% vs 61.0%): for 2 of 3 seeds") in checks  # seed 2 ties


def test_exercise2_checks_count_only_seeds_both_networks_have(tmp_path):
    write_run(tmp_path, cnn(1, 0, 0), [2.0, 1.5], [0.5, 0.6], 0.60)
    write_run(tmp_path, cnn(3, 0, 0), [2.1, 1.6], [0.4, 0.5], 0.50)
    write_run(tmp_path, cnn(3, 0, 1), [2.1, 1.6], [0.4, 0.5], 0.50)  # no plain depth 3 with seed 1 to compare with
    checks = report.exercise2_checks(report.read_runs(tmp_path)[0]).splitlines()
    assert checks[0] == ("- holds: plain depth 5 has a higher training loss than plain depth 3 at every epoch: "
                         "for 1 of 1 seeds")
    assert not any("residual" in line for line in checks)


def test_best_checkpoint_is_the_residual_run_with_the_best_final_validation_accuracy_over_all_seeds(tmp_path):
    write_run(tmp_path, cnn(1, 0), [1.0], [0.99], 0.99)  # plain: never the CAM model
    write_run(tmp_path, cnn(1, 1), [1.0], [0.70], 0.95)  # best test accuracy, but chosen on validation
    write_run(tmp_path, cnn(3, 1, seed=0), [1.0, 1.0], [0.92, 0.80], 0.80)  # its checkpoint holds the last epoch
    write_run(tmp_path, cnn(3, 1, seed=1), [1.0, 1.0], [0.80, 0.85], 0.80)
    write_run(tmp_path, cnn(3, 1, seed=2), [1.0, 1.0], [0.80, 0.75], 0.80)
    best = RunFiles(tmp_path / cnn(3, 1, seed=1).run_name).checkpoint
    with pytest.raises(utils.UsageError, match=f"{cnn(3, 1, seed=1).run_name} .*has no checkpoint.pt"):
        report.best_checkpoint(report.read_runs(tmp_path)[0], tmp_path)  # as in results/: no checkpoints kept
    best.write_bytes(b"weights")
    with pytest.raises(utils.UsageError, match=f"{cnn(3, 1, seed=1).run_name}: --checkpoint .* not a loadable"):
        report.best_checkpoint(report.read_runs(tmp_path)[0], tmp_path)  # cam.py would refuse it
    save_checkpoint(best, {"model": {}, "config": {}})
    assert report.best_checkpoint(report.read_runs(tmp_path)[0], tmp_path) == best


@pytest.mark.parametrize("linked", [False, True])
def test_readme_blocks_are_rewritten_and_nothing_else(tmp_path, capsys, linked):
    """A README that is a symbolic link (to a docs checkout, say) stays one: the file it points to is rewritten."""
    write_run(tmp_path / "ex1", mlp(4, 0, 0), [2.3], [0.11], 0.11)
    readme = tmp_path / "README.md"
    target = tmp_path / "docs" / "real.md" if linked else readme
    target.parent.mkdir(exist_ok=True)
    target.write_text("intro\n<!-- report:ex1 -->\nold table\n<!-- /report:ex1 -->\n"
                      "<!-- report:ex1-init -->\nold check\n<!-- /report:ex1-init -->\nend\n")
    if linked:
        readme.symlink_to(target)
    args = report.get_args_parser().parse_args(["--ex1", str(tmp_path / "ex1"), "--readme", str(readme)])
    blocks = report.main(args)
    assert readme.is_symlink() == linked
    text = target.read_text()
    assert text.startswith("intro\n<!-- report:ex1 -->\n| hidden layers |")
    assert text.endswith("<!-- /report:ex1-init -->\nend\n")
    assert "old table" not in text and "old check" not in text and blocks["ex1"] in text
    assert blocks["ex1-init"] == "No plain runs of 14 to 34 hidden layers with their gradient norms logged at step 0."


def test_readme_blocks_are_written_into_whichever_file_holds_them(tmp_path, capsys):
    """--readme README.md docs/analysis.md, as make readme runs it: each table goes where its block is, a block in
    neither file is one line naming both, and then neither file is touched."""
    write_run(tmp_path / "ex1", mlp(4, 0, 0), [2.3], [0.11], 0.11)
    readme, analysis = tmp_path / "README.md", tmp_path / "analysis.md"
    readme.write_text("intro\n<!-- report:ex1 -->\nold table\n<!-- /report:ex1 -->\n")
    analysis.write_text("<!-- report:ex1-init -->\nold check\n<!-- /report:ex1-init -->\nend\n")
    blocks = report.main(report.get_args_parser().parse_args(["--ex1", str(tmp_path / "ex1"), "--readme",
                                                              str(readme), str(analysis)]))
    assert readme.read_text() == f"intro\n<!-- report:ex1 -->\n{blocks['ex1']}\n<!-- /report:ex1 -->\n"
    assert analysis.read_text() == f"<!-- report:ex1-init -->\n{blocks['ex1-init']}\n<!-- /report:ex1-init -->\nend\n"
    before = readme.read_text()
    analysis.write_text("no blocks here\n")
    assert report_cli("--ex1", str(tmp_path / "ex1"), "--readme", str(readme), str(analysis)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no <!-- report:ex1-init --> ... <!-- /report:ex1-init --> block in {readme} or " \
                             f"{analysis}" in err[0]
    assert readme.read_text() == before and analysis.read_text() == "no blocks here\n"


README_BLOCKS = "".join(f"<!-- report:{name} -->\nold\n<!-- /report:{name} -->\n" for name in ("ex1", "ex1-init"))


def report_cli(*flags: str) -> int:
    """report.py run as its command line runs it; its exit status."""
    try:
        utils.run_cli(report.main, report.get_args_parser().parse_args(list(flags)))
    except SystemExit as e:
        return e.code
    return 0


def one_sweep_with_a_run_of_each_kind_left_out(out_dir) -> None:
    """Plain and residual 4-hidden-layer MLPs, seeds 0 and 1: two finished, one unfinished, one with a damaged
    config, one never started (plain seed 1); and a plots/ folder, which is not a run."""
    write_run(out_dir, mlp(4, 0, 0), [2.3], [0.11], 0.11)
    write_run(out_dir, mlp(4, 2, 0), [0.3], [0.9], 0.9)
    write_run(out_dir, mlp(4, 2, 1), [], [], 0.9, finished=False)
    (out_dir / "broken").mkdir()
    (out_dir / "broken" / "config.json").write_text("{not json")
    (out_dir / "plots").mkdir()
    (out_dir / "plots" / "mlp_Val_acc.png").write_bytes(b"png")


def test_every_run_folder_not_used_and_every_missing_run_is_listed_with_why(tmp_path, capsys):
    one_sweep_with_a_run_of_each_kind_left_out(tmp_path)
    assert report_cli("--ex1", str(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"{tmp_path}: not used: broken: no readable config.json{report.RESTORE}",
        f"{tmp_path}: not used: {mlp(4, 2, 1).run_name}: unfinished: 0 of 1 epochs, no test result",
        f"{tmp_path}: missing: {mlp(4, 0, 1).run_name} (no run folder; the other networks have this seed)"]
    assert "| 4 | 0/1 | 11.0% | 1/1 | 90.0% |" in out
    assert "Not in this table (3 runs of the sweep, unfinished, unreadable or not trained yet): broken, " in out


def test_a_copied_or_renamed_run_folder_is_not_counted_as_its_run(tmp_path, capsys):
    """A backup copy beside its run counted it twice; a renamed folder was read as the run of its old name, and
    --best_checkpoint then pointed to a folder that does not exist."""
    write_run(tmp_path, mlp(4, 0, 0), [2.3], [0.11], 0.11)
    write_run(tmp_path, mlp(4, 2, 0), [0.3], [0.9], 0.9)
    shutil.copytree(tmp_path / mlp(4, 2, 0).run_name, tmp_path / "backup")
    assert report_cli("--ex1", str(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert "| 4 | 0/1 | 11.0% | 1/1 | 90.0% |" in out
    assert err.splitlines() == [f"{tmp_path}: not used: backup: its config.json is run {mlp(4, 2, 0).run_name}'s: "
                                "a copy or a renamed folder, which pipeline.py would not resume either (rename it "
                                "back or move it away)"]
    shutil.rmtree(tmp_path / mlp(4, 2, 0).run_name)
    with pytest.raises(report.UsageError, match="holds no finished residual run"):
        report.best_checkpoint(report.read_runs(tmp_path)[0], tmp_path)


def test_a_test_result_before_the_last_epoch_is_not_a_finished_run(tmp_path, capsys):
    """A history with a test result after 1 of its config's 3 epochs (a run being trained for more epochs when it
    was cut) was counted as a finished 3-epoch run."""
    write_run(tmp_path, mlp(4, 0, 0), [2.3, 2.2, 2.1], [0.1, 0.1, 0.11], 0.11)
    write_run(tmp_path, mlp(4, 2, 0), [0.3, 0.2, 0.1], [0.8, 0.85, 0.9], 0.9)
    files = RunFiles(tmp_path / mlp(4, 2, 0).run_name)
    history = json.loads(files.history.read_text())
    files.history.write_text(json.dumps(dict(history, epochs=history["epochs"][:1])))
    assert report_cli("--ex1", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"not used: {mlp(4, 2, 0).run_name}: unfinished: 1 of 3 epochs, a test result all the same" in err


def test_readme_is_not_rewritten_with_runs_left_out_unless_allowed(tmp_path, capsys):
    one_sweep_with_a_run_of_each_kind_left_out(tmp_path / "ex1")
    readme = tmp_path / "README.md"
    readme.write_text(README_BLOCKS)
    assert report_cli("--ex1", str(tmp_path / "ex1"), "--readme", str(readme)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and f"error: not rewriting {readme}: 3 runs of the sweep" in err[-1]
    assert readme.read_text() == README_BLOCKS
    assert report_cli("--ex1", str(tmp_path / "ex1"), "--readme", str(readme), "--allow_missing") == 0
    assert "| 4 | 0/1 |" in readme.read_text()


@pytest.mark.parametrize("damage", [('"acc"', '"accuracy"'), ('"seconds": 10.0', '"seconds": "10"'),
                                    ('"steps": 10', '"steps": 10.5'),
                                    # impossible values printed as 100000000000.0%, -1.7 min, epoch 2 of 1
                                    ('"acc": 0.11', '"acc": 1000000000.0'), ('"seconds": 10.0', '"seconds": -10.0'),
                                    ('"epoch": 1', '"epoch": 2')])
def test_a_damaged_history_is_listed_with_how_to_restore_it_and_the_readme_kept(tmp_path, capsys, damage):
    """A history.json that parses but lacks a number the tables read (a test accuracy, an epoch's seconds) is not
    used, and says how the checkpoint restores it; --readme then writes nothing."""
    write_run(tmp_path / "runs", mlp(4, 0, 0), [2.3], [0.11], 0.11)
    write_run(tmp_path / "runs", mlp(4, 2, 0), [0.3], [0.9], 0.9)
    history = RunFiles(tmp_path / "runs" / mlp(4, 0, 0).run_name).history
    history.write_text(history.read_text().replace(*damage))
    readme = tmp_path / "README.md"
    readme.write_text(README_BLOCKS)
    assert report_cli("--ex1", str(tmp_path / "runs"), "--readme", str(readme)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"{tmp_path / 'runs'}: not used: {mlp(4, 0, 0).run_name}: no readable history.json (none yet, "
                      f"or damaged){report.RESTORE}") and "error: not rewriting" in err[-1], err
    assert readme.read_text() == README_BLOCKS


@pytest.mark.parametrize("case", ["no runs", "no block", "no folder", "readme missing", "readme is a folder",
                                  "CNN runs to --ex1", "MLP runs to --ex2", "MLP runs to --best_checkpoint"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    out_dir = tmp_path / "runs"
    if case != "no folder":
        out_dir.mkdir()
    if case not in ("no runs", "no folder"):
        write_run(out_dir, cnn(1, 1) if case == "CNN runs to --ex1" else mlp(4, 0, 0), [2.3], [0.11], 0.11)
    readme = tmp_path / "README.md"
    if case == "readme is a folder":
        readme.mkdir()
    elif case != "readme missing":
        readme.write_text("no markers\n" if case == "no block" else README_BLOCKS)
    flag = {"MLP runs to --ex2": "--ex2", "MLP runs to --best_checkpoint": "--best_checkpoint"}.get(case, "--ex1")
    readme_flags = [] if flag == "--best_checkpoint" else ["--readme", str(readme)]
    assert report_cli(flag, str(out_dir), *readme_flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0], err
    if readme.is_file():
        assert readme.read_text() in ("no markers\n", README_BLOCKS)


@pytest.mark.parametrize("flags,message", [
    (["--best_checkpoint", "{runs}", "--ex1", "{runs}", "--keep", "{kept}"], "give --ex1, --keep in another command"),
    (["--ex1", "{runs}", "--allow_missing"], "give --readme too"),
    (["--faithfulness", "{runs}/f.json", "--keep", "{kept}"],
     "--keep copies the runs of --ex1, --ex2, --fast and --ablation"),
])
def test_flags_that_would_do_nothing_are_refused(tmp_path, capsys, flags, message):
    """Each was accepted and did nothing: the README not rewritten, nothing kept, and nothing said."""
    write_run(tmp_path / "runs", mlp(4, 2, 0), [2.3], [0.9], 0.9)
    given = [f.format(runs=tmp_path / "runs", kept=tmp_path / "kept") for f in flags]
    assert report_cli(*given) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "kept").exists()


@pytest.mark.parametrize("flag,other", [("--width", "8"), ("--lr", "0.01"), ("--num_epochs", "2")])
def test_runs_of_several_sweeps_in_one_folder_are_refused_not_mixed_into_a_row(tmp_path, flag, other):
    """A width (or rate, or length) of its own once entered a row's median and range as if it were another seed."""
    for seed in (0, 1):
        write_run(tmp_path, mlp(4, 0, seed), [2.3], [0.9], 0.9)
    epochs = int(other) if flag == "--num_epochs" else 1
    write_run(tmp_path, run_config("--num_hidden_layers", "4", "--seed", "2", "--run_name", "other", flag, other),
              [2.3] * epochs, [0.1] * epochs, 0.1)
    with pytest.raises(utils.UsageError, match=f"mixes runs of several sweeps: other was trained with {flag} {other}"):
        report.main(report.get_args_parser().parse_args(["--ex1", str(tmp_path)]))


# report.py in a process that kills itself with SIGKILL at a moment of replacing a kept folder: at its first or
# second Path.rename, or once it has removed a file of the old folder set aside
KILLED_AT = """
import os, pathlib, shutil, signal, sys
sys.path.insert(0, {root!r})
import report, utils
moment, renames = {moment!r}, []
rename, rmtree = pathlib.Path.rename, shutil.rmtree

def killed_at_rename(self, target):
    renames.append(self)
    if moment == len(renames):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)

def killed_while_removing(path, *args, **kwargs):
    if moment == "removing" and str(path).endswith(".old"):
        next(pathlib.Path(path).rglob("history.json")).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *args, **kwargs)

pathlib.Path.rename, shutil.rmtree = killed_at_rename, killed_while_removing
utils.run_cli(report.main, report.get_args_parser().parse_args(sys.argv[1:]))
"""


@pytest.mark.parametrize("moment", [1, 2, "removing"], ids=["setting_the_old_aside", "putting_the_new_in_place",
                                                            "removing_the_old"])
def test_keep_killed_at_any_moment_loses_nothing_and_the_next_keep_finishes(tmp_path, capsys, moment):
    """Killed between its two renames, --keep left neither KEEP/ex1 nor the results it kept (make readme keeps the
    committed results/ this way). Now the old folder is set aside and removed last: a kill leaves the old or the new
    results whole, and the next --keep puts back or finishes a half-done replacement."""
    run = mlp(4, 0, 0).run_name
    write_run(tmp_path / "ex1", mlp(4, 0, 0), [2.3], [0.11], 0.11)
    flags = ("--ex1", str(tmp_path / "ex1"), "--keep", str(tmp_path / "kept"))
    assert report_cli(*flags) == 0
    kept, aside = tmp_path / "kept" / "ex1", tmp_path / "kept" / ".ex1.old"
    old = (kept / run / "history.json").read_bytes()
    history = json.loads(old)
    history["epochs"][0]["seconds"] = 99.0
    utils.write_json(tmp_path / "ex1" / run / "history.json", history)
    new = (tmp_path / "ex1" / run / "history.json").read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILLED_AT.format(root=str(ROOT), moment=moment), *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    whole = kept if kept.is_dir() and moment != 2 else aside  # between the renames the old one waits aside
    assert (whole / run / "history.json").read_bytes() == (new if moment == "removing" else old)
    report.finish_swap(kept)  # what the next --keep does first
    assert (kept / run / "history.json").read_bytes() == (new if moment == "removing" else old)
    assert not aside.exists()
    assert report_cli(*flags) == 0 and (kept / run / "history.json").read_bytes() == new
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["ex1"]


@pytest.mark.parametrize("name", ["config.json", "history.json"])
@pytest.mark.parametrize("content", [bytes(range(128, 256)), b"[" * 100_000], ids=["binary", "nested_too_deep"])
def test_a_run_file_that_is_binary_or_nested_too_deep_leaves_its_run_out_in_one_line(tmp_path, capsys, name,
                                                                                     content):
    """A history.json nested deeper than the JSON parser goes was a RecursionError traceback."""
    write_run(tmp_path, mlp(4, 0, 0), [2.3], [0.11], 0.11)
    write_run(tmp_path, mlp(4, 2, 0), [0.3], [0.9], 0.9)
    (tmp_path / mlp(4, 2, 0).run_name / name).write_bytes(content)
    assert report_cli("--ex1", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"not used: {mlp(4, 2, 0).run_name}: no readable {name}" in err and "Traceback" not in err


def test_machines_are_named_once_each_with_their_thread_counts_and_one_thread_is_singular():
    cpu, gpu = "Intel(R) Xeon(R) Processor @ 2.80GHz", "NVIDIA H100 80GB HBM3"
    runs = [(None, {"machines": [f"{cpu}, 1 threads", f"{cpu}, 2 threads"]}), (None, {"machines": [f"{cpu}, 1 thread"]}),
            (None, {})]
    assert report.machines(runs) == f"{cpu}, 1 and 2 threads"
    assert report.machines(runs[1:]) == f"{cpu}, 1 thread"
    assert report.machines([*runs, (None, {"machines": [gpu, "AMD EPYC 9B14, 16 threads"]})]) == (
        f"AMD EPYC 9B14, 16 threads; {cpu}, 1 and 2 threads; {gpu}")
    assert report.machines([(None, {})]) == "machines the runs did not record"


def test_a_runs_threads_are_read_from_the_machines_its_history_names():
    cpu = "Intel(R) Xeon(R) Processor @ 2.80GHz"
    assert report.threads({"machines": [f"{cpu}, 2 threads", f"{cpu}, 1 threads"]}) == "1 and 2"
    assert report.threads({"machines": [f"{cpu}, 1 thread"]}) == "1"
    assert report.threads({"machines": ["NVIDIA H100 80GB HBM3"]}) == report.threads({}) == "-"
