"""TensorBoard's HPARAMS tab: the settings a run logs there, and the experiment summary that
decides which columns the tab shows.

The tab ticks the first five hyperparameters after a stable sort that puts those marked
``differs`` first (its frontend's ``_computeHParams``), the server having sorted them by
(not differs, name) (``backend_context._sort_and_reduce_to_hparams_limit``), and the first five
metrics in the experiment's order. It takes the experiment from a run whose events hold an
experiment summary (any one of them, when several do), or infers it from every run's session
start info when none does, and then lists every scalar tag as a metric. So:

- a finished run writes its session start and end info and its end-of-run figures
  (``hparams/...``) to an events file of its own (``*.hparams``); a run that is not part of a
  sweep also writes an experiment summary in which the experiment's variables (``RUN_AXES``)
  differ and the accuracies come first;
- a sweep writes one experiment summary at its logs' root (``write_sweep_experiment``) in which
  the settings that vary across its runs, its axes, differ; its runs write none of their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torch.utils.tensorboard.summary import scalar
from torch.utils.tensorboard.writer import FileWriter

from normbench.layout import batch_layout

# The run's figures, in the order the tab's metric columns take (the first five are shown).
METRICS = ("hparams/val_acc_best", "hparams/val_acc_final", "hparams/val_acc_batch_stats_final",
           "hparams/val_acc_precise_bn")  # fmt: skip
# A lone run's experiment variables: marked as differing, so the tab shows them first.
RUN_AXES = ("norm", "batch_size", "norm_batch", "seed", "dataset")
# Settings that follow from others (the batch layout; the per-device batch beside the global
# one): never a sweep's axis, though they vary with one.
DERIVED = ("layout/", "data/batch_size")
# Settings that say how a run was computed, not what it measures: left out of the tab.
NOT_HPARAMS = {"data_dir", "download", "num_workers", "in_memory", "eval_batch_size", "num_classes", "in_channels"}
RUN_SUFFIX = ".hparams"
SWEEP_SUFFIX = ".normbench-sweep"


def experiment_hparams(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any = None,
                       seed: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The settings of a run for the HPARAMS tab: the experiment's variables (norm and its
    options, the global batch size, the normalization batch where set, dataset, network, width,
    blocks, activation, learning rate, optimizer, seed), then the model's and the data's other
    settings and the batch layout. Internal keys (LightningCLI's ``_class_path`` and
    ``_instantiator``) and settings that do not change what is measured (``data_dir``, ...)
    are left out. A packed run gives its own ``datamodule`` and ``seed`` (its Trainer is the
    pack's, and this process's seed the last run's); a lone run's are the Trainer's and
    ``seed_everything``'s."""
    model = {k: v for k, v in dict(pl_module.hparams).items() if not k.startswith("_") and k not in NOT_HPARAMS}
    dm = datamodule or trainer.datamodule
    data = {k: v for k, v in dict(getattr(dm, "hparams", {})).items() if not k.startswith("_") and k not in NOT_HPARAMS}
    layout = batch_layout(trainer, pl_module, dm)
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    first: dict[str, Any] = {"norm": model.pop("norm", None)}
    first.update({f"norm/{k}": v for k, v in (model.pop("norm_kwargs", None) or {}).items()})
    first["batch_size"] = layout["global_batch_size"] or data.get("batch_size")
    norm_batch = model.pop("norm_batch", None)
    if norm_batch is not None:  # the normalization batch, where it is set apart from the batch
        first["norm_batch"] = norm_batch
    first["dataset"] = getattr(dm, "name", None)
    first.update({k: model.pop(k, None) for k in ("net", "width", "num_blocks", "activation")})
    first.update(lr=optimizer.param_groups[0]["lr"] if optimizer else None,
                 optimizer=type(optimizer).__name__ if optimizer else None, seed=run_seed() if seed is None else seed)  # fmt: skip
    return {
        **first,
        **{f"model/{k}": v for k, v in model.items()},
        **{f"data/{k}": v for k, v in data.items()},
        **{f"layout/{k}": v for k, v in layout.items()},
    }


