"""The report's view of run records: one ``Run`` per ``metrics.json``, read and never
rewritten; ``batch_size`` is the global batch with its layout (``BatchSize``)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from normbench.results import FINISHED, RECORD
from normbench.specs import SPECS, dataset_name

CONTEXT = ("dataset", "net", "activation", "num_blocks")
FP32 = "32-true"


def precision_name(value: object) -> str:
    """Lightning's name of a ``trainer.precision`` value (``32`` and ``"32"`` are ``32-true``,
    ``bf16`` is ``bf16-mixed``, ``16`` is ``16-mixed``); runs whose config has none are fp32."""
    text = FP32 if value is None else str(value)
    return {"32": FP32, "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}.get(text, text)


class BatchSize(int):
    """A run's global batch size (images per optimizer step) and the processes it was split
    over. It sorts and plots as the number, and equals only a batch size of the same layout, so
    that a batch of 8 made of 4 devices x 2 is never averaged with one device's 8 (or 2);
    written ``8 (4x2)``.

    Args:
        value: the global batch size.
        world_size: processes (devices x nodes).
    """

    world_size: int

    def __new__(cls, value: int, world_size: int = 1) -> BatchSize:  # noqa: PYI034 - Self needs Python 3.11
        obj = super().__new__(cls, value)
        obj.world_size = int(world_size or 1)
        return obj

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, int):
            return NotImplemented
        return int(self) == int(other) and self.world_size == getattr(other, "world_size", 1)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(int(self)) if self.world_size == 1 else hash((int(self), self.world_size))

    def __str__(self) -> str:
        if self.world_size == 1:
            return str(int(self))
        return f"{int(self)} ({self.world_size}x{int(self) // self.world_size})"

    __repr__ = __str__


def _batch_size(record: dict, per_device: int | None) -> BatchSize | None:
    """The record's global batch size with its layout; records before layouts were one device's."""
    layout = record.get("layout") or {}
    world = layout.get("world_size") or 1
    total = layout.get("global_batch_size") or (per_device * world if per_device else None)
    return None if total is None else BatchSize(total, world)


@dataclass
class Run:
    """What the report needs from one run record; ``batch_size`` is the global one."""

    path: str
    dataset: str
    # The norm, with the precision when it is not fp32 (``bn bf16-mixed``): a run in another
    # precision is another condition, in every table and verdict. ``norm_name``: the norm alone.
    norm: str
    batch_size: BatchSize | None
    seed: int | None
    net: str
    activation: str
    num_blocks: int | None
    val_split: float
    status: str
    best: float | None  # percent
    final: float | None
    curve: list[float] = field(default_factory=list)  # percent per epoch
    wall_time_s: float | None = None
    hardware: str | None = None
    max_steps: int | None = None  # set for runs measured in iterations (study 1), not epochs
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, percent) per validation
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss of that batch)
    # The end-of-run diagnostics (percent), on the same images as ``final`` when the run's
    # NormDiagnostics measured on the whole validation set (``eval_images: null``).
    batch_stats: float | None = None  # accuracy with the norms' batch statistics (train mode)
    precise_bn: float | None = None  # accuracy after PreciseBN recomputed the running statistics
    precise_bn_by_images: dict[int, float] = field(default_factory=dict)  # per PreciseBN image count
    diagnostics_images: int | None = None  # the validation images those two were measured on (None: all)
    mean_gap: float | None = None  # the last norm layer's |mu_B - mu_run| / sigma_run, last epoch
    std_ratio: float | None = None  # the last norm layer's sigma_B / sigma_run, last epoch
    grads: list[float] = field(default_factory=list)  # mean |gradient| per block, first to last
    precision: str = FP32  # trainer.precision, as Lightning names it
    norm_name: str = ""
    # The budget the run held and took (normbench.budget): its protocol as configured, and the
    # optimizer steps and learning rate its record says it trained with.
    # Images each norm statistic covered in training: model.norm_batch, else the batch size.
    norm_batch: int | None = None
    protocol: str = "study"
    budget: dict = field(default_factory=dict)
    steps: int | None = None
    lr: float | None = None
    num_classes: int | None = None  # the dataset's, None for a dataset normbench does not know

    @property
    def ok(self) -> bool:
        return self.status == FINISHED and self.best is not None

    @property
    def grad_first(self) -> float | None:
        """Mean |gradient| of the first block's conv weight over the last epoch."""
        return self.grads[0] if self.grads else None

    @property
    def grad_last(self) -> float | None:
        """Mean |gradient| of the last block's conv weight over the last epoch."""
        return self.grads[-1] if self.grads else None

    @property
    def grad_ratio(self) -> float | None:
        """The last block's gradient magnitude over the first's."""
        return self.grads[-1] / self.grads[0] if self.grads and self.grads[0] else None

    @property
    def chance(self) -> float | None:
        """Accuracy (percent) of guessing: 100 / the dataset's classes."""
        return 100.0 / self.num_classes if self.num_classes else None

    def points(self) -> tuple[str, list[int], list[float]]:
        """(unit, x, accuracy %) of the accuracy curve: per epoch (1, 2, ...), or per evaluation
        at its iteration for iteration runs (the untrained network at 0 left out)."""
        if self.iterations:
            kept = [(s, a) for s, a in self.evals if s > 0]
            return "iteration", [s for s, _ in kept], [a for _, a in kept]
        return "epoch", list(range(1, len(self.curve) + 1)), self.curve

    @property
    def iterations(self) -> bool:
        """A run measured in optimizer steps (``trainer.max_steps``), as study 1's are."""
        return self.max_steps is not None and self.max_steps > 0

    @property
    def across_batches(self) -> bool:
        """Whether the run's best accuracy compares across batch sizes as study 2's do: a run of
        epochs, or one held to the same optimizer steps as the others (``budget.protocol:
        steps``); not a study 1 run, whose iterations differ by batch size."""
        return not self.iterations or self.protocol == "steps"

    def context(self) -> tuple:
        return tuple(getattr(self, k) for k in CONTEXT)


