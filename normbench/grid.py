"""A sweep's runs from its config: the cells of the grid, their names, arguments and run
directories, checked before anything runs, and grouped into packs."""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError

from normbench.cli import NormBenchCLI
from normbench.data import DATAMODULES
from normbench.devices import world_size
from normbench.errors import one_line
from normbench.norm_args import keep_norm_options
from normbench.norms import check_options
from normbench.pack import check_packable
from normbench.results import (
    status_of,
)
from normbench.specs import DATA_MODULE_NAMES, dataset_name

# Short labels for common axes in run names; other keys use their last component.
LABELS = {
    "dataset": "",
    "data": "",
    "model.norm": "",
    "model.net": "",
    "model.activation": "",
    "data.batch_size": "bs",
    "seed_everything": "seed",
    "model.num_blocks": "blocks",
}


@dataclass
class Cell:
    """One run of the grid; ``world_size``: the processes its Trainer config asks for (devices
    times nodes), set when the sweep parses the cells."""

    index: int
    name: str
    values: dict[str, Any]
    args: list[str]
    run_dir: str
    world_size: int = 1

    def status(self) -> str:
        return status_of(self.run_dir)


def cli_value(value: Any) -> str:
    """A config value as one command-line token (YAML flow style for lists and dicts)."""
    if isinstance(value, str):
        return value
    # One line however long: YAML folds flow style at 80 columns, a newline inside the token.
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()


def own_args(cell: Cell) -> list[str]:
    """The arguments of a cell that its grid values give; the others every cell of its sweep shares."""
    return [a for k, v in cell.values.items() for a in _key_args(k, v)]


def run_dir_args(sweep_dir: str | Path, name: str) -> list[str]:
    """The arguments that put a cell's run in its directory, the last of its arguments."""
    return ["--trainer.default_root_dir", str(sweep_dir), "--name", name, "--version", "0"]


def shared_args(cell: Cell) -> list[str]:
    """The arguments every cell of its sweep shares: the command, the base config, the overrides."""
    return cell.args[: len(cell.args) - len(own_args(cell)) - len(run_dir_args("", cell.name))]


def _key_args(key: str, value: Any) -> list[str]:
    if key == "dataset":
        if value not in DATAMODULES:
            raise ValueError(
                f"unknown dataset {value!r} in the sweep grid; valid datasets are: {', '.join(DATAMODULES)}"
            )
        return ["--data", f"normbench.data.{DATAMODULES[value].__name__}"]
    return [f"--{key}", cli_value(value)]


def _label(key: str, value: Any) -> str:
    prefix = LABELS.get(key, key.rsplit(".", 1)[-1])
    if key == "data":
        value = dataset_name(value)
    return prefix + re.sub(r"[^A-Za-z0-9_.+-]+", "-", cli_value(value)).strip("-")


