"""Experiment tracking: TensorBoard event files read back with TensorBoard's reader, real offline W&B runs read back
from their binary logs, failing trackers, and nothing imported when tracking is off."""
import hashlib
import json
import struct
import subprocess
import sys
import time
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pipeline
import train
import utils
from runs import RunFiles, load_checkpoint
from conftest import ROOT, without_seconds
from tracking import EPOCH_SCALARS, GRAD_NORM, STEP, epoch_scalars

RUN = "mlp_mnist_h2_w8_plain_s0"


def args_for(mnist_root, out_dir, *extra: str) -> list[str]:
    """A tiny MLP: 500 training images in batches of 50, so 10 steps an epoch."""
    return ["--data_root", str(mnist_root), "--no-download", "--val_size", "100", "--batch_size", "50",
            "--width", "8", "--num_hidden_layers", "2", "--device", "cpu", "--out_dir", str(out_dir), *extra]


def run_main(*args: str):
    return pipeline.main(pipeline.get_args_parser().parse_args(list(args)))


def read_run(run_dir) -> tuple[dict, list[int], dict]:
    """A run's history.json, and its logged steps and gradient norms from grad_norms.csv."""
    steps, norms = train.RunFiles(run_dir).read_grad_norms()
    return json.loads((run_dir / "history.json").read_text()), steps, norms


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `folder`, as (step, value) per tag, through TensorBoard's own reader."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_epoch_and_gradient_norm_once_across_an_interruption(mnist_root, tmp_path,
                                                                                     monkeypatch):
    real_save = train.save_checkpoint

    def interrupted_saving_epoch_2(path, checkpoint: dict) -> None:
        if checkpoint["epoch"] == 2:
            raise KeyboardInterrupt  # Ctrl-C while epoch 2's checkpoint is written: the file keeps epoch 1
        real_save(path, checkpoint)
    monkeypatch.setattr(train, "save_checkpoint", interrupted_saving_epoch_2)
    args = args_for(mnist_root, tmp_path, "--num_epochs", "3", "--tensorboard")
    with pytest.raises(KeyboardInterrupt):
        run_main(*args)
    monkeypatch.undo()
    run_main(*args, "--resume")

    history, steps, norms = read_run(tmp_path / RUN)
    scalars = tensorboard_scalars(tmp_path / RUN / "tensorboard")
    for key in epoch_scalars(history["epochs"][0]):  # scored on validation: no test_ scalars per epoch
        assert scalars[key] == [(e["epoch"], pytest.approx(e[key], rel=1e-6)) for e in history["epochs"]], key
    assert steps == list(range(30))
    assert scalars.keys() - set(EPOCH_SCALARS) - {"test_loss", "test_acc"} == {GRAD_NORM + n for n in norms}
    for name, values in norms.items():
        logged = scalars[GRAD_NORM + name]
        assert [s for s, _ in logged] == steps and [v for _, v in logged] == pytest.approx(values, rel=1e-6), name
    assert scalars["test_acc"] == [(3, pytest.approx(history["test"]["acc"]))]


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """Keep W&B's own settings, cache and data out of the user's home; skip where W&B is not installed (a GPU
    machine of make gpu-check)."""
    pytest.importorskip("wandb")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def offline_runs(folder) -> list[str]:
    """The W&B run ids of the offline run directories in `folder`/wandb, one per start."""
    return sorted(p.name.rsplit("-", 1)[1] for p in (folder / "wandb").glob("offline-run-*"))


def test_wandb_offline_writes_one_run_per_training_run_and_a_resumed_run_continues_it(mnist_root, tmp_path,
                                                                                        wandb_home):
    out_dir = tmp_path / "sweep"
    names = [RUN, "mlp_mnist_h2_w8_res2_s0"]
    sweep = args_for(mnist_root, out_dir, "--residual_step", "0", "2", "--wandb", "offline", "--tensorboard")
    run_main(*sweep, "--num_epochs", "1", "--jobs", "2")
    ids = {name: load_checkpoint(RunFiles(out_dir / name).checkpoint)["wandb_run_id"] for name in names}
    assert len(set(ids.values())) == 2
    for name in names:
        assert offline_runs(out_dir / name) == [ids[name]]
        assert list((out_dir / name / "tensorboard").glob("events.out.tfevents.*"))
    assert len(offline_runs(out_dir / "plots")) == 1  # the sweep's figures

    run_main(*sweep, "--num_epochs", "2", "--resume")
    for name in names:
        assert load_checkpoint(RunFiles(out_dir / name).checkpoint)["wandb_run_id"] == ids[name]
        assert offline_runs(out_dir / name) == [ids[name]] * 2  # `wandb sync` uploads both, in order, as one run
    summaries = offline_runs(out_dir / "plots")  # the resumed sweep's figures continue its summary run
    assert len(summaries) == 2 and len(set(summaries)) == 1

    notes = out_dir / RUN / "notes.txt"
    notes.write_text("mine")
    run_main(*sweep, "--num_epochs", "1", "--overwrite")
    new_id = load_checkpoint(RunFiles(out_dir / RUN).checkpoint)["wandb_run_id"]
    assert new_id != ids[RUN] and offline_runs(out_dir / RUN) == [new_id]
    assert len(list((out_dir / RUN / "tensorboard").iterdir())) == 1 and notes.read_text() == "mine"