def _diagnostics_images(diagnostics: dict) -> int | None:
    """The validation images the end-of-run diagnostics measured, None when that was all of them:
    as measured where the record says so (a subset as large as the set is all of it), else as
    asked (``eval_images``, None: all)."""
    measured = diagnostics.get("measured") or {}
    seen = measured.get("batch_stats_images", measured.get("precise_bn_val_images"))
    if seen is None:
        return diagnostics.get("eval_images")
    total = measured.get("val_images")
    if total:
        return None if seen >= total else seen
    return None if diagnostics.get("eval_images") is None else seen


def load_run(path: Path, record: dict | None = None) -> Run:
    """A ``Run`` from one record; failed runs fall back on their sweep cell's values.

    Args:
        path: the record's file.
        record: its content, when read already (None: read ``path``).
    """
    record = json.loads(path.read_text()) if record is None else record
    config = record.get("config") or {}
    model, data = config.get("model", {}), config.get("data", {})
    init = data.get("init_args", {})
    values = record.get("sweep", {}).get("values", {})

    def pick(config_value, *keys, default=None):
        if config_value is not None:
            return config_value
        return next((values[k] for k in keys if k in values), default)

    dataset = dataset_name(data.get("class_path", "")) if data else None
    dataset = pick(dataset, "dataset", default="?")
    if dataset not in SPECS and "data" in values:
        dataset = dataset_name(str(values["data"]))
    pct = lambda v: None if v is None else 100.0 * v
    end = (record.get("diagnostics") or {}).get("end_of_run") or {}
    gaps = end.get("batch_vs_running") or {}
    last_layer = gaps[list(gaps)[-1]] if gaps else {}  # in depth order: the last is the deepest
    norm = pick(model.get("norm"), "model.norm", default="?")
    precision = precision_name(pick((config.get("trainer") or {}).get("precision"), "trainer.precision"))
    batch_size = _batch_size(record, pick(init.get("batch_size"), "data.batch_size"))
    grouped = pick(model.get("norm_batch"), "model.norm_batch")
    # A norm batch inside the SGD batch is a condition of its own: ``bn nb4``; so are weight-
    # standardized convolutions (``gn+ws``) and the normalizer-free recipe (``nf``: no norm,
    # scaled weight standardization).
    label = norm if grouped is None or grouped == batch_size else f"{norm} nb{grouped}"
    ws = pick(model.get("weight_standardization"), "model.weight_standardization")
    if ws == "scaled":
        label = "nf" if norm == "none" else f"{label}+sws"
    elif ws is True:
        label = f"{label}+ws"
    return Run(
        path=str(path.parent),
        dataset=dataset,
        norm=label if precision == FP32 else f"{label} {precision}",
        norm_batch=grouped if grouped is not None else (None if batch_size is None else int(batch_size)),
        norm_name=norm,
        precision=precision,
        batch_size=batch_size,
        seed=pick(config.get("seed_everything"), "seed_everything"),
        net=pick(model.get("net"), "model.net", default="seed_cnn"),
        activation=pick(model.get("activation"), "model.activation", default="relu"),
        num_blocks=pick(model.get("num_blocks"), "model.num_blocks", default=4),
        val_split=init.get("val_split", 0.0) or 0.0,
        status=record.get("status", "unknown"),
        best=pct(record.get("val_acc_best")),
        final=pct(record.get("val_acc_final")),
        curve=[100.0 * e["val/acc"] for e in record.get("epochs", []) if "val/acc" in e],
        wall_time_s=record.get("wall_time_s"),
        hardware=record.get("hardware"),
        max_steps=(config.get("trainer") or {}).get("max_steps"),
        evals=[(e["step"], 100.0 * e["val/acc"]) for e in record.get("evals", []) if "val/acc" in e],
        losses=[(int(s), float(v)) for s, v in record.get("train_loss_steps", [])],
        batch_stats=pct(record.get("val_acc_batch_stats_final")),
        precise_bn=pct(record.get("val_acc_precise_bn")),
        precise_bn_by_images={
            int(k): 100.0 * v for k, v in ((record.get("diagnostics") or {}).get("precise_bn_by_images") or {}).items()
        },
        diagnostics_images=_diagnostics_images(record.get("diagnostics") or {}),
        mean_gap=last_layer.get("mean_gap"),
        std_ratio=last_layer.get("std_ratio"),
        grads=list(end.get("grad_per_block", [])),
        protocol=(config.get("budget") or {}).get("protocol") or "study",
        budget=dict(config.get("budget") or {}),
        steps=record.get("global_step"),
        lr=record.get("lr", _config_lr(model)),
        num_classes=SPECS[dataset].num_classes if dataset in SPECS else None,
    )


