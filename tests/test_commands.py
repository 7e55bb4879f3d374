"""Every command line of README.md, of docs/*.md and of the Makefile's recipes parses with its script's real parser,
and every relative link of those pages leads to an existing file (and heading)."""
from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = ("pipeline", "cam", "report", "bench", "gpu_check")
COMMAND = re.compile(r"^((?:\w+=\S+\s+)*)\S*python3?\s+(" + "|".join(SCRIPTS) + r")\.py\b(.*)$", re.S)
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
JOBS = "2"  # what $(nproc) and the Makefile's JOBS stand for here
FENCED = re.compile(r"^```[^\n]*\n.*?^```", re.S | re.M)
LINK = re.compile(r'\]\(([^)\s]+)\)|\bsrc="([^"]+)"')  # a Markdown link or image, an HTML image
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
MAKE_TARGETS = ("demo", "bench", "reproduce", "gpu-check")


@dataclass(frozen=True)
class Command:
    """One command line: its environment assignments, script and arguments, and where it was found."""
    env: tuple[str, ...]
    script: str
    argv: tuple[str, ...]
    origin: str


def split_segments(line: str) -> list[str]:
    """A shell line's commands: those inside $( ... ) (the substitution left as a placeholder) and those joined by
    && || ; or |."""
    segments = []
    while (match := SUBSTITUTION.search(line)) is not None:
        inner = match.group(1)
        segments.append(inner)
        line = line[:match.start()] + (JOBS if inner.strip() == "nproc" else "SUBSTITUTED") + line[match.end():]
    return segments + re.split(r"&&|\|\||;|\|", line)


def commands_in(text: str, origin: str) -> list[Command]:
    """The python pipeline.py|cam.py|report.py|bench.py commands of some shell text (continuations joined,
    comments and `...` placeholders dropped)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        for segment in split_segments(line):
            match = COMMAND.match(segment.strip())
            if match:
                argv = [t for t in shlex.split(match.group(3), comments=True) if t != "..."]
                found.append(Command(tuple(match.group(1).split()), match.group(2), tuple(argv), origin))
    return found


def markdown_commands(text: str, name: str = "README.md") -> list[Command]:
    """The commands of a Markdown page's code blocks and of its inline code spans (which may wrap across lines)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", FENCED.sub("", text))]
    return ([c for block in blocks for c in commands_in(block, f"{name} code block")] +
            [c for span in spans for c in commands_in(span, f"{name} inline code")])


