"""Every option of fit, sweep, report and bench, given a value of the wrong type, is answered
with one line that names the option, the value and what it takes, a non-zero exit and no
traceback. The options are walked from the commands' own --help (fit's data options from
--data.help), so a new option is walked too; parse only, nothing trains."""

from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path

import pytest

from normbench.cli import NormBenchCLI
from normbench.errors import UserError, reported
from normbench.main import main
from normbench.specs import DATA_MODULE_NAMES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mnist_bn_bs16.yaml")
# Class types whose value is a class path: any text that names no class is wrong for them.
CLASS_TYPES = ("Accelerator", "Strategy", "Logger", "Callback", "Profiler", "Precision", "Callable", "ImageDataModule")


def _help(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(args)
    return out.getvalue()


@functools.cache
def options(args: tuple[str, ...]) -> dict[str, str | None]:
    """--option -> its type as --help states it (None for options that take no typed value:
    help, config files, flags, groups)."""
    found = {}
    for m in re.finditer(r"^  (--[\w.]+)[^\n]*\n((?:(?!  --)[^\n]*\n)*)", _help(list(args)), re.MULTILINE):
        typed = re.search(r"\(type: (.*?), default:", " ".join(m.group(0).split()))
        found[m.group(1)] = typed.group(1) if typed else None
    return found


def alternatives(kind: str) -> list[str]:
    """The top-level alternatives of a type as --help writes it: ``Union[a, b]``, ``a | b``,
    ``Optional[a]``."""
    kind = kind.strip()
    wrapped = re.fullmatch(r"(Union|Optional)\[(.*)\]", kind)
    if wrapped:
        parts, depth, start = [], 0, 0
        body = wrapped.group(2)
        for i, ch in enumerate(body + ","):
            depth += (ch == "[") - (ch == "]")
            if ch == "," and depth == 0:
                parts.append(body[start:i].strip())
                start = i + 1
        return [*parts, "null"] if wrapped.group(1) == "Optional" else parts
    return [p.strip() for p in kind.split("|")] if "|" in kind and "[" not in kind else [kind]


def wrong_value(kind: str | None) -> str | None:
    """A value of the wrong type for an option of type ``kind``; None when every text is a
    value of its type (a str alternative) or it takes none."""
    if kind is None:
        return None
    alts = alternatives(kind)
    if any(a in ("str", "Path", "<class 'str'>") for a in alts):
        return None
    if any(c in a for a in alts for c in CLASS_TYPES):
        return "no.such.Class"
    return "maybe" if set(alts) <= {"bool", "null"} else "abc"


def fit_options() -> dict[str, str | None]:
    return {**options(("fit", "--config", CONFIG, "--help")), **options(("fit", "--data.help", "MNISTDataModule"))}


class _Parser(Exception):
    pass


class _ParserOnly(NormBenchCLI):
    """NormBenchCLI stopped once its parser is built: fit's options are parsed by the parser the
    command uses, without building it once per option."""

    def parse_arguments(self, parser, args):
        raise _Parser(parser)


@pytest.fixture(scope="module")
def fit_parser():
    with pytest.raises(_Parser) as built:
        _ParserOnly(args=["fit"])
    return built.value.args[0]


def _said(run) -> tuple[int, str]:
    """(exit status, stderr) of ``run()`` inside ``reported``, as ``normbench`` says user errors."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as ended, reported(DATA_MODULE_NAMES):
        run()
    return ended.value.code, err.getvalue()


def _check(option: str, value: str, status, text: str) -> None:
    key = option.removeprefix("--")
    lines = text.strip().splitlines()
    assert status not in (0, None), f"{option} {value}: exit status {status}"
    assert len(lines) == 1 and lines[0].startswith("normbench: error: "), f"{option} {value}: {text}"
    assert "Traceback" not in text
    assert key in lines[0], f"{option} {value}: the message does not name the option: {lines[0]}"
    assert value in lines[0], f"{option} {value}: the message does not name the value: {lines[0]}"


def test_the_walk_covers_every_command_and_the_options_users_set():
    fit = fit_options()
    assert {"--data.batch_size", "--model.width", "--trainer.max_epochs", "--seed_everything"} <= set(fit)
    assert len([o for o, k in fit.items() if wrong_value(k)]) > 40
    for command in ("sweep", "bench"):
        assert [o for o, k in options((command, "--help")).items() if wrong_value(k)], command
    # report's options are folders: every text is one, so none has a wrong type to give.
    assert set(options(("report", "--help"))) == {"--out", "--reference"}


@pytest.mark.parametrize("option", [o for o, k in fit_options().items() if wrong_value(k)])
def test_a_wrong_fit_value_is_one_line_naming_option_value_and_type(option, fit_parser):
    value = wrong_value(fit_options()[option])
    args = ["fit", "--config", CONFIG, option, value]
    status, text = _said(lambda: fit_parser.parse_args(args))
    _check(option, value, status, text)


@pytest.mark.parametrize(
    ("command", "option"),
    [(c, o) for c in ("sweep", "report", "bench") for o, k in options((c, "--help")).items() if wrong_value(k)],
)
def test_a_wrong_value_of_the_other_commands_is_one_line_too(command, option, tmp_path):
    value = wrong_value(options((command, "--help"))[option])
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {CONFIG}\ngrid: {{seed_everything: [0]}}\n")
    head = {"sweep": ["sweep", "--config", str(sweep), "--dry_run", "--output", str(tmp_path)],
            "report": ["report", str(tmp_path)], "bench": ["bench"]}[command]  # fmt: skip
    status, text = _said(lambda: main([*head, option, value]))
    _check(option, value, status, text)


def test_the_shell_says_the_same_for_a_wrong_fit_value(capsys):
    with pytest.raises(UserError) as ended:
        main(["fit", "--config", CONFIG, "--seed_everything", "abc", "--print_config"])
    assert ended.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "normbench: error: seed_everything: 'abc' is not true/false or an integer"
    )
