"""The table of normbench's commands and its one entry point, ``main(args=None)``: the
``normbench`` console script, ``python -m normbench``, the tests and the sweeps' workers all
enter here.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (``normbench.cli``); ``sweep``,
``report`` and ``bench`` are normbench's own, each a function of its module that takes the
arguments after its name, imported when that command runs: a fit never loads the report's
statistics and plots, the sweep machinery or the benchmark, and the report never loads
Lightning or torch (``normbench.cli`` is imported for Lightning's commands only).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from normbench.errors import check_config_files, reported
from normbench.specs import DATA_MODULE_NAMES

if TYPE_CHECKING:
    from lightning.pytorch.cli import ArgsType


def sweep(args: list[str]) -> object:
    from normbench.sweep import sweep

    return sweep(args)


def report(args: list[str]) -> object:
    from normbench.report import report

    return report(args)


def bench(args: list[str]) -> object:
    from normbench.bench import bench

    return bench(args)


# normbench's own commands: name -> (the one line --help gives it, the function that runs it).
COMMANDS: dict[str, tuple[str, Callable[[list[str]], object]]] = {
    "sweep": ("Run a grid of fit runs from a sweep config.", sweep),
    "report": ("Tables, plots and verdicts from run records.", report),
    "bench": ("Time normbench against the study's own loop.", bench),
}


def main(args: ArgsType = None) -> None:
    """The one entry point: ``normbench ...`` in a shell, ``main([...])`` in tests and sweeps.

    A bad value, file or config ends it with one line on stderr, ``normbench: error: ...``, and
    exit status 2 (``SystemExit``); ``NORMBENCH_DEBUG=1`` shows the traceback instead. Ctrl-C
    ends it with exit status 130 and the line that says how to resume; output into a pipe
    whose reader has gone ends it quietly with 141, as SIGPIPE ends a Unix tool. A fit whose
    loss became NaN or inf (recorded as diverged) exits with 1, as a sweep with such a run does.

    Args:
        args: command-line arguments; None reads ``sys.argv``.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if args is None:
        try:
            _main(argv, args)
        except BrokenPipeError:
            # What read the output went away (``normbench sweep --dry-run | head``): end quietly,
            # as a Unix tool killed by SIGPIPE does (status 128 + 13), the rest of the output
            # sent nowhere rather than failing again as Python flushes it on the way out.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            exit_now(128 + 13)
        except SystemExit as done:
            if not isinstance(done.code, (int, type(None))):
                raise  # a message to print: Python's own exit prints it
            exit_now(done.code or 0)
        exit_now(0)
    _main(argv, args)


def exit_now(code: int) -> None:
    """End a shell command at once, with ``code``, once its output is flushed: everything it
    wrote (checkpoints, run record, TensorBoard events) is written and closed by then, and
    Python's own teardown of torch's and Lightning's modules takes about 2 s more on 2 cores for
    nothing. A process that is one rank of several (``WORLD_SIZE`` > 1, or a process group still
    up), has child processes left or started Ray ends the usual way, so that atexit handlers run."""
    import multiprocessing

    ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist = sys.modules.get("torch.distributed")  # loaded by whatever started a process group
    busy = multiprocessing.active_children() or "ray" in sys.modules  # Ray's own atexit shuts its processes down
    if ranks > 1 or (dist is not None and dist.is_available() and dist.is_initialized()) or busy:
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: list[str], args: ArgsType) -> None:
    try:
        if argv and argv[0] in COMMANDS:
            with reported(DATA_MODULE_NAMES):
                check_config_files(argv)
                COMMANDS[argv[0]][1](argv[1:])
        else:
            from normbench.cli import run_cli

            cli = run_cli(args, commands={name: help_line for name, (help_line, _) in COMMANDS.items()})
            if args is None and getattr(getattr(cli, "model", None), "diverged_at", None) is not None:
                raise SystemExit(1)  # as a sweep exits for a diverged run; its line was said as it stopped
    except KeyboardInterrupt as interrupt:
        if args is not None:
            raise  # a caller's own loop decides
        print(f"normbench: interrupted; {how_to_resume(argv, getattr(interrupt, 'resumable', None))}", file=sys.stderr)
        raise SystemExit(130) from None


def how_to_resume(argv: list[str], resumable: bool | None = None) -> str:
    """What an interrupted command line does next, said after Ctrl-C.

    Args:
        argv: the command line.
        resumable: whether the interrupted fit left a last checkpoint (None: not known).
    """
    command = argv[0] if argv else ""
    if command == "sweep":
        return "run the same command again to resume: finished runs are kept, interrupted ones continue from their last checkpoints"
    if command == "fit" and resumable is False:
        return "no checkpoint was saved yet (the first comes at checkpoint_every_n_steps or the epoch's end); run the same command again to start over"
    if command == "fit":
        last = any(
            a == "--ckpt_path=last" or (a == "--ckpt_path" and b == "last") for a, b in zip(argv, [*argv[1:], ""])
        )
        if last:
            return "run the same command again to continue from the last checkpoint"
        return "add --ckpt_path last to the same command to continue from the last checkpoint"
    return "nothing was saved that a run would resume from; run the command again"


if __name__ == "__main__":
    main()
