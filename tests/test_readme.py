"""Every promise of the README on a fresh clone: each repository path it names exists, and each
``normbench ...`` command line in it parses (fit and the like with --print_config, sweeps with
--dry_run, report and bench with --help), without training and without a GPU."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from normbench.main import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOP = ("configs", "results", "normbench", "tests")
SUBCOMMANDS = ("fit", "validate", "test", "predict", "sweep", "report", "bench")


def expand_braces(text: str) -> list[str]:
    """Shell brace expansion: ``a{1,2}b`` -> ``a1b``, ``a2b``."""
    parts = re.split(r"(\{[^{}]*,[^{}]*\})", text)
    choices = [p[1:-1].split(",") if p.startswith("{") and "," in p else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def readme_paths() -> list[str]:
    found = set()
    for match in re.finditer(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./{{}},*-]*)", README):
        for path in expand_braces(match.group(1).rstrip(".,")):
            found.add(path)
    return sorted(found)


def readme_commands() -> list[list[str]]:
    """Each normbench command of the README's code blocks (continuation lines joined) and of its
    inline code that names a config, as arguments after ``normbench``."""
    blocks = re.sub(r"\\\n\s*", " ", README)
    lines = [line.strip() for line in blocks.splitlines() if line.startswith("    ")]
    lines += re.findall(r"`([^`]*normbench [a-z]+ --config[^`]*)`", blocks)
    commands = []
    for line in lines:
        match = re.search(rf"(?:^|[\s)])normbench\)?\s+((?:{'|'.join(SUBCOMMANDS)})\b.*)$", line)
        if match:
            args = shlex.split(match.group(1), comments=True)
            args = [re.sub(r"^\$\w+$", "0", a) for a in args]  # $SLURM_ARRAY_TASK_ID and the like
            if args not in commands:
                commands.append(args)
    return commands


def test_the_readme_names_paths_and_commands():
    assert len(readme_paths()) > 20 and len(readme_commands()) > 10


@pytest.mark.parametrize("path", readme_paths())
def test_every_path_the_readme_names_exists(path):
    if "*" in path:
        assert list(ROOT.glob(path)), path
    else:
        assert (ROOT / path).exists(), f"README.md names {path}, which is not in the repository"


def _dry(args: list[str], tmp_path: Path) -> list[str]:
    sub = args[0]
    if sub in ("report", "bench"):
        return [sub, "--help"]
    if sub == "sweep":
        return [*args, *([] if {"--dry-run", "--dry_run"} & set(args) else ["--dry_run"]), "--output", str(tmp_path)]
    return args if "--print_config" in args else [*args, "--print_config"]


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:80])
def test_every_readme_command_parses(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(_dry(args, tmp_path))
        raise SystemExit(0)
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
