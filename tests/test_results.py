"""results/: the small files of the reproduce runs that the repository keeps, and the README tables made from them
(and from Exercise 3's faithfulness.json in img_show/cam)."""
import re
import shutil
from dataclasses import replace

import pytest

import report
from conftest import ROOT, run_config
from runs import RunFiles
from test_report import cnn, three_seeds_of_four_networks, write_run
from test_resume import fill_but, in_small_tmpfs


def report_blocks(*flags: str) -> dict[str, str]:
    return report.main(report.get_args_parser().parse_args(list(flags)))


def test_readme_tables_are_what_report_makes_from_results():
    """Every table of README.md, docs/analysis.md and docs/performance.md (where make readme writes them), each in
    one of them."""
    blocks = report_blocks("--ex1", str(ROOT / "results/ex1"), "--ex2", str(ROOT / "results/ex2"),
                           "--fast", str(ROOT / "results/fast"),
                           *(["--ablation", str(ROOT / "results/fast-ablation")]
                             if (ROOT / "results/fast-ablation").is_dir() else []),
                           "--faithfulness", str(ROOT / "img_show/cam/faithfulness.json"))
    pages = {name: (ROOT / name).read_text() for name in ("README.md", "docs/analysis.md", "docs/performance.md")}
    for name, content in blocks.items():
        found = {page: block.group(1) for page, text in pages.items()
                 if (block := re.search(rf"<!-- report:{name} -->\n(.*?)\n<!-- /report:{name} -->", text, re.S))}
        assert len(found) == 1, f"the {name} block is in {sorted(found) or 'neither page'}"
        assert list(found.values()) == [content], f"{name} in {list(found)} is not report.py's output from results/"


def test_kept_results_remake_the_same_tables_without_checkpoints(tmp_path, capsys):
    sweep = tmp_path / "ex2"
    three_seeds_of_four_networks(sweep)
    mlps = tmp_path / "ex1"
    for seed, norm in enumerate([1e-6, 1e-12]):
        write_run(mlps, run_config("--num_hidden_layers", "14", "--seed", str(seed)), [1.0], [0.8 - seed / 2],
                  0.8, first_grad_norm=norm)
    for run_dir in sweep.iterdir():
        RunFiles(run_dir).checkpoint.write_bytes(b"weights")
    write_run(sweep, run_config("--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "4",
                                "--num_levels", "1", "--num_conv_per_level", "1", "--residual_step", "0", "--seed",
                                "3", "--num_epochs", "2"), [2.0], [0.5], 0.5, finished=False)
    original = report_blocks("--ex1", str(mlps), "--ex2", str(sweep), "--keep", str(tmp_path / "results"))
    kept = tmp_path / "results"
    assert sorted(p.name for p in (kept / "ex2").iterdir()) == sorted(p.name for p in sweep.iterdir())
    assert not list(kept.glob("*/*/checkpoint.pt"))
    assert len((kept / "ex1" / "mlp_mnist_h14_w16_plain_s0" / "grad_norms.csv").read_text().splitlines()) == 2
    assert report_blocks("--ex1", str(kept / "ex1"), "--ex2", str(kept / "ex2")) == original
    assert "Not in this table (4 runs of the sweep" in original["ex2"]