def paired_on_all_images(runs: list[Run], figure) -> list[Run]:
    """The runs whose ``figure`` (a NormDiagnostics accuracy) and running-statistics accuracy
    (``final``) are both known and were measured on the same images, the whole validation set:
    a figure from the first ``eval_images`` only is never paired with an accuracy on all."""
    return [r for r in runs if figure(r) is not None and r.final is not None and r.diagnostics_images is None]


def part_measured(runs: list[Run]) -> str:
    """The validation images the runs' diagnostics saw where that was part of the set, as a
    report says them (``512`` or ``512 or 1,024``); "" when every run's saw all of it."""
    return " or ".join(f"{k:,}" for k in sorted({r.diagnostics_images for r in runs if r.diagnostics_images}))


def tasks_apart(runs: list[Run]) -> list[Run]:
    """The runs with ``dataset`` naming the task a verdict compares within: the dataset, with the
    network after it (``cifar10_dilated_cnn``, as run directories name it) where the runs trained
    several networks on that dataset, so that no cell pools two networks' accuracies."""
    nets: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        nets[r.dataset].add(r.net)
    return [replace(r, dataset=f"{r.dataset}_{r.net}") if len(nets[r.dataset]) > 1 else r for r in runs]


def _config_lr(model: dict) -> float | None:
    """The optimizer's lr in a run's config, for records written before runs recorded it."""
    optimizer = model.get("optimizer")
    return (optimizer.get("init_args") or {}).get("lr") if isinstance(optimizer, dict) else None


@dataclass
class Unreadable:
    """A record file the report cannot read, and why (``not valid JSON (Expecting value: ...)``)."""

    path: str
    reason: str


def read_runs(paths: Iterable[str | Path]) -> tuple[list[Run], list[Unreadable]]:
    """Every run record under ``paths`` (sweep directories, run directories or record files),
    and apart from them the record files that cannot be read: a truncated or otherwise invalid
    JSON file, one that is not a JSON object or not a run record. One bad file loses no other.
    """
    files: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files.update(p.rglob(RECORD))
        else:
            raise FileNotFoundError(f"{p} does not exist; pass sweep or run directories")
    runs, unreadable = [], []
    for f in sorted(files):
        try:
            record = json.loads(f.read_text())
        except UnicodeDecodeError:
            unreadable.append(Unreadable(str(f), "not UTF-8 text"))
            continue
        except ValueError as err:  # json.JSONDecodeError: a truncated file among them
            unreadable.append(Unreadable(str(f), f"not valid JSON ({err})"))
            continue
        except OSError as err:
            unreadable.append(Unreadable(str(f), f"cannot be opened ({err.strerror or err})"))
            continue
        if not isinstance(record, dict):
            unreadable.append(Unreadable(str(f), f"not a run record: a JSON {type(record).__name__}, not an object"))
            continue
        try:
            runs.append(load_run(f, record))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            reason = f"not a run record as normbench writes it ({type(err).__name__}: {err})"
            unreadable.append(Unreadable(str(f), reason))
    return runs, unreadable


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run record under ``paths`` (``read_runs``); a record that cannot be read is an error
    that names its file."""
    runs, unreadable = read_runs(paths)
    if unreadable:
        raise ValueError(f"run record {unreadable[0].path} cannot be read: {unreadable[0].reason}")
    return runs
