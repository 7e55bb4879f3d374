"""--amp's precision follows the hardware: the policy, what a run records and prints, float16's GradScaler in the
checkpoint, and configs from before the precision was recorded."""
import json
import shutil

import pytest
import torch

import pipeline
import train
from config import RunConfig
from conftest import RUN, args_for, run_main
from runs import save_checkpoint


@pytest.mark.parametrize("capability,expected", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_cuda_precision_by_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert train.amp_precision(torch.device("cuda")) == expected


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                      (False, False, "float32")])
def test_cpu_precision_by_instruction_set(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert train.amp_precision(torch.device("cpu")) == expected


def test_amp_on_a_cpu_without_bfloat16_warns_once_and_trains_in_float32(mnist_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    run_main(*args_for(mnist_root, tmp_path, "--amp", "--num_hidden_layers", "2", "4"))
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if "warning" in line] == [
        "warning: --amp: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX); training in float32"]
    config = json.loads((tmp_path / RUN / "config.json").read_text())
    assert (config["amp"], config["precision"]) == (True, "float32")
    assert f"{RUN}: starting on cpu in float32" in captured.out.splitlines()


def test_float16_keeps_its_loss_scale_in_the_checkpoint_and_resumes_exactly(mnist_root, tmp_path, monkeypatch):
    """As on a GPU older than compute capability 8.0 (float16 autocast and its GradScaler also run on the CPU)."""
    monkeypatch.setattr(pipeline, "amp_precision", lambda device: "float16")
    run_main(*args_for(mnist_root, tmp_path / "straight", "--amp", "--num_epochs", "2"))
    run_main(*args_for(mnist_root, tmp_path / "cut", "--amp", "--num_epochs", "1"))
    path = tmp_path / "cut" / RUN / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["config"]["precision"] == "float16" and checkpoint["grad_scaler"]["_growth_tracker"] == 10
    run_main(*args_for(mnist_root, tmp_path / "cut", "--amp", "--num_epochs", "2", "--resume"))
    straight, resumed = (torch.load(p / RUN / "checkpoint.pt", weights_only=True) for p in (tmp_path / "straight",
                                                                                            tmp_path / "cut"))
    assert resumed["grad_scaler"] == straight["grad_scaler"] and resumed["grad_scaler"]["_growth_tracker"] == 20
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    # the scale really comes back from the checkpoint: a changed one continues from where it was
    scaler = dict(checkpoint["grad_scaler"], scale=1024.0, _growth_tracker=7)
    save_checkpoint(path, dict(checkpoint, grad_scaler=scaler))
    (tmp_path / "cut" / RUN / "history.json").unlink()
    run_main(*args_for(mnist_root, tmp_path / "cut", "--amp", "--num_epochs", "2", "--resume"))
    scaler = torch.load(path, weights_only=True)["grad_scaler"]
    assert (scaler["scale"], scaler["_growth_tracker"]) == (1024.0, 17)


def test_float32_runs_keep_an_empty_scaler_and_their_numerics(finished_run):
    checkpoint = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["grad_scaler"] == {} and checkpoint["config"]["precision"] == "float32"


def test_a_run_from_before_precision_was_recorded_loads_and_resumes(mnist_root, tmp_path, capsys, finished_run):
    """Before the precision was recorded --amp always meant bfloat16; such a config loads with what it meant, and
    an unfinished run of that version (no precision, no GradScaler state) continues."""
    shutil.copytree(finished_run, tmp_path / RUN)
    values = json.loads((tmp_path / RUN / "config.json").read_text())
    del values["precision"]
    assert RunConfig.from_dict(dict(values, amp=True)).precision == "bfloat16"
    assert RunConfig.from_dict(dict(values, amp=False)).precision == "float32"
    checkpoint = torch.load(tmp_path / RUN / "checkpoint.pt", weights_only=True)
    del checkpoint["config"]["precision"], checkpoint["grad_scaler"], checkpoint["checksum"]  # nor a checksum then
    torch.save(checkpoint, tmp_path / RUN / "checkpoint.pt")
    (tmp_path / RUN / "history.json").unlink()  # unfinished: --resume continues the old checkpoint
    capsys.readouterr()
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "2", "--resume"))
    assert f"{RUN}: resuming after epoch 1 on cpu in float32" in capsys.readouterr().out