def _axis(key: str, spec: list[Any] | dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, {config key: value}) for each point of one axis."""
    if isinstance(spec, dict):
        for label, keys in spec.items():
            if not isinstance(keys, dict) or not keys:
                raise ValueError(f"sweep axis {key}: variant {label!r} must map config keys to values")
        return [(str(label), dict(keys)) for label, keys in spec.items()]
    return [(_label(key, v), {key: v}) for v in spec]


def expand(grid: dict[str, Any], base: str, overrides: dict[str, Any], sweep_dir: str | Path) -> list[Cell]:
    """The cells of the grid, in a stable order (the axes' order, last axis fastest).

    Args:
        grid: config key -> the values it takes (``dataset`` takes registry names), or axis
            name -> {variant name: {config key: value}}.
        base: the base experiment config every run starts from.
        overrides: config key -> value, for every run.
        sweep_dir: the sweep's directory.
    """
    empty = [k for k, v in grid.items() if not isinstance(v, (list, dict)) or not v]
    if not grid or empty:
        where = f" at {', '.join(empty)}" if empty else ""
        raise ValueError(f"the sweep grid is empty{where}; give every axis a list of values")
    sweep_dir = Path(sweep_dir).resolve()
    fixed = [a for k, v in overrides.items() for a in _key_args(k, v)]
    cells = []
    for index, combo in enumerate(itertools.product(*(_axis(k, v) for k, v in grid.items()))):
        values = {k: v for _, keys in combo for k, v in keys.items()}
        name = "_".join(label for label, _ in combo if label)
        args = ["fit", "--config", str(Path(base).resolve()), *fixed]
        args += [a for k, v in values.items() for a in _key_args(k, v)]
        args += run_dir_args(sweep_dir, name)
        cells.append(Cell(index, name, values, args, str(sweep_dir / "lightning_logs" / name / "version_0")))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError("two cells of the sweep get the same name; give the axes distinct values")
    return cells


def validate(cells: list[Cell], pack: bool = False, prepare: bool = False) -> None:
    """Parse every cell's arguments before anything runs, so that a grid or override naming a
    key that does not exist, or a value of the wrong type, stops the sweep with one line; with
    ``pack``, also a setting that a pack would not apply (``normbench.pack.check_packable``);
    with ``prepare``, each dataset the runs read is there (downloaded here, once, where the
    runs may download), so that a missing one stops the sweep before its first run.

    Cells that differ only in ``seed_everything`` parse alike but for the seed, a key of its
    own: so each such group is parsed once, and each seed once more in the first cell that has
    it (a grid of 14 settings x 5 seeds parses 18 cells, not 70). A cell left out takes its
    group's parsed ``world_size``."""
    parser = defaults = None
    datasets: set[tuple[str, str, bool]] = set()
    packed = {id(c) for group in packs(cells, pack) if len(group) > 1 for c in group}
    parsed: dict[tuple, Cell] = {}  # the cell parsed for each group of seeds
    seeds: set[str] = set()
    for cell in cells:
        key, seed = _unseeded(cell), cli_value(cell.values.get("seed_everything"))
        if key in parsed and seed in seeds:
            cell.world_size = parsed[key].world_size
            continue
        try:
            if parser is None:
                # The first cell is also instantiated, which checks values such as batch_size:
                # a check, not a run, so without Lightning's lines of a run's start.
                with _without_lightning_info():
                    parser = NormBenchCLI(args=cell.args[1:], run=False).parser
            config = parser.parse_args(cell.args[1:])
            # The norm's options as the run will take them: a grid's norm keeps the base
            # config's options it takes (normbench.norm_args.keep_norm_options); any other is an error now.
            keep_norm_options(cell.args, config.model)
            check_options(config.model.norm, 1, dict(config.model.norm_kwargs or {}))
        except (ArgumentError, ValueError, TypeError) as err:
            given = ", ".join(f"{k}={cli_value(v)}" for k, v in cell.values.items())
            raise ValueError(
                f"sweep run {cell.name} ({given}): {one_line(err, DATA_MODULE_NAMES)}; "
                "fix the sweep's grid or overrides"
            ) from None
        seeds.add(seed)
        cell.world_size = world_size(config.trainer)
        data = config.data.init_args
        datasets.add((dataset_name(config.data.class_path), str(data.data_dir), bool(data.download)))
        if key in parsed:
            continue  # its group's settings are checked
        parsed[key] = cell
        if id(cell) in packed:
            if defaults is None:
                defaults = parser.get_defaults()
            check_packable(config, defaults, cell.name)
    for name, data_dir, download in sorted(datasets) if prepare else ():
        if name in DATAMODULES:
            DATAMODULES[name](data_dir=data_dir, download=download).prepare_data()


@contextmanager
def _without_lightning_info() -> Iterator[None]:
    """Lightning's INFO lines ("Seed set to 0", "GPU available: ...") held back; its warnings
    still shown."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _unseeded(cell: Cell) -> tuple:
    """The cell's grid values but its seed: what the runs of one pack share."""
    return tuple((k, cli_value(v)) for k, v in cell.values.items() if k != "seed_everything")


def packs(cells: list[Cell], enabled: bool) -> list[list[Cell]]:
    """The cells grouped into packs of runs that differ only in ``seed_everything`` (one cell
    per group when packing is off or the grid has no seed axis), in grid order."""
    if not enabled:
        return [[c] for c in cells]
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(_unseeded(cell), []).append(cell)
    return list(groups.values())
