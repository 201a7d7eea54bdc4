"""docs/planner.md shows real output: every `$ afd plan ...` example is run and compared
(up to a `...` line, where the doc cuts an output short)."""

import re
import shlex
from pathlib import Path

import pytest

from services.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "planner.md"


def examples() -> list[tuple[str, list[str]]]:
    found = []
    for block in re.findall(r"```\n(\$ afd plan .*?)```", DOC.read_text(), re.S):
        command, *expected = block.rstrip("\n").split("\n")
        if "..." in expected:
            expected = expected[: expected.index("...")]
        found.append((command, expected))
    return found


def test_the_doc_has_examples_of_both_commands():
    commands = [command for command, _ in examples()]
    assert any(" cost " in c for c in commands) and any(" deploy " in c for c in commands)


@pytest.mark.parametrize("command, expected", examples(), ids=lambda v: str(v)[:60])
def test_an_example_prints_what_the_doc_shows(capsys, command, expected):
    argv = shlex.split(command.split(">")[0])[2:]  # drop "$ afd" and any "> file"
    assert main(argv) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\n")
    assert printed[: len(expected)] == expected