def run_seed() -> int | None:
    """The seed ``seed_everything`` set for this process, or None."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


def _kind(value) -> tuple[str, Any]:
    """(the proto Value's field that is set, its value)."""
    kind = value.WhichOneof("kind")
    return kind, getattr(value, kind)


def experiment_summary(sessions: list[dict], metrics: Iterable[str], axes: Iterable[str]) -> Summary:
    """An HPARAMS experiment summary over runs' session start values (name -> proto Value, one
    dict per run): every setting any run has, in first-seen order, with its type and, for text
    and true/false settings, its values; ``axes`` marked as differing; ``metrics`` in order."""
    values: dict[str, list[tuple[str, Any]]] = {}
    for session in sessions:
        for name, value in session.items():
            values.setdefault(name, []).append(_kind(value))
    types = {"number_value": "DATA_TYPE_FLOAT64", "string_value": "DATA_TYPE_STRING", "bool_value": "DATA_TYPE_BOOL"}
    axes = set(axes)
    infos = []
    for name, seen in values.items():
        kinds = {k for k, _ in seen}
        kind = kinds.pop() if len(kinds) == 1 else "string_value"
        info = api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(types.get(kind, "DATA_TYPE_STRING")),
                                  differs=name in axes)  # fmt: skip
        if kind in ("string_value", "bool_value"):
            distinct = sorted({v if k == kind else str(v) for k, v in seen}, key=str)
            info.domain_discrete.extend(distinct)
        infos.append(info)
    experiment = api_pb2.Experiment(hparam_infos=infos,
                                    metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics])  # fmt: skip
    content = HParamsPluginData(experiment=experiment, version=metadata.PLUGIN_DATA_VERSION)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                  content=content.SerializeToString()))  # fmt: skip
    return Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=meta)])


def _ordered(metrics: Iterable[str]) -> list[str]:
    """``METRICS`` first, in their order, then any other figure by name."""
    present = set(metrics)
    return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


def write_run_hparams(log_dir: str | os.PathLike, hparams: dict[str, Any], metrics: dict[str, float],
                      in_sweep: bool) -> None:  # fmt: skip
    """Write a finished run's session start and end info and ``metrics`` (as ``hparams/<name>``
    scalars at step 0) to an events file of its own in ``log_dir``; outside a sweep also an
    experiment summary, ``RUN_AXES`` marked as differing."""
    figures = {f"hparams/{k}": v for k, v in metrics.items()}
    # As Lightning's TensorBoardLogger logs them: anything but a number, text or true/false as text.
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    _, start, end = hparams_summaries(hparams, figures)
    writer = FileWriter(str(log_dir), filename_suffix=RUN_SUFFIX)
    try:
        if not in_sweep:
            values = _session(start) or {}
            session = {k: values[k] for k in hparams if k in values}  # in the run's order, not the proto map's
            writer.add_summary(experiment_summary([session], _ordered(figures), [a for a in RUN_AXES if a in session]))
        writer.add_summary(start)
        writer.add_summary(end)
        for tag, value in figures.items():
            writer.add_summary(scalar(tag, value), 0)
    finally:
        writer.close()


def _session(summary: Summary) -> dict | None:
    """The session start values (name -> proto Value) a summary holds, or None."""
    for value in summary.value:
        if value.tag == metadata.SESSION_START_INFO_TAG:
            data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
            return dict(data.session_start_info.hparams)
    return None


def _read_run(run_dir: Path) -> tuple[dict | None, set[str]]:
    """(the run's session start values, its ``hparams/`` figures) from its ``*.hparams`` events."""
    session, figures = None, set()
    for path in sorted(run_dir.glob(f"events.out.tfevents.*{RUN_SUFFIX}")):
        for event in EventFileLoader(str(path)).Load():
            if not event.HasField("summary"):
                continue
            session = _session(event.summary) or session
            figures.update(v.tag for v in event.summary.value if v.tag.startswith("hparams/"))
    return session, figures


def sweep_axes(sessions: list[dict]) -> list[str]:
    """The settings whose values differ across ``sessions`` (two or more distinct values among
    the runs that have them), in first-seen order, ``DERIVED`` ones left out."""
    values: dict[str, set] = {}
    for session in sessions:
        for name, value in session.items():
            values.setdefault(name, set()).add(_kind(value))
    return [n for n, v in values.items() if len(v) > 1 and not n.startswith(DERIVED)]


def write_sweep_experiment(logs_root: str | os.PathLike, run_dirs: Iterable[str | os.PathLike]) -> list[str] | None:
    """Write the sweep's experiment summary at ``logs_root`` (the folder TensorBoard is pointed
    at), over the runs in ``run_dirs`` that logged their settings, replacing the one an earlier
    run of the sweep wrote; returns the axes marked as differing (None: no run had logged yet)."""
    sessions, figures = [], set()
    for run_dir in run_dirs:
        session, found = _read_run(Path(run_dir))
        if session is not None:
            sessions.append(session)
            figures |= found
    if not sessions:
        return None
    root = Path(logs_root)
    for old in root.glob(f"events.out.tfevents.*{SWEEP_SUFFIX}"):
        old.unlink()
    axes = sweep_axes(sessions)
    writer = FileWriter(str(root), filename_suffix=SWEEP_SUFFIX)
    try:
        writer.add_summary(experiment_summary(sessions, _ordered(figures), axes))
    finally:
        writer.close()
    return axes
