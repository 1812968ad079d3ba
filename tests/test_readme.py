"""The README as a new user reads it: every Python block runs as written, every command
line of the `graphmerge` CLI parses, every benchmark option it cites exists.

Python blocks run in a fresh process per group, in a scratch folder, in README order; the
blocks of one group share their names (the Merging section defines ``data``, ``model_a``
and ``model_b`` for the sections after it). A failure points to the README line.
"""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphmerge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Sections (## headings) whose Python blocks share one process, in README order.
GROUPS = {
    "api": ["Python API", "Checkpoints"],
    "huggingface": ["HuggingFace and timm models"],
    "graphs": ["Model graphs"],
    "merging": ["Merging", "Matching functions", "Normalization after merging",
                "Evaluation and comparison"],
    "methods": ["More methods: PLeaS, STE, OT fusion; diagnostics"],
    "tutorial-torchvision": ["Tutorial: merging torchvision models"],
    "tutorial-custom-graph": ["Tutorial: merging a custom model with a hand-built graph"],
    "tutorial-renormalization": ["Tutorial: a renormalization study"],
}  # fmt: skip
# Blocks that run under torchrun (several processes), given by their first line.
TORCHRUN = "# run with: torchrun --nproc_per_node=2 merge_script.py"


@dataclass(frozen=True)
class Block:
    line: int  # of the first code line in README.md
    language: str
    code: str
    section: str  # the enclosing "## " heading


def readme_blocks() -> list[Block]:
    blocks, section, fence, start, lines = [], "", None, 0, []
    for number, text in enumerate(README.read_text().splitlines(), start=1):
        if fence is None and text.startswith("## "):
            section = text[3:].strip()
        elif fence is None and text.startswith("```"):
            fence, start, lines = text[3:].strip(), number + 1, []
        elif fence is not None and text.startswith("```"):
            blocks.append(Block(start, fence, "\n".join(lines) + "\n", section))
            fence = None
        elif fence is not None:
            lines.append(text)
    return blocks


def python_blocks(group: str) -> list[Block]:
    return [
        block
        for block in readme_blocks()
        if block.language == "python"
        and block.section in GROUPS[group]
        and not block.code.startswith(TORCHRUN)
    ]


def runner(blocks: list[Block]) -> str:
    """A script that runs ``blocks`` in one namespace, each compiled as README.md:line."""
    newline = "\n"
    calls = [
        f"exec(compile({newline * (block.line - 1) + block.code!r}, {str(README)!r}, 'exec'), "
        "scope)"
        for block in blocks
    ]
    return "import matplotlib\nmatplotlib.use('Agg')\nscope = {'__name__': '__main__'}\n" + (
        "\n".join(calls) + "\n"
    )


def run_python(script: str, folder: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    path = folder / "readme_blocks.py"
    path.write_text(script)
    return subprocess.run(
        [sys.executable, str(path)], cwd=folder, capture_output=True, text=True, timeout=timeout
    )


def test_the_groups_cover_every_python_block():
    grouped = {line for group in GROUPS for line in (b.line for b in python_blocks(group))}
    every = {
        block.line
        for block in readme_blocks()
        if block.language == "python" and not block.code.startswith(TORCHRUN)
    }
    assert grouped == every, f"README Python blocks in no group: lines {sorted(every - grouped)}"


@pytest.mark.parametrize("group", list(GROUPS))
def test_python_blocks_run_as_written(group, tmp_path):
    blocks = python_blocks(group)
    assert blocks, f"no Python block in {GROUPS[group]}"
    done = run_python(runner(blocks), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_torchrun_block_runs_under_torchrun(tmp_path):
    (block,) = [b for b in readme_blocks() if b.code.startswith(TORCHRUN)]
    for seed, name in ((0, "a.pt"), (1, "b.pt")):  # the checkpoints the block reads
        train = ["train", "--model", "mlp", "--hidden", "16", "--epochs", "1", "--quiet"]
        command = [sys.executable, "-m", "graphmerge", *train, "--seed", str(seed)]
        subprocess.run([*command, "--out", name], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "merge_script.py").write_text("\n" * (block.line - 1) + block.code)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    done = subprocess.run(
        [*launcher, "merge_script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "merged.pt").is_file()


def command_lines() -> list[tuple[int, str]]:
    """(README line, arguments after `graphmerge`) of every graphmerge command it shows:
    in shell blocks (continuation lines joined, comments cut) and in inline code."""
    found = []
    for block in readme_blocks():
        if block.language != "bash":
            continue
        joined = block.code.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            found += _graphmerge_arguments(block.line + offset, line.split("#")[0])
    for number, text in enumerate(README.read_text().splitlines(), start=1):
        for span in re.findall(r"`([^`]*graphmerge [^`]*)`", text):
            if _is_command(span):  # not a mention such as `graphmerge train` or `merge --out`
                found += _graphmerge_arguments(number, span)
    return found


def _is_command(span: str) -> bool:
    """An inline span that is a whole command: it names its files, or needs no arguments."""
    return bool(re.search(r"\.pt\b|--out \S|graphmerge (models|matchers|demo)\b", span))


def _graphmerge_arguments(line: int, text: str) -> list[tuple[int, str]]:
    text = text.split(" | ")[0]  # a pipe's reader is another program
    match = re.search(r"(?:^|\s|/)(?:-m )?graphmerge ([a-z].*)$", text.strip())
    if match is None or match.group(1).split()[0] not in COMMANDS:
        return []
    return [(line, match.group(1))]


COMMANDS = ("demo", "train", "merge", "evaluate", "compare", "interpolate", "graph", "models",
            "matchers")  # fmt: skip


@pytest.mark.parametrize(("line", "arguments"), command_lines())
def test_every_graphmerge_command_shown_parses(line, arguments):
    parser = build_parser()
    try:
        parser.parse_args(shlex.split(arguments))
    except SystemExit as error:  # argparse prints the reason to stderr
        pytest.fail(f"README.md:{line}: `graphmerge {arguments}` does not parse ({error})")


def benchmark_commands() -> list[tuple[int, str, list[str]]]:
    found = []
    for number, text in enumerate(README.read_text().splitlines(), start=1):
        for script, rest in re.findall(r"python (benchmarks/\w+\.py)([^`\n]*)", text):
            found.append((number, script, re.findall(r"(--[a-z][a-z-]*)", rest)))
    return found


@pytest.mark.parametrize(("line", "script", "options"), benchmark_commands())
def test_every_benchmark_command_shown_exists_with_its_options(line, script, options):
    path = ROOT / script
    assert path.is_file(), f"README.md:{line}: {script} does not exist"
    source = path.read_text()
    missing = [option for option in options if f'"{option}"' not in source]
    assert not missing, f"README.md:{line}: {script} has no option {', '.join(missing)}"