def test_keeping_again_replaces_what_was_kept_only_by_the_same_sweep_or_a_larger_one(tmp_path, capsys):
    """A toy make reproduce (the same runs, trained otherwise) or a sweep with runs missing once replaced the
    results that the README's tables are made from; now removing them first says so."""
    sweep, kept = tmp_path / "ex2", tmp_path / "results" / "ex2"
    three_seeds_of_four_networks(sweep)
    report_blocks("--ex2", str(sweep), "--keep", str(tmp_path / "results"))
    write_run(sweep, cnn(1, 0, seed=3), [2.0, 1.5], [0.5, 0.6], 0.6)  # the sweep grew: kept again, all of it
    report_blocks("--ex2", str(sweep), "--keep", str(tmp_path / "results"))
    assert len(list(kept.iterdir())) == len(list(sweep.iterdir())) == 13
    before = {p: p.read_bytes() for p in kept.rglob("*.json")}
    toy = replace(cnn(1, 0, seed=3), num_epochs=3)
    write_run(sweep, toy, [2.0, 1.9, 1.8], [0.5, 0.5, 0.5], 0.5)
    with pytest.raises(report.UsageError, match=f"{toy.run_name} was trained with --num_epochs 3, not 2.*remove"):
        report_blocks("--ex2", str(sweep), "--keep", str(tmp_path / "results"))
    write_run(sweep, replace(cnn(1, 0, seed=3), num_epochs=2), [2.0], [0.5], 0.5, finished=False)  # interrupted
    with pytest.raises(report.UsageError, match=f"{toy.run_name} has not finished; .*remove {kept} first"):
        report_blocks("--ex2", str(sweep), "--keep", str(tmp_path / "results"))
    shutil.rmtree(sweep / toy.run_name)
    with pytest.raises(report.UsageError, match=f"{toy.run_name} is missing; .*remove {kept} first"):
        report_blocks("--ex2", str(sweep), "--keep", str(tmp_path / "results"))
    assert {p: p.read_bytes() for p in kept.rglob("*.json")} == before


def test_keep_refuses_a_sweeps_own_run_folders(tmp_path, capsys):
    three_seeds_of_four_networks(tmp_path / "ex2")
    for run_dir in (tmp_path / "ex2").iterdir():
        RunFiles(run_dir).checkpoint.write_bytes(b"weights")
    with pytest.raises(report.UsageError, match="holds more than kept results"):
        report_blocks("--ex2", str(tmp_path / "ex2"), "--keep", str(tmp_path))
    assert len(list(tmp_path.glob("ex2/*/checkpoint.pt"))) == 12


def test_keep_refuses_a_folder_holding_files_of_the_users_beside_kept_results(tmp_path, capsys):
    three_seeds_of_four_networks(tmp_path / "ex2")
    report_blocks("--ex2", str(tmp_path / "ex2"), "--keep", str(tmp_path / "kept"))
    (tmp_path / "kept" / "ex2" / "notes.txt").write_text("mine")
    with pytest.raises(report.UsageError, match="holds more than kept results"):
        report_blocks("--ex2", str(tmp_path / "ex2"), "--keep", str(tmp_path / "kept"))
    assert (tmp_path / "kept" / "ex2" / "notes.txt").read_text() == "mine"


def test_keep_where_a_file_is_is_one_line_and_keeps_the_file(tmp_path):
    three_seeds_of_four_networks(tmp_path / "ex2")
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(report.UsageError, match="is not a folder"):
        report_blocks("--ex2", str(tmp_path / "ex2"), "--keep", str(tmp_path / "notes"))
    assert (tmp_path / "notes").read_text() == "mine"


def test_keep_on_a_full_disk_is_one_line_and_keeps_what_was_kept(tmp_path):
    """The copy is staged beside the kept results and only then replaces them: a full disk half-way through
    leaves the old copy whole and no staging folder."""
    disk = tmp_path / "disk"
    three_seeds_of_four_networks(tmp_path / "ex2")
    report_blocks("--ex2", str(tmp_path / "ex2"), "--keep", str(tmp_path / "before"))
    result = in_small_tmpfs(disk, f'cp -a "{tmp_path}/before/ex2" "{disk}" && {fill_but(disk, 8)} && '
                                  f'$P report.py --ex2 "{tmp_path}/ex2" --keep "{disk}" > /dev/null; echo "rc=$?"; '
                                  f'ls -A "{disk}"; cp -a "{disk}/ex2" "{tmp_path}/after"')
    assert "rc=2" in result.stdout, result.stderr
    assert result.stderr.strip() == f"report.py: error: no space left on {disk / '.ex2.tmp'}"
    assert result.stdout.split("rc=2")[1].split() == ["ex2", "filler"]  # no .ex2.tmp
    before = {p.relative_to(tmp_path / "before" / "ex2"): p.read_bytes()
              for p in (tmp_path / "before" / "ex2").rglob("*.json")}
    after = {p.relative_to(tmp_path / "after"): p.read_bytes() for p in (tmp_path / "after").rglob("*.json")}
    assert after == before and len(before) == 24
