"""TensorBoard's HPARAMS tab: what a run logs there, and the columns the tab shows by default,
computed by TensorBoard's own server code over the written events, with its frontend's rule
(hyperparameters: a stable sort putting those that differ first, the first five ticked; metrics:
the first five in the experiment's order)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from test_callbacks import run_args
from test_sweep import write_sweep

from normbench.main import main


def tab(logdir: Path) -> tuple[list[str], list[str], api_pb2.Experiment]:
    """(the hyperparameter columns ticked, the metric columns ticked, the experiment) as
    TensorBoard shows them for ``logdir``."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    context = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    request = api_pb2.GetExperimentRequest(experiment_name="", include_metrics=True)
    experiment = get_experiment.Handler(tb_context.RequestContext(), context, "", request).run()
    # The frontend (_computeHParams): a stable sort, differing first; the first five shown.
    infos = sorted(experiment.hparam_infos, key=lambda h: not h.differs)
    return [h.name for h in infos[:5]], [m.name.tag for m in experiment.metric_infos[:5]], experiment


def test_a_lone_run_shows_its_experiment_variables_and_accuracies_first(fake_data, tmp_path):
    main(run_args(fake_data, tmp_path, "gn", "--model.norm_kwargs", "{num_groups: 4}", "--seed_everything", "3"))
    hparams, metrics, _ = tab(tmp_path / "lightning_logs")
    # batch size, dataset, norm, seed (by name), then the first other setting by name.
    assert hparams == ["batch_size", "dataset", "norm", "seed", "activation"]
    assert metrics[:2] == ["hparams/val_acc_best", "hparams/val_acc_final"]


def test_a_sweeps_tab_shows_its_axes_and_accuracies_first(fake_data, tmp_path):
    grid = {"norm": {"bn": {"model.norm": "bn"}, "gn": {"model.norm": "gn", "model.norm_kwargs": {"num_groups": 4}}},
            "data.batch_size": [8, 16], "seed_everything": [0, 1]}  # fmt: skip
    config = write_sweep(tmp_path / "s.yaml", fake_data, grid)
    spec = yaml.safe_load(config.read_text())
    spec["overrides"].update(
        {"trainer.max_epochs": 1, "trainer.limit_train_batches": 1, "trainer.num_sanity_val_steps": 0, "model.width": 8}
    )  # 8 runs of one step, no sanity check, a narrow network
    config.write_text(yaml.safe_dump(spec))
    main(["sweep", "--config", str(config), "--output", str(tmp_path), "--workers", "1"])
    logs = tmp_path / "s" / "lightning_logs"
    hparams, metrics, experiment = tab(logs)
    # The grid's axes, and nothing that merely follows from them (the layout, the per-device
    # batch), are the ticked columns.
    assert hparams[:3] == ["batch_size", "norm", "seed"]
    assert [h.name for h in experiment.hparam_infos if h.differs] == ["batch_size", "norm", "seed"]
    assert metrics[:2] == ["hparams/val_acc_best", "hparams/val_acc_final"]
    # Every setting is still a column, gn's group count among them; the norm's values are listed.
    names = {h.name for h in experiment.hparam_infos}
    assert {"norm/num_groups", "layout/norm_stats_scope", "data/batch_size", "lr"} <= names
    norm = next(h for h in experiment.hparam_infos if h.name == "norm")
    assert list(norm.domain_discrete) == ["bn", "gn"]
    # One experiment summary in the whole log folder: the sweep's, at its root.
    holders = [run for run, tags in _hparams_tags(logs).items() if "_hparams_/experiment" in tags]
    assert holders == ["."]
    # A sweep run again over its finished runs writes its summary again, in place of the first.
    main(["sweep", "--config", str(config), "--output", str(tmp_path), "--workers", "1"])
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1 and tab(logs)[0] == hparams


def _hparams_tags(logdir: Path) -> dict[str, set[str]]:
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    return {run: set(tags) for run, tags in mux.PluginRunToTagToContent("hparams").items()}


def test_a_run_logs_its_settings_once_without_internal_keys(fake_data, tmp_path):
    main(run_args(fake_data, tmp_path, "gn", "--model.norm_kwargs", "{num_groups: 4}", "--seed_everything", "3"))
    run = tmp_path / "lightning_logs" / "mnist_gn_bs16" / "version_0"
    acc = EventAccumulator(str(run))
    acc.Reload()
    infos = values = None
    for content in acc.PluginTagToContent("hparams").values():
        data = HParamsPluginData.FromString(content)
        if data.HasField("experiment"):
            infos = [h.name for h in data.experiment.hparam_infos]
        if data.HasField("session_start_info"):
            values = {k: v.number_value if v.HasField("number_value") else v.string_value
                      for k, v in data.session_start_info.hparams.items()}  # fmt: skip
    assert infos[:10] == ["norm", "norm/num_groups", "batch_size", "dataset", "net", "width", "num_blocks",
                          "activation", "lr", "optimizer"]  # fmt: skip
    assert values["norm"] == "gn" and values["norm/num_groups"] == 4 and values["batch_size"] == 16
    assert values["dataset"] == "mnist" and values["lr"] == pytest.approx(1e-3) and values["seed"] == 3
    assert values["layout/global_batch_size"] == 16 and values["layout/norm_stats_scope"] == "per image"
    internal = [n for n in infos if n.split("/")[-1].startswith("_") or n.split("/")[-1] in ("data_dir", "download")]
    assert not internal, internal
    # hparams.yaml holds the same settings.
    saved = yaml.safe_load((run / "hparams.yaml").read_text())
    assert set(saved) == set(infos) and saved["norm/num_groups"] == 4 and saved["dataset"] == "mnist"
