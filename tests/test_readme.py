"""Every promise of the README and of the docs/ pages it links on a fresh clone: each repository
path they name exists, each ``normbench ...`` command line in them parses (fit and the like with
--print_config, sweeps with --dry_run, report and bench with --help), without training and
without a GPU, and each relative link leads to a file."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from normbench.cli import NormBenchCLI
from normbench.main import main

ROOT = Path(__file__).resolve().parents[1]
# README.md first, then every docs/ page: the files whose promises these tests keep.
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
TEXTS = {page: (ROOT / page).read_text() for page in PAGES}
README = TEXTS["README.md"]
TOP = ("configs", "results", "normbench", "tests", "docs")
SUBCOMMANDS = ("fit", "validate", "test", "predict", "sweep", "report", "bench")


def expand_braces(text: str) -> list[str]:
    """Shell brace expansion: ``a{1,2}b`` -> ``a1b``, ``a2b``."""
    parts = re.split(r"(\{[^{}]*,[^{}]*\})", text)
    choices = [p[1:-1].split(",") if p.startswith("{") and "," in p else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def readme_paths(page: str | None = None) -> list[str]:
    """The repository paths (from the repository's root) that one page names, or all pages."""
    found = set()
    for name in [page] if page else PAGES:
        for match in re.finditer(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./{{}},*-]*)", TEXTS[name]):
            for path in expand_braces(match.group(1).rstrip(".,")):
                found.add(path)
    return sorted(found)


def readme_commands(page: str | None = None) -> list[list[str]]:
    """Each normbench command of a page's code blocks (continuation lines joined) and of its
    inline code that names a config, as arguments after ``normbench``; of all pages when page is
    None."""
    commands = []
    for name in [page] if page else PAGES:
        blocks = re.sub(r"\\\n\s*", " ", TEXTS[name])
        lines = [line.strip() for line in blocks.splitlines() if line.startswith("    ")]
        lines += re.findall(r"`([^`]*normbench [a-z]+ --config[^`]*)`", blocks)
        for line in lines:
            match = re.search(rf"(?:^|[\s)])normbench\)?\s+((?:{'|'.join(SUBCOMMANDS)})\b.*)$", line)
            if match:
                args = shlex.split(match.group(1), comments=True)
                args = [re.sub(r"^\$\w+$", "0", a) for a in args]  # $SLURM_ARRAY_TASK_ID and the like
                if args not in commands:
                    commands.append(args)
    return commands


def page_links(page: str) -> list[str]:
    """The targets of a page's Markdown links that are not web addresses, code spans left out."""
    text = re.sub(r"`[^`\n]*`", "", TEXTS[page])
    targets = re.findall(r"\[[^\]\n]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]
    return list(dict.fromkeys(relative))


PATHS = [(page, path) for page in PAGES for path in readme_paths(page)]
# A command that several pages give (with or without --dry-run, which every check adds) is
# parsed once, under the first page that gives it.
_FIRST: dict[tuple[str, ...], tuple[str, list[str]]] = {}
for _page in PAGES:
    for _args in readme_commands(_page):
        _FIRST.setdefault(tuple(a for a in _args if a not in ("--dry-run", "--dry_run")), (_page, _args))
COMMANDS = list(_FIRST.values())
LINKS = [(page, target) for page in PAGES for target in page_links(page)]


def test_the_readme_names_paths_and_commands():
    assert len(readme_paths()) > 20 and len(readme_commands()) > 10


def test_the_pages_are_the_readme_and_docs():
    assert PAGES[0] == "README.md" and len(PAGES) > 1, PAGES


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / target).resolve() for target in page_links("README.md")}
    assert not [p for p in PAGES[1:] if (ROOT / p).resolve() not in linked]


@pytest.mark.parametrize("page, path", PATHS, ids=[f"{page}:{path}" for page, path in PATHS])
def test_every_path_the_readme_names_exists(page, path):
    if "*" in path:
        assert list(ROOT.glob(path)), f"{page} names {path}, which matches nothing in the repository"
    else:
        assert (ROOT / path).exists(), f"{page} names {path}, which is not in the repository"


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{page}:{target}" for page, target in LINKS])
def test_every_relative_link_leads_to_a_file(page, target):
    assert "#" not in target, f"{page} links {target}: link to the page, without an anchor"
    assert target, f"{page} has a link without a target"
    assert ((ROOT / page).parent / target).exists(), f"{page} links {target}, which is not in the repository"


def _dry(args: list[str], tmp_path: Path) -> list[str]:
    sub = args[0]
    if sub in ("report", "bench"):
        return [sub, "--help"]
    if sub == "sweep":
        return [*args, *([] if {"--dry-run", "--dry_run"} & set(args) else ["--dry_run"]), "--output", str(tmp_path)]
    return args if "--print_config" in args else [*args, "--print_config"]


# The 234-run every_norm sweep's dry run (5 s of jsonargparse parsing) with -m slow.
@pytest.mark.parametrize(
    "page, args",
    [pytest.param(page, args, marks=[pytest.mark.slow] if "configs/sweeps/every_norm.yaml" in args else [])
     for page, args in COMMANDS],
    ids=[f"{page}: {' '.join(args)}"[:100] for page, args in COMMANDS],
)  # fmt: skip
def test_every_readme_command_parses(page, args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(_dry(args, tmp_path))
        raise SystemExit(0)
    assert exit_info.value.code in (0, None), f"{page}: " + capsys.readouterr().err[-2000:]


def test_the_readmes_norm_option_names_every_norm():
    from normbench.norms import NORMS

    (row,) = [line for line in README.splitlines() if line.startswith("| `--model.norm` |")]
    named = re.findall(r"`([a-z_0-9]+)`", row.split("|")[2])
    assert sorted(named) == sorted(NORMS)


FITS = [
    (page, args) for page, args in COMMANDS if args[0] == "fit" and not {"--ckpt_path", "--print_config"} & set(args)
]


@pytest.mark.parametrize("page, args", FITS, ids=[f"{page}: {' '.join(args)}"[:100] for page, args in FITS])
def test_every_readme_fit_builds_its_model_data_and_trainer(page, args, monkeypatch):
    # Parsing is not enough: a norm's options are checked as its layers are built.
    monkeypatch.chdir(ROOT)
    cli = NormBenchCLI(args=args[1:], run=False)
    assert cli.model.hparams.norm == cli.config.model.norm
    assert any(p.requires_grad for p in cli.model.parameters()) and cli.trainer is not None