def wandb_records(run_dir) -> list:
    """The records of the one offline W&B run in `run_dir`/wandb, once its log holds the run's exit record: W&B's
    core process may still be writing it just after run.finish() has returned (seen twice when the whole suite ran
    in two workers; the file was whole a moment later), so it is read again until it is, for up to 30 s."""
    from google.protobuf.message import DecodeError
    deadline = time.monotonic() + 30
    while True:
        try:
            records = read_wandb_log(run_dir)
        except DecodeError:  # a record half written
            records = []
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def read_wandb_log(run_dir) -> list:
    """The records of the one offline W&B run in `run_dir`/wandb, read from its binary log (the run-<id>.wandb file
    that `wandb sync` uploads): LevelDB-log framing (32 KiB blocks of records with a 7-byte header of checksum,
    length and type; types 2 to 4 are the first, middle and last pieces of a record that spans blocks) around
    W&B's protobuf Records. W&B 0.31 has no public reader for it and offline runs write no config.yaml or
    wandb-summary.json."""
    from wandb.proto.wandb_internal_pb2 import Record
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = log.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, position, pieces = [], 7, b""  # after the file header: ":W&B", magic, version
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in the block for a header: padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(Record.FromString(pieces))
            pieces = b""
    return records


def logged(records) -> list[dict]:
    """Every history row (one per log call), by key ("a/b" for a nested key), without W&B's own _step etc."""
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.HasField("history")]
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def test_wandb_offline_run_holds_the_config_every_epoch_every_logged_gradient_norm_the_test_result_and_figures(
        mnist_root, tmp_path, wandb_home):
    run_main(*args_for(mnist_root, tmp_path, "--num_epochs", "2", "--grad_log_every", "3", "--wandb", "offline",
                       "--wandb-proj-name", "lab"))
    records = wandb_records(tmp_path / RUN)
    history, steps, norms = read_run(tmp_path / RUN)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.run_group, run.job_type, run.display_name) == ("lab", tmp_path.name, "train", RUN)
    assert run.run_id == load_checkpoint(RunFiles(tmp_path / RUN).checkpoint)["wandb_run_id"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert config == json.loads((tmp_path / RUN / "config.json").read_text())
    metrics = {r.metric.name or r.metric.glob_name: r.metric.step_metric for r in records if r.HasField("metric")}
    assert metrics["train_loss"] == "epoch" and metrics[GRAD_NORM + "*"] == STEP

    rows = logged(records)
    epochs = [row for row in rows if "epoch" in row]
    assert epochs == [{"epoch": e["epoch"], **epoch_scalars(e)} for e in history["epochs"]]
    grads = [row for row in rows if STEP in row]
    assert len(rows) == len(epochs) + len(grads)  # one call per logged step, never one per weight
    assert steps == [0, 3, 6, 9, 12, 15, 18] and [row[STEP] for row in grads] == steps
    for name, values in norms.items():
        assert [row[GRAD_NORM + name] for row in grads] == pytest.approx(values.tolist(), rel=1e-6)
    assert all(len(row) == len(norms) + 1 for row in grads)
    summary = {item.key: json.loads(item.value_json) for r in records if r.HasField("summary")
               for item in r.summary.update if item.key.startswith("test_")}
    assert summary == {"test_loss": history["test"]["loss"], "test_acc": history["test"]["acc"]}
    (exit_record,) = [r.exit for r in records if r.HasField("exit")]
    assert exit_record.exit_code == 0

    plots = wandb_records(tmp_path / "plots")
    (summary_run,) = [r.run for r in plots if r.HasField("run")]
    assert (summary_run.job_type, summary_run.run_group) == ("summary", tmp_path.name)
    (figures,) = logged(plots)
    written = sorted((tmp_path / "plots").glob("*.png"))
    assert len(written) >= 3 and {key: value for key, value in figures.items() if key.endswith("/sha256")} == {
        f"figures/{p.stem}/sha256": hashlib.sha256(p.read_bytes()).hexdigest() for p in written}


class FailingToLogWandb(types.ModuleType):
    """Stands in for the wandb package at its API: its runs start, and fail to log (a log that fails mid-run cannot
    be provoked in the real W&B offline, where nothing goes away)."""

    class Run:
        def __init__(self, run_id: str):
            self.id, self.url, self.exit_code = run_id, None, None

        def define_metric(self, name: str, step_metric: str | None = None) -> None:
            pass

        def log(self, data: dict) -> None:
            raise ConnectionError("W&B went away")

        def finish(self, exit_code: int | None = None) -> None:
            self.exit_code = exit_code

    def __init__(self):
        super().__init__("wandb")
        self.runs: list[FailingToLogWandb.Run] = []
        self.Settings = dict

    def init(self, **kwargs) -> Run:
        self.runs.append(self.Run(kwargs["id"] or f"run{len(self.runs)}"))
        return self.runs[-1]


@pytest.fixture(scope="module")
def untracked_run(mnist_root, tmp_path_factory):
    """The folder of a 2-epoch run without tracking."""
    out_dir = tmp_path_factory.mktemp("untracked")
    run_main(*args_for(mnist_root, out_dir, "--num_epochs", "2"))
    return out_dir / RUN


@pytest.mark.parametrize("fail", ["start", "log"])
def test_a_failing_tracker_is_one_warning_and_training_goes_on(mnist_root, tmp_path, monkeypatch, capsys, wandb_home,
                                                               untracked_run, fail):
    if fail == "start":  # the real W&B offline, whose folder in the run's folder is a file: it cannot start there
        (tmp_path / "tracked" / RUN).mkdir(parents=True)
        (tmp_path / "tracked" / RUN / "wandb").write_text("in the way")
        reason = "start: [Errno 20] Not a directory"
    else:
        wandb = FailingToLogWandb()
        monkeypatch.setitem(sys.modules, "wandb", wandb)
        reason = "log_epoch: W&B went away"
    capsys.readouterr()
    run_main(*args_for(mnist_root, tmp_path / "tracked", "--num_epochs", "2", "--wandb", "offline", "--tensorboard"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "W&B" in line]
    assert warnings[0].startswith(f"warning: {RUN}: W&B tracking stopped, the run goes on without it ({reason}")
    assert len(warnings) == (1 if fail == "start" else 2)  # the run's, and the sweep summary's where it fails too
    untracked, _, _ = read_run(untracked_run)
    tracked, _, _ = read_run(tmp_path / "tracked" / RUN)
    assert without_seconds(tracked) == without_seconds(untracked)
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tracked" / RUN / "tensorboard")["val_acc"]] == [1, 2]
    checkpoint = load_checkpoint(RunFiles(tmp_path / "tracked" / RUN).checkpoint)
    if fail == "start":
        assert checkpoint["wandb_run_id"] is None
    else:  # the failed run was closed, marked failed; its id still resumes it
        assert wandb.runs[0].exit_code == 1 and checkpoint["wandb_run_id"] == wandb.runs[0].id


@pytest.mark.parametrize("server", ["no key", "unreachable"])
def test_wandb_online_without_a_server_that_answers_is_one_warning_and_tracks_offline(mnist_root, tmp_path, capsys,
                                                                                      monkeypatch, wandb_home, server):
    """The real W&B, asked once per command: with no API key anywhere, or a key and no server that answers (here a
    closed local port, within a 2 s timeout), one line says so and every run, and the summary, is kept offline."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if server == "unreachable":
        monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
        monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "2")
    capsys.readouterr()
    run_main(*args_for(mnist_root, tmp_path / "tracked", "--num_hidden_layers", "2", "4", "--num_epochs", "1",
                       "--wandb", "online"))
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "W&B" in line or "wandb" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --wandb online: "), warnings
    assert ("no W&B API key" in warnings[0]) == (server == "no key")
    for folder in ("mlp_mnist_h2_w8_plain_s0", "mlp_mnist_h4_w8_plain_s0", "plots"):
        assert len(list((tmp_path / "tracked" / folder / "wandb").glob("offline-run-*"))) == 1, folder
    assert "upload them with: wandb sync" in out


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_tracking_neither_package_is_imported(mnist_root, tmp_path):
    code = ("import sys, pipeline\n"
            f"pipeline.main(pipeline.get_args_parser().parse_args({args_for(mnist_root, tmp_path)!r}))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard') "
            "or m.startswith('torch.utils.tensorboard')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert not (tmp_path / RUN / "wandb").exists() and not (tmp_path / RUN / "tensorboard").exists()


def test_tracking_flags(tmp_path, capsys):
    parse = pipeline.get_args_parser().parse_args
    assert parse(["--wandb"]).wandb == "online"  # the original lab's bare flag
    assert parse(["--wandb", "offline", "--wandb-proj-name", "lab"]).wandb_proj_name == "lab"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(pipeline.main, parse(["--wandb", "offline", "--wandb_proj_name", "a/b", "--out_dir",
                                            str(tmp_path / "runs")]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "runs").exists()
