"""The run folder and its checkpoint: every file a run writes and its name, the lock that gives each run folder one
writer, the checkpoint's format (built, saved, loaded and restored only here), and the one rule that says whether a
saved run may continue as a command asks."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import math
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from config import RunConfig
from models import build_model
from utils import (atomic_write, first_line, read_json, reporting_full_disk, rng_state, set_rng_state,
                   write_json)

if TYPE_CHECKING:
    from train import RunSetup

# what train.train_epoch records of every epoch in history.json
CHECKPOINT = "checkpoint.pt"  # a run's checkpoint, in its folder unless --checkpoint puts it elsewhere
LOCK = ".lock"  # in every folder a run writes into, locked by the process that trains it
EPOCH_RECORD = ("epoch", "train_loss", "lr", "seconds", "steps")  # and a held-out score: val_ or test_ loss and acc
# 1: the checkpoints of before this version stamp (no "format" key); 2: stamped, otherwise the same keys
CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    """A file that is not a checkpoint this suite wrote, or one it cannot use."""


class ResumeError(ValueError):
    """A saved run cannot continue as the command asks."""


class RunLocked(ValueError):
    """Another process is training this run."""


class RunConflict(ValueError):
    """A run folder holds something the command would silently replace or misreport."""


class RunLock:
    """Exclusive advisory locks (flock) on the lock files of the folders a run writes into, held until `release` or
    the holder's death: the kernel drops them with the process, so a kill -9 never leaves a stale lock. Each lock
    file names its holder's process and host."""

    def __init__(self, folders: list[Path]):
        self.fds: list[int] = []
        try:
            for folder in folders:
                self.fds.append(lock_folder(folder))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Drop the locks (the lock files stay: deleting one would let two processes lock two different files)."""
        while self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: Path) -> int:
    """Lock `folder`'s lock file for this process, creating both, and write this process's id and host there; return
    its descriptor. RunLocked names the process that holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"{folder} is being trained by process {holder}; wait for it to finish or stop it (it keeps "
                        "its last finished epoch)") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)  # a cluster's jobs share it
    except OSError:  # a full disk: the lock holds all the same; a refused process names no pid
        pass
    return fd


