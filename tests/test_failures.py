"""One run of a sweep fails with a NaN loss: the others still finish and are plotted, and the sweep says which
failed (exit status 1)."""
import json

import pytest
import torch

import pipeline
import utils
from conftest import args_for
from runs import save_checkpoint

FAILING, FINISHING = "mlp_mnist_h2_w8_plain_s0", "mlp_mnist_h4_w8_plain_s0"


def test_a_nan_run_fails_and_the_other_finishes_and_is_plotted(mnist_root, tmp_path, capsys):
    sweep = args_for(mnist_root, tmp_path, "--num_hidden_layers", "2", "4", "--num_epochs", "1")
    pipeline.main(pipeline.get_args_parser().parse_args(sweep))
    # one run is unfinished, and its checkpoint holds weights that make every loss NaN
    checkpoint = torch.load(tmp_path / FAILING / "checkpoint.pt", weights_only=True)
    checkpoint["model"] = {k: torch.full_like(v, float("nan")) for k, v in checkpoint["model"].items()}
    save_checkpoint(tmp_path / FAILING / "checkpoint.pt", checkpoint)
    (tmp_path / FAILING / "history.json").unlink()
    for figure in (tmp_path / "plots").iterdir():
        figure.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, pipeline.get_args_parser().parse_args(
            sweep[:-1] + ["2", "--resume"]))  # --num_epochs 2
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    assert f"error: 1 of 2 runs failed ({FAILING}: the training loss at epoch 2 became nan at step" in (
        err.strip().splitlines()[-1])
    history = json.loads((tmp_path / FINISHING / "history.json").read_text())
    assert len(history["epochs"]) == 2 and "test" in history
    assert not (tmp_path / FAILING / "history.json").exists()
    figures = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"mlp_training_loss.png", "mlp_Val_acc.png", "gradients_mlp_d4.png"} <= figures
    assert "gradients_mlp_d2.png" not in figures  # only the finished run is drawn
    assert f"wrote {tmp_path / 'plots' / 'mlp_training_loss.png'}" in out