def documentation() -> list[Path]:
    """README.md and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces made hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown page's headings (code blocks left out), a repeated one numbered as GitHub does."""
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+)$", FENCED.sub("", text), re.M):
        anchor = github_anchor(heading)
        found.add(f"{anchor}-{counts[anchor]}" if anchor in counts else anchor)
        counts[anchor] = counts.get(anchor, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links and image sources of a Markdown page (outside code) whose file or heading does not exist."""
    broken = []
    for match in LINK.finditer(re.sub(r"`[^`]+`", "", FENCED.sub("", page.read_text()))):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file() or (anchor and anchor not in anchors(file.read_text())):
            broken.append(target)
    return broken


def makefile_commands(*targets: str, **variables: str) -> list[Command]:
    """The commands make would run for these targets, its variables expanded (make -n, nothing installed or run)."""
    settings = [f"{k}={v}" for k, v in dict(JOBS=JOBS, **variables).items()]
    dry_run = subprocess.run(["make", "-n", "-o", ".venv/.installed", *targets, *settings], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    return commands_in(dry_run, f"make {' '.join(targets)}")


def parse(command: Command):
    """The namespace the script's own parser makes of the command's arguments; abbreviations are not accepted,
    so that a flag renamed in the code no longer matches the README's spelling."""
    parser = importlib.import_module(command.script).get_args_parser()
    parser.allow_abbrev = False
    return parser.parse_args(list(command.argv))


def check_parses(command: Command, capsys) -> None:
    try:
        parse(command)
    except SystemExit as e:
        if e.code != 0 or "-h" not in command.argv:  # -h prints the help and exits 0
            error = capsys.readouterr().err.strip()
            pytest.fail(f"{command.origin}: {command.script}.py {' '.join(command.argv)}\n{error}")


def test_every_documented_command_parses(capsys):
    commands = [c for page in documentation() for c in markdown_commands(page.read_text(), page.name)]
    assert {c.script for c in commands} == set(SCRIPTS)
    assert len(commands) >= 15
    for command in commands:
        check_parses(command, capsys)


@needs_make
def test_every_makefile_command_parses(capsys):
    commands = makefile_commands(*MAKE_TARGETS)
    assert {c.script for c in commands} == set(SCRIPTS)
    for command in commands:
        check_parses(command, capsys)


@needs_make
@pytest.mark.parametrize("target", ["reproduce-ex1", "reproduce-ex2", "reproduce-ex3"])
def test_readme_gives_the_exercise_commands_the_makefile_runs(target):
    """Each training and CAM command of a reproduce target is in README.md with the same environment and the same
    parsed arguments."""
    readme = {(c.env, c.script, repr(sorted(vars(parse(c)).items())))
              for c in markdown_commands((ROOT / "README.md").read_text()) if "-h" not in c.argv}
    made = [c for c in makefile_commands(target, PY="python") if c.script in ("pipeline", "cam")]
    assert made
    for command in made:
        assert (command.env, command.script, repr(sorted(vars(parse(command)).items()))) in readme, command


def test_a_renamed_flag_fails_the_check(capsys):
    text = "```\npython pipeline.py --model_name MLP \\\n    --num_hidden_layer 2 --out_dir runs/x  # comment\n```\n"
    [command] = markdown_commands(text)
    assert command.argv == ("--model_name", "MLP", "--num_hidden_layer", "2", "--out_dir", "runs/x")
    with pytest.raises(pytest.fail.Exception, match="--num_hidden_layer"):
        check_parses(command, capsys)


def test_substitutions_and_chains_are_split_into_commands():
    line = "best=$(python report.py --best_checkpoint runs/ex2) && python cam.py --checkpoint $best --jobs $(nproc)"
    commands = commands_in(line, "test")
    assert [(c.script, c.argv) for c in commands] == [
        ("report", ("--best_checkpoint", "runs/ex2")), ("cam", ("--checkpoint", "$best", "--jobs", JOBS))]
    assert commands_in("OMP_WAIT_POLICY=PASSIVE .venv/bin/python pipeline.py --augment", "t")[0].env == (
        "OMP_WAIT_POLICY=PASSIVE",)


def test_no_development_path_reaches_the_user():
    """Our own data layout (../shared/datasets) is neither a default nor in the README, docs/, the Makefile or any
    help."""
    texts = [page.read_text() for page in documentation()] + [(ROOT / "Makefile").read_text()]
    texts += [importlib.import_module(script).get_args_parser().format_help() for script in SCRIPTS]
    assert not [text for text in texts if "shared/datasets" in text or "../shared" in text]


def test_every_relative_link_leads_to_a_file_and_heading():
    pages = documentation()
    assert len(pages) > 1
    assert {page.name: broken_links(page) for page in pages} == {page.name: [] for page in pages}


def test_a_missing_file_or_heading_is_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    headings = "# Cam\n## How faithful are the maps? (`--faithfulness`)\n## Run\n## Run\n"
    (tmp_path / "docs" / "cam.md").write_text(headings)
    page = tmp_path / "README.md"
    page.write_text("[a](docs/cam.md#how-faithful-are-the-maps---faithfulness) [b](docs/cam.md#run-1) [c](#top)\n"
                    "# Top\n![](img/none.png) <img\nsrc=\"docs/gone.md\"> [d](docs/cam.md#run-2) `[e](no.md)`\n"
                    "```\n[f](no.md)\n```\n[g](https://example.org/x.md)\n")
    assert broken_links(page) == ["img/none.png", "docs/gone.md", "docs/cam.md#run-2"]
