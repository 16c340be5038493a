"""Every command the README shows is one that exists, with options that exist.

`odapi` lines are parsed by the real `odapi` parser, `make` targets must be in the Makefile,
`airflow` lines are checked against the real `airflow ... --help` of that subcommand, and
`docker compose` lines name the compose file tests/e2e/test_docker_compose.py checks. What they
do is tested elsewhere (the stages' own tests, the end-to-end and backfill runs).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from odapi_operators.cli import build_parser

from conftest import ROOT

BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:odapi|make|airflow) [^`]+)`")
NOT_OURS = ("echo", "mkdir", "tensorboard", ".venv/bin/pip", "prodigy", "cd", "export")


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = [line for block in BLOCK.findall(text) for line in block.splitlines()]
    lines += [c for c in INLINE.findall(text)  # inline: full commands, not bare names
              if " --" in c and "..." not in c]
    commands = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line).strip()  # trailing comments
        line = re.sub(r"\[[^\]]*\]", "", line).strip()  # optional parts: [--to 3]
        if line and not line.startswith(NOT_OURS):
            commands.append(line)
    return sorted(set(commands))


COMMANDS = _commands()


def test_the_readme_shows_the_commands_we_expect():
    assert any(c.startswith("make demo") for c in COMMANDS)
    assert any(c.startswith("make test") for c in COMMANDS)
    assert any(c.startswith("airflow backfill create") for c in COMMANDS)
    assert any(c.startswith("odapi rollback") for c in COMMANDS)
    assert any(c.startswith("docker compose") for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("odapi ")])
def test_odapi_command_parses(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_make_target_exists(command):
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert set(command.split()[1:]) <= targets, command


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("airflow ")])
def test_airflow_command_and_options_exist(command, airflow_db):
    words = shlex.split(command)
    sub = [w for w in words[1:] if not w.startswith("-")][:2]
    done = subprocess.run([sys.executable, "-m", "airflow", *sub, "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for option in (w.split("=")[0] for w in words if w.startswith("--")):
        assert option in done.stdout, f"{command}: airflow {' '.join(sub)} has no {option}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("docker ")])
def test_docker_commands_use_the_checked_files(command):
    for path in re.findall(r"docker/[\w.-]+", command):
        assert (ROOT / path).is_file(), command