class RunFiles:
    """A run folder's files: config.json, history.json (one entry per epoch and the test result), grad_norms.csv
    (one row per logged step, appended every epoch), the checkpoint, which may live elsewhere, and .lock, which
    the process that trains the run holds (and names)."""

    def __init__(self, run_dir: Path, checkpoint: Path | None = None):
        self.run_dir = run_dir
        self.config = run_dir / "config.json"
        self.history = run_dir / "history.json"
        self.grad_norms = run_dir / "grad_norms.csv"
        self.checkpoint = checkpoint or run_dir / CHECKPOINT
        self.lock_file = run_dir / LOCK
        self.tracking = [run_dir / "tensorboard", run_dir / "wandb"]  # what --tensorboard and --wandb write

    def checkpoint_clash(self) -> str | None:
        """Why a --checkpoint path may not hold this run's checkpoint: it is where the run keeps another of its files
        (which would then overwrite each other); None for the default path or any other."""
        own = [self.config, self.history, self.grad_norms, self.lock_file]
        return (f"--checkpoint {self.checkpoint} is where the run keeps its {self.checkpoint.name}; choose another "
                "path") if self.checkpoint.resolve() in {p.resolve() for p in own} else None

    def checkpoint_elsewhere(self) -> bool:
        """Whether --checkpoint put the checkpoint somewhere other than the run folder's checkpoint.pt."""
        return self.checkpoint.resolve() != (self.run_dir / CHECKPOINT).resolve()

    def ours(self) -> list[Path]:
        """The files a run writes, the one that marks it finished first."""
        return [self.history, self.checkpoint, self.grad_norms, self.config]

    def exist(self) -> bool:
        return any(p.exists() for p in self.ours())

    def folders(self) -> list[Path]:
        """The folders the run writes into: its own, and the checkpoint's when --checkpoint puts it elsewhere
        (another run's folder, say), each once."""
        return list({folder.resolve(): folder for folder in (self.run_dir, self.checkpoint.parent)}.values())

    def lock(self) -> RunLock:
        """Take the locks of the folders the run writes into, creating them (RunLocked when another process holds
        one: one writer per file, wherever --checkpoint puts the checkpoint; RunConflict when a file stands where the
        run's folder belongs, a folder or a symbolic link where one of its files does, or neither can be made), and
        remove the temporary files that a writer killed mid-write left, which only the locks' holder may do."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunConflict(f"{self.run_dir} is a file where the run's folder belongs; move it away and run the "
                              "command again")
        lock_files = [folder / LOCK for folder in self.folders()]
        for path in [*self.ours(), *lock_files, *self.tracking]:
            if path.is_symlink():  # the run makes none: writing through it would change a file elsewhere
                raise RunConflict(f"{path} is a symbolic link (to {os.readlink(path)}), which the run never writes "
                                  "through; replace it by a copy of what it names, or remove it, and run the command "
                                  "again")
            if path.is_dir() and path not in self.tracking:  # never removed for the user: the run writes no folder
                raise RunConflict(f"{path} is a folder where the run keeps a file; move it away and run the command "
                                  "again")
        try:
            lock = RunLock(self.folders())
        except OSError as e:  # a folder that check_writable passed and the file system refuses all the same
            raise RunConflict(f"{self.run_dir}: its folder or lock file cannot be made ({first_line(e)}); choose "
                              "another --out_dir") from None
        for folder in self.folders():
            for path in folder.glob(".*.tmp"):
                if any(path.name.startswith(f".{p.name}.") for p in self.ours()) and not path.is_dir():
                    path.unlink(missing_ok=True)
        return lock

    def remove(self) -> None:
        """Delete the run's files (history first, so that no half-removed run reads as finished) and its tracking
        folders, and nothing else."""
        for path in self.ours():
            path.unlink(missing_ok=True)
        for folder in self.tracking:
            shutil.rmtree(folder, ignore_errors=True)

    def read_config(self) -> RunConfig | None:
        """The config.json of the run, or None when there is none or it is not readable."""
        try:
            return RunConfig.from_dict(read_json(self.config))
        except (OSError, ValueError, TypeError):
            return None

    def write_config(self, config: RunConfig) -> None:
        write_json(self.config, config.to_dict())

    def read_history(self) -> dict | None:
        """history.json, or None when there is none or it is not readable or not well formed (well_formed_history)."""
        try:
            history = read_json(self.history)
        except (OSError, ValueError):
            return None
        return history if well_formed_history(history) else None

    def write_history(self, history: dict) -> None:
        write_json(self.history, history)

    def is_kept_summary(self) -> bool:
        """Whether the folder is one keep_summary wrote: a folder of config.json, history.json and grad_norms.csv
        (those of them that exist), and nothing else."""
        return self.run_dir.is_dir() and all(
            p in (self.config, self.history, self.grad_norms) and p.is_file() for p in self.run_dir.iterdir())

    def keep_summary(self, run_dir: Path) -> None:
        """Copy into `run_dir`, byte for byte, what the results tables read: config.json, history.json and the
        header and first row (step 0) of grad_norms.csv, those of them that exist; a few kilobytes."""
        kept = RunFiles(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for source, target in ((self.config, kept.config), (self.history, kept.history)):
            if source.is_file():
                shutil.copyfile(source, target)
        if self.grad_norms.is_file():
            with self.grad_norms.open("rb") as f:
                kept.grad_norms.write_bytes(f.readline() + f.readline())

    def start_grad_norms(self, names: list[str]) -> None:
        """A new grad_norms.csv holding only its header: step, then one column per logged weight."""
        atomic_write(self.grad_norms, lambda tmp: tmp.write_text(",".join(["step", *names]) + "\n"))

    def append_grad_norms(self, steps: list[int], norms: torch.Tensor) -> None:
        """Append one epoch's logged steps (constant cost however long the run has been)."""
        rows = np.column_stack([np.asarray(steps, dtype=np.float64), norms.double().numpy()])
        text = io.StringIO()
        np.savetxt(text, rows, fmt=["%d"] + ["%.9g"] * norms.shape[1], delimiter=",")
        with reporting_full_disk(self.grad_norms), self.grad_norms.open("a") as f:
            f.write(text.getvalue())

    def heal_grad_norms(self, names: list[str], steps_done: int) -> None:
        """Before a resumed run appends: keep the header and the complete rows of steps before `steps_done` (what
        the checkpoint has trained), in order, and drop a row cut by a crash or one that does not parse; a missing or
        foreign file starts again from its header."""
        header = ",".join(["step", *names])
        try:
            lines = self.grad_norms.read_text().split("\n")
        except (OSError, UnicodeDecodeError):
            lines = []
        if not lines or lines[0] != header:
            self.start_grad_norms(names)
            return
        kept, last = [header], -1
        for line in lines[1:-1]:  # the text after the last newline is a cut row, or empty
            row = parse_row(line, len(names) + 1)
            if row is not None and last < row[0] < steps_done:
                kept.append(line)
                last = row[0]
        if len(kept) != len(lines) - 1 or lines[-1]:
            atomic_write(self.grad_norms, lambda tmp: tmp.write_text("\n".join(kept) + "\n"))

    def read_grad_norms(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """The logged steps and, per weight, its gradient norm at each of them; a file that is missing, cut or not
        ours is a ValueError saying so."""
        try:
            header, *lines = self.grad_norms.read_text().splitlines()
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{self.grad_norms} is not readable ({first_line(e)})") from None
        names = header.split(",")[1:]
        if header.split(",")[0] != "step" or not names:
            raise ValueError(f"{self.grad_norms} has no header of step and weight names")
        rows = [parse_row(line, len(names) + 1) for line in lines]
        if None in rows:
            raise ValueError(f"{self.grad_norms} has a row that is cut or not numbers (line {rows.index(None) + 2})")
        table = np.array(rows, dtype=np.float64).reshape(-1, len(names) + 1)
        return table[:, 0].astype(int).tolist(), {name: table[:, i + 1] for i, name in enumerate(names)}

    def read_logged_grad_norms(self, config: RunConfig, history: dict) -> tuple[list[int], dict[str, np.ndarray]]:
        """read_grad_norms, and a ValueError unless the file holds exactly the steps the run logged (a file
        restarted on resume lacks the earlier ones) or when the run logged none."""
        if config.grad_log_every == 0:
            raise ValueError("it logged no gradient norms (--grad_log_every 0)")
        steps, norms = self.read_grad_norms()
        trained = history["epochs"][-1]["steps"] if history["epochs"] else 0
        logged = list(range(0, trained, config.grad_log_every))
        if steps != logged:
            raise ValueError(f"{self.grad_norms} holds {len(steps)} rows, not the {len(logged)} logged steps")
        return steps, norms


def is_number(value: object) -> bool:
    """Whether a JSON value is a finite number (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def well_formed_history(history: object) -> bool:
    """Whether parsed JSON is a history as train_run writes it: epoch records 1, 2, ... with every number train_epoch
    puts in them (whole steps, seconds >= 0, the validation or, without one, the test loss and accuracy from 0 to 1,
    the same for every epoch) and, once the run has finished, test losses and accuracies."""
    def has_numbers(record: object, keys: tuple[str, ...]) -> bool:
        return isinstance(record, dict) and all(is_number(record.get(key)) for key in keys)
    epochs = history.get("epochs") if isinstance(history, dict) else None
    if not isinstance(epochs, list):
        return False
    held_out = held_out_key(history) or "val"
    test = history.get("test", {"loss": 0, "acc": 0})
    return (all(has_numbers(e, (*EPOCH_RECORD, f"{held_out}_loss", f"{held_out}_acc")) and e["epoch"] == i + 1
                and isinstance(e["steps"], int) and e["seconds"] >= 0 and 0 <= e[f"{held_out}_acc"] <= 1
                for i, e in enumerate(epochs))
            and isinstance(test, dict) and has_numbers(test, ("loss", "acc", *test)) and test.get("seconds", 0) >= 0
            and all(0 <= value <= 1 for key, value in test.items() if key.startswith("acc"))
            and isinstance(history.get("machines", []), list)
            and all(isinstance(machine, str) for machine in history.get("machines", [])))


HELD_OUT = {"val": "validation", "test": "test"}  # what a history's epochs are scored on: its key, its name


def held_out_key(history: dict) -> str | None:
    """What a history's epochs are scored on: "val", or "test" for a run without validation (--val_size 0); None
    before its first epoch."""
    epochs = history.get("epochs")
    first = epochs[0] if isinstance(epochs, list) and epochs and isinstance(epochs[0], dict) else {}
    return "val" if "val_acc" in first else "test" if "test_acc" in first else None


def held_out_accuracies(history: dict) -> list[float]:
    """The accuracy of every epoch of a well-formed history on what it was scored on (held_out_key)."""
    return [e[f"{held_out_key(history)}_acc"] for e in history["epochs"]]


def parse_row(line: str, columns: int) -> list[float] | None:
    """A grad_norms.csv row as numbers (an integer step first), or None when it is cut or is not one."""
    fields = line.split(",")
    if len(fields) != columns or not fields[0].isdigit():
        return None
    try:
        return [int(fields[0]), *(float(f) for f in fields[1:])]
    except ValueError:
        return None


def build_checkpoint(run: RunSetup, history: dict, wandb_run_id: str | None) -> dict:
    """The checkpoint of a run after its last epoch in `history`: everything a resume needs to continue it bit for
    bit (model, optimizer, schedule, every random state, the data order), stamped with CHECKPOINT_FORMAT."""
    return {"format": CHECKPOINT_FORMAT, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.scheduler.state_dict(), "grad_scaler": run.scaler.state_dict(),
            "epoch": len(history["epochs"]), "config": run.config.to_dict(), "history": history,
            "rng": dict(rng_state(), data=run.train.state_dict()), "wandb_run_id": wandb_run_id,
            **({"ema": run.ema.state_dict()} if run.ema is not None else {})}


def checksum(checkpoint: dict) -> str:
    """The SHA-256 of everything a checkpoint holds but its "checksum" entry, whatever its keys: every key, every
    tensor's dtype, shape and bytes, every other value's type and repr, in the dict's order (which torch.load keeps).
    A value of another type is a TypeError."""
    digest = hashlib.sha256()

    def add(value: object) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}:".encode())
            for key, item in value.items():
                add(key)
                add(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                add(item)
        elif value is None or isinstance(value, (bool, int, float, str)):
            digest.update(f"{type(value).__name__} {value!r};".encode())
        else:
            raise TypeError(f"a checkpoint holds no {type(value).__name__}")
    add({key: value for key, value in checkpoint.items() if key != "checksum"})
    return digest.hexdigest()


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Save a checkpoint atomically, with the checksum of what it holds. It is serialised in memory first, so that a
    full disk is a plain OSError from the write (torch.save's own writer reports it as an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(dict(checkpoint, checksum=checksum(checkpoint)), buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with `weights_only=True` and bring it to today's format; anything that is not one of
    ours, or is of a newer format, is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        with warnings.catch_warnings():  # torch's, about what a file holds, would come before our one line about it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # arbitrary bytes make the unpickler fail in arbitrary ways; all mean "not a checkpoint"
        raise CheckpointError(f"--checkpoint {path} is not a loadable checkpoint: {unloadable_reason(path, e)}") \
            from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise CheckpointError(f"--checkpoint {path} is not a checkpoint written by pipeline.py (no model and config)")
    check_intact(checkpoint, path)
    epoch = checkpoint.get("epoch", 0)
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        raise CheckpointError(f"--checkpoint {path}: its epoch is {epoch!r}, not a number of epochs")
    return upgrade_checkpoint(checkpoint, path)


def check_intact(checkpoint: dict, path: Path) -> None:
    """A CheckpointError when a loaded checkpoint does not match the checksum saved with it (one saved before
    checksums has none, and passes)."""
    if "checksum" not in checkpoint:
        return
    try:
        intact = checkpoint["checksum"] == checksum(checkpoint)
    except (TypeError, RuntimeError):  # a value no checkpoint holds, such as a sparse tensor
        intact = False
    if not intact:
        raise CheckpointError(f"--checkpoint {path} is damaged: what it holds does not match the checksum saved with "
                              "it (a disk or copy error changed it), and a checksum cannot repair it: its weights are "
                              "lost, while its run's history.json and figures are unaffected; restore the file from a "
                              "copy, or train the run again (--overwrite)")


def note_unchecked(checkpoint: dict, path: str | Path) -> None:
    """Say once, on stderr, that a checkpoint in use was saved before checksums, so damage to it goes unseen."""
    if "checksum" not in checkpoint:
        say_unchecked(str(path))


@functools.cache
def say_unchecked(path: str) -> None:
    print(f"note: {path} was saved without a checksum (by an older version), so damage to it cannot be detected; a "
          "run saves one with its next epoch", file=sys.stderr)


def unloadable_reason(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) failed on `path`, in our words: torch's own message ends in advice to load
    with weights_only=False, which would run whatever code the file holds."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        return first_line(e)
    if not magic:
        return "the file is empty"
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        return "it is not a file that torch.save writes"
    if "Weights only load failed" in str(error):
        return "it holds Python objects that the safe loader (weights_only=True) refuses to create"
    return f"it is cut short or damaged ({first_line(error, 80)})"


def upgrade_checkpoint(checkpoint: dict, path: Path) -> dict:
    """A checkpoint of any format this suite wrote, in today's. Format 1 differs only in its config, which
    RunConfig.from_dict converts (config.upgrade) as it does for an old config.json."""
    version = checkpoint.get("format", 1)
    if type(version) is not int or version not in (1, CHECKPOINT_FORMAT):
        raise CheckpointError(f"--checkpoint {path} has format {version!r}; this version of the suite reads "
                              f"formats 1 to {CHECKPOINT_FORMAT}")
    return dict(checkpoint, format=CHECKPOINT_FORMAT)


def saved_config(checkpoint: dict, path: Path) -> RunConfig:
    """The config a loaded checkpoint was trained with; CheckpointError when it is not one of this suite."""
    try:
        return RunConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {first_line(e)}") from None


def load_model(path: str | Path) -> tuple[RunConfig, nn.Module]:
    """The config of a saved run and its model with the saved weights, on the CPU; a mismatch is a
    CheckpointError."""
    return model_of(load_checkpoint(path), path)


def unfinished(checkpoint: dict, config: RunConfig) -> str | None:
    """"unfinished: 2 of 10 epochs" for the checkpoint of a run saved before its last epoch, else None."""
    epochs = checkpoint.get("epoch", config.num_epochs)
    return f"unfinished: {epochs} of {config.num_epochs} epochs" if epochs < config.num_epochs else None


def model_of(checkpoint: dict, path: str | Path, averaged: bool = True) -> tuple[RunConfig, nn.Module]:
    """The config and the model with its weights of a loaded checkpoint (read from `path`): those it is scored with,
    or with `averaged` False the trained ones of an --ema run; a CheckpointError when they do not fit together."""
    config = saved_config(checkpoint, Path(path))
    try:
        model = build_model(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {first_line(e)}") from None
    try:
        model.load_state_dict(scored_weights(checkpoint, config) if averaged else checkpoint["model"])
    except (TypeError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the {config.model_name} its config "
                              f"describes ({state_error(e)})") from None
    if checkpoint.get("epoch", 0) > config.num_epochs:
        raise CheckpointError(f"checkpoint {path}: it has trained {checkpoint['epoch']} epochs, more than the "
                              f"{config.num_epochs} of its config")
    note_unchecked(checkpoint, path)
    return config, model


def state_error(error: Exception) -> str:
    """What is wrong with a state that torch or restore would not load, in one line: a missing entry by its name, and
    of torch's load_state_dict errors the line after the first, which only says that there are errors."""
    if isinstance(error, KeyError):
        return f"it has no {error.args[0]!r}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else first_line(error))[:200]


def scored_weights(checkpoint: dict, config: RunConfig) -> dict:
    """The weights a saved run is scored and explained with: the moving average's with --ema, else the trained ones."""
    if not config.ema:
        return checkpoint["model"]
    if not isinstance(checkpoint.get("ema"), dict):
        raise KeyError("its config has --ema but it holds no averaged weights")
    return {name.removeprefix("module."): value for name, value in checkpoint["ema"].items() if name != "n_averaged"}


def check_resumable(saved: RunConfig, epochs: int, asked: RunConfig, where: Path) -> None:
    """The one rule for continuing a saved run (`epochs` trained with `saved`) as `asked`: the same settings except
    where it runs (and the length of a constant schedule), and no more epochs than asked; otherwise ResumeError."""
    changed = saved.changed_flag(asked)
    if changed:
        raise ResumeError(f"{where} was trained with {changed}; resume with the same flags, pass --overwrite to "
                          "replace it, or --run_name/--out_dir to keep both")
    if epochs > asked.num_epochs:
        raise ResumeError(f"{where} has trained {epochs} epochs, more than --num_epochs {asked.num_epochs}; pass "
                          "--overwrite to replace it, or --run_name/--out_dir to keep both")


def check_checkpoint_resumable(checkpoint: dict, asked: RunConfig, path: Path) -> None:
    """check_resumable for a loaded checkpoint; a config that is not one of ours is a ResumeError too."""
    try:
        saved = saved_config(checkpoint, path)
    except CheckpointError as e:
        raise ResumeError(f"{e}; pass --overwrite to start again") from None
    check_resumable(saved, checkpoint.get("epoch", 0), asked, path)


def restore(run: RunSetup, path: Path) -> tuple[dict, str | None]:
    """Load a checkpoint of the same run into `run` (model, optimizer, schedule, random states, data order);
    return the history of the epochs it holds and its W&B run id (None when it was not tracked in W&B)."""
    checkpoint = load_checkpoint(path)
    check_checkpoint_resumable(checkpoint, run.config, path)
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        set_rng_state(checkpoint["rng"])
        run.train.load_state_dict(checkpoint["rng"]["data"])
        if checkpoint.get("grad_scaler"):  # a float16 run's loss scale; empty or absent otherwise
            run.scaler.load_state_dict(checkpoint["grad_scaler"])
        if run.ema is not None:
            run.ema.load_state_dict(checkpoint["ema"])
        history = {"epochs": list(checkpoint["history"]["epochs"]),
                   "machines": list(checkpoint["history"].get("machines", []))}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ResumeError(f"{path} cannot be resumed ({state_error(e)}); use --overwrite to start again") from None
    note_unchecked(checkpoint, path)
    return history, checkpoint.get("wandb_run_id")
