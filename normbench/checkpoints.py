"""Where a run resumes: the checkpoint ``--ckpt_path`` names (``last``: the newest of this run)
and the run directory it continues, and the step a checkpoint was saved at."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace

from normbench.errors import CheckpointMismatchError, first_line
from normbench.module import ARCHITECTURE


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint was saved at."""
    return int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))


def resolve_resume(config: Namespace, subcommand: str | None, name: str) -> str | None:
    """The checkpoint to load, and, for ``fit``, the run directory to continue in.

    ``--ckpt_path last`` continues the newest version of this run that has a ``last.ckpt``
    (``--version`` picks another); with none, the run starts fresh. A checkpoint path inside
    ``<save_dir>/<name>/<version>/checkpoints/`` continues that run directory, unless ``--name``
    or ``--version`` say otherwise. Lightning alone would open a new, empty version folder.

    Args:
        config: the subcommand's config; its ``version`` (and for ``fit`` its ``name`` and
            ``default_root_dir``) are set to the run directory continued.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        name: the run's name under ``lightning_logs`` (``--name`` or the run name).
    """
    ckpt = str(config.ckpt_path)
    root = os.path.join(config.trainer.default_root_dir or ".", "lightning_logs")
    if ckpt == "last":
        run_dir = Path(root) / name
        # Lightning's logger names an integer version version_<n>, a string one as it is.
        given = config.version
        given = f"version_{given}" if isinstance(given, int) else given
        versions = [given] if given is not None else _versions_newest_first(run_dir)
        found = [run_dir / str(v) / "checkpoints" / "last.ckpt" for v in versions]
        found = [f for f in found if f.is_file()]
        if not found:
            print(f"normbench: no last checkpoint under {run_dir}; starting the run fresh", file=sys.stderr)
            return None
        config.version = _logger_version(found[0].parent.parent.name)
        return str(found[0])
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint {ckpt} not found; pass an existing .ckpt file or last")
    path = Path(ckpt).resolve()
    if subcommand == "fit" and path.parent.name == "checkpoints" and config.name is None and config.version is None:
        config.name, config.version = path.parents[2].name, _logger_version(path.parents[1].name)
        if config.trainer.default_root_dir is None and path.parents[3].name == "lightning_logs":
            config.trainer.default_root_dir = str(path.parents[4])
    return ckpt


def _logger_version(folder: str) -> int | str:
    """The logger's version for a run folder: ``version_3`` is version 3 (which the progress bar
    shows as ``v_num=3``; as the string, Lightning cut it to its last four characters, ``on_3``)."""
    number = folder.removeprefix("version_")
    return int(number) if folder.startswith("version_") and number.isdigit() else folder


def _versions_newest_first(run_dir: Path) -> list[str]:
    def number(p: Path) -> int:
        tail = p.name.removeprefix("version_")
        return int(tail) if tail.isdigit() else -1

    return [p.name for p in sorted(run_dir.glob("*"), key=lambda p: (number(p), p.stat().st_mtime), reverse=True)]


def saved_settings(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and the data settings a checkpoint was saved with ({} for those it lacks); an
    unreadable file is a one-line error."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved.get("hyper_parameters", {}), saved.get("datamodule_hyper_parameters") or {}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise CheckpointMismatchError(
            f"checkpoint {path} cannot be read ({first_line(err)}); pass a .ckpt file saved by normbench fit"
        ) from None


def data_not_given(saved: dict[str, Any], argv: list[str], data: Namespace | None) -> dict[str, Any]:
    """The data settings a command without a config does not give (``--data.<key>`` in ``argv``),
    as the run saved in a checkpoint had them: its normalization above all (the test split read
    as the network learned to see it, not by the defaults), and its batch size, which names the
    run directory an evaluation lands in.

    Args:
        saved: the checkpoint's data settings (``saved_settings``).
        argv: the command's arguments.
        data: the command's data module (class_path and init_args) as parsed.
    """
    if data is None or "init_args" not in data:
        return {}
    given = {a.removeprefix("--data.").split("=", 1)[0] for a in argv if a.startswith("--data.")}
    return {k: v for k, v in saved.items() if k in data.init_args and k not in given}


def _equal_settings(a: Any, b: Any) -> bool:
    """Two values of one model setting are the same setting (an empty and a missing dict too)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return dict(a or {}) == dict(b or {})
    return a == b


def check_same_model(path: str, saved: dict[str, Any], model: Namespace) -> None:
    """The network this command asks for (``model``) is the one the checkpoint at ``path`` holds
    (``saved``): a setting of ``ARCHITECTURE`` that differs is a one-line error that names it."""
    for key in ARCHITECTURE:
        if key in saved and key in model and _equal_settings(saved[key], model[key]) is False:
            raise CheckpointMismatchError(
                f"checkpoint {path} is of another model: it has {key}={saved[key]!r}, this run "
                f"{key}={model[key]!r}; drop --model.{key} or give {saved[key]!r}, or pass a checkpoint of this "
                "model"
            )
