"""Shared plumbing: CLI errors, seeding, devices and atomic files."""
from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import json
import os
import platform
import random
import re
import signal
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch

BUILTIN_PRINT = builtins.print


class CLIError(Exception):
    """An error a CLI reports as one line, without a traceback, exiting with `exit_status`."""
    exit_status = 1


class UsageError(CLIError):
    """Bad input from the user: exit status 2."""
    exit_status = 2


class OutputError(OSError):
    """A file could not be written where it belongs; whatever was there is kept. A CLI says it in one line."""


class NoSpaceError(OutputError):
    """The disk filled up while a file was written; the file keeps what it held before."""

    def __init__(self, path: str | Path):
        super().__init__(f"no space left on {path}")


class StdoutGone(KeyboardInterrupt):
    """stdout can no longer be written (a pipe whose reader left, as `| head` does, or a full disk): the command
    stops as on Ctrl-C, every run keeping its last finished epoch."""


class GuardedStdout:
    """sys.stdout, whose failures to write are a StdoutGone; once one has happened, what is written goes nowhere, so
    that Python's own last flush at exit has nothing to report."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.guarded(self.stream.write, text)

    def flush(self) -> None:
        self.guarded(self.stream.flush)

    def guarded(self, call: Callable, *args):
        try:
            return call(*args)
        except OSError as e:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            raise StdoutGone(f"stdout cannot be written ({first_line(e)})") from None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser that states defaults in its help and whose errors are one line, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add(self, name: str, *aliases: str, **kwargs) -> argparse.Action:
        """Add a `--snake_case` flag that is also accepted as `--kebab-case` (and as any `aliases`)."""
        return add_flag(self, name, *aliases, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse; the namespace's `given` also holds the dests that the command line set, whatever their
        value (a flag given its default value is given all the same)."""
        parsed, extras = super().parse_known_args(args, namespace)
        unset = object()
        probe = argparse.Namespace(**{action.dest: unset for action in self._actions})
        super().parse_known_args(args, probe)
        parsed.given = tuple(sorted(dest for dest, value in vars(probe).items() if value is not unset))
        return parsed, extras

    def given_flags(self, args: argparse.Namespace, dests: Collection[str]) -> list[str]:
        """Those of `dests` that the command line gave, as their flags (--class for dest target)."""
        return [action.option_strings[0] for action in self._actions if action.dest in dests and
                action.dest in args.given]


def add_flag(container: argparse._ActionsContainer, name: str, *aliases: str, **kwargs) -> argparse.Action:
    """Add a `--snake_case` flag to a parser or one of its groups, also accepted as `--kebab-case` (and as any
    `aliases`)."""
    kebab = [name.replace("_", "-")] if "_" in name else []
    return container.add_argument(name, *kebab, *aliases, **kwargs)


def run_cli(main: Callable, args) -> None:
    """Run a CLI's `main(args)`: a CLIError is one line and its exit status, Ctrl-C, SIGTERM or a stdout that cannot
    be written (StdoutGone) exits 130."""
    prog = Path(sys.argv[0]).name
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stdout = sys.stdout
    if stdout is not None:  # None: started with its stdout closed, and print() writes nothing
        sys.stdout = GuardedStdout(stdout)
    try:
        main(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where a failure is one line, not at exit
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except OutputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"\n{prog}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
    finally:
        sys.stdout = stdout


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), cut to `limit` characters, for one-line errors."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def name_problem(name: str, max_bytes: int) -> str | None:
    """Why `name` cannot be (part of) a file name, in words, or None: it is empty or blanks only, holds a control
    character or bytes that are not text (as a command line can pass them), or is longer than `max_bytes` in UTF-8."""
    if not name.strip():
        return "is empty or blanks only"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "holds a control character"
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return "holds bytes that are not text (UTF-8)"
    return f"is {size} bytes long, more than {max_bytes}" if size > max_bytes else None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global random-number generator states, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or device.type == "cpu" and device.index is not None:
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's guess where there is none)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return model


def machine_description(device: torch.device) -> str:
    """What a run trains on, for its history: the GPU's name, or the CPU's model and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else the nearest of its parents that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, flag: str) -> None:
    """A folder we will create or write into must be (under) a writable folder, and reachable: no loop of symbolic
    links on its way."""
    try:
        path.resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: a loop, before Python 3.13
        raise UsageError(f"{flag} {path} cannot be reached ({first_line(e)}); give another folder") from None
    existing = existing_ancestor(path)
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


@contextlib.contextmanager
def reporting_full_disk(path: str | Path):
    """Turn a full disk (ENOSPC, however deep in a writer it surfaced) into a NoSpaceError naming `path`."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, NoSpaceError):
            raise NoSpaceError(path) from None
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then move it into place in one step; a full disk is
    a NoSpaceError and leaves `path` as it was."""
    path = Path(path)
    with reporting_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        with reporting_full_disk(path):
            write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the mode a plain open() would
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            raise OutputError(f"{path} is a folder where a file is written; move it away and run the command "
                              "again") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# atomic_write's temporary file: .<name>.<pid of its writer>.<mkstemp's random letters>.tmp, of the figures and JSON
# that the callers of remove_leftovers write (a user's own .notes.2024.v2.tmp beside them is not theirs)
LEFTOVER = re.compile(r"\.(?P<name>.+\.(?:png|json))\.(?P<pid>\d+)\.\w+\.tmp")


def remove_leftovers(folder: Path) -> None:
    """Remove the temporary files that atomic_write left in `folder` when a kill stopped its writer: those of
    processes that no longer run (a running writer's file is its own)."""
    for path in folder.glob(".*.tmp"):
        match = LEFTOVER.fullmatch(path.name)
        if match and not process_runs(int(match["pid"])) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


def process_runs(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's included)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: an id no process can have, beyond a C long
        return False
    except PermissionError:
        return True
    return True


def read_json(path: str | Path) -> object:
    """The JSON value a file holds; a ValueError when it is not UTF-8 text of JSON (nested too deep for the parser
    included), an OSError when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(first_line(e)) from None


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """Write `obj` as JSON (indented unless `indent` is None), atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent) + "\n"))


def setup_for_distributed(is_master: bool) -> None:
    """Print only on the master process (torchrun's rank 0) unless called with print(..., force=True), as
    torchvision's references do; on the master every print goes through."""
    def print(*args, force: bool = False, **kwargs) -> None:
        if is_master or force:
            BUILTIN_PRINT(*args, **kwargs)
    builtins.print = print


def init_distributed(device_type: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK): nccl on CUDA, gloo on the
    CPU. Return (rank, world size, this rank's device)."""
    import torch.distributed as dist
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, f"cuda:{local_rank}" if cuda else "cpu"


def distributed_world() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
