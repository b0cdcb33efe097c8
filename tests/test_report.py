"""normbench report on synthetic run records: tables to the digit, and the studies' verdicts."""

from __future__ import annotations

import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from normbench.data import DATAMODULES
from normbench.main import main
from normbench.report import find_runs
from normbench.report.inference import p_text
from normbench.report.records import tasks_apart
from normbench.report.tables import Stat
from normbench.report.verdicts import CLAIMS, judge


def record(root: Path, dataset="cifar10", norm="bn", bs=2, seed=0, best=None, curve=None, status="finished",
           activation="relu", blocks=4, world=None, precision=None, budget=None, model=None, **extra) -> None:  # fmt: skip
    """One run record as RunRecorder writes it; ``best`` and ``curve`` in [0, 1]; ``world``: the
    processes of a run with a layout (``bs`` per device), None for a record from before layouts."""
    curve = curve if curve is not None else ([best] if best is not None else [])
    tag = "_".join(f"{k}{v}" for k, v in (model or {}).items())
    run = root / f"{dataset}_{norm}_bs{bs}_{activation}{blocks}_seed{seed}_w{world}_{precision}{tag}" / "version_0"
    run.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "model": {"norm": norm, "net": "seed_cnn", "activation": activation, "num_blocks": blocks},
        "data": {"class_path": f"normbench.data.{DATAMODULES[dataset].__name__}",
                 "init_args": {"batch_size": bs, "val_split": 0.0}},
    }  # fmt: skip
    if precision is not None:
        config["trainer"] = {"precision": precision}
    if budget is not None:
        config["budget"] = budget
    config["model"].update(model or {})
    # The budget as the study's protocol takes it: one epoch of 5,000 images, Adam 1e-3.
    rec = {"status": status, "config": config, "epochs": [{"epoch": i, "val/acc": a} for i, a in enumerate(curve)],
           "global_step": 5000 // (bs * (world or 1)), "lr": 1e-3}  # fmt: skip
    if status == "finished":
        rec.update(val_acc_best=max(curve), val_acc_final=curve[-1])
    if world is not None:
        rec["layout"] = {"devices": world, "num_nodes": 1, "world_size": world, "batch_size_per_device": bs,
                         "global_batch_size": bs * world}  # fmt: skip
    rec.update(extra)
    (run / "metrics.json").write_text(json.dumps(rec))


def test_a_report_over_an_earlier_one_leaves_none_of_its_figures_it_does_not_draw(tmp_path):
    # The first report draws curves at batch sizes 2 and 8, the second, of other runs, at 8
    # only: the figure at 2 was the first report's and goes; a file the user put there stays.
    for bs in (2, 8):
        for norm in ("bn", "gn"):
            record(tmp_path / "first", norm=norm, bs=bs, best=0.5, curve=[0.4, 0.5])
            if bs == 8:
                record(tmp_path / "second", norm=norm, bs=bs, best=0.6, curve=[0.5, 0.6])
    out = tmp_path / "rep"
    main(["report", str(tmp_path / "first"), "--out", str(out)])
    first = {p.name for p in out.glob("*.png")}
    assert {n for n in first if n.startswith("acc_vs_epoch")} == {
        "acc_vs_epoch_cifar10_seed_cnn_relu_4blocks_bs2.png", "acc_vs_epoch_cifar10_seed_cnn_relu_4blocks_bs8.png"
    }  # fmt: skip
    (out / "mine.png").write_bytes(b"the user's")
    (out / "notes.md").write_text("![mine](mine.png)")
    main(["report", str(tmp_path / "second"), "--out", str(out)])
    shown = set(re.findall(r"\]\(([^)]+\.png)\)", (out / "report.md").read_text()))
    assert {p.name for p in out.glob("*.png")} == shown | {"mine.png"}
    assert "acc_vs_epoch_cifar10_seed_cnn_relu_4blocks_bs2.png" in first - shown
    assert (out / "mine.png").read_bytes() == b"the user's" and (out / "notes.md").is_file()


def test_runs_on_several_devices_are_rows_of_their_global_batch_and_layout(tmp_path):
    # bs 2 on one device (with and without a layout in the record), bs 8 on one device, and
    # 4 devices x 2: three rows, never averaged together.
    record(tmp_path, bs=2, seed=0, best=0.50)
    record(tmp_path, bs=2, seed=1, best=0.60, world=1)
    record(tmp_path, bs=8, seed=0, best=0.70, world=1)
    record(tmp_path, bs=2, seed=0, best=0.90, world=4)
    record(tmp_path, norm="gn", bs=2, seed=0, best=0.40)
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| 2 | 2500 | 0.001 | 55.00 ± 7.07 (n=2) | 40.00 (n=1) |" in text
    assert "| 8 | 625 | 0.001 | 70.00 (n=1) | – |" in text
    assert "| 8 (4x2) | 625 | 0.001 | 90.00 (n=1) | – |" in text


def test_tables_to_the_digit(tmp_path):
    for seed, best in enumerate([0.50, 0.60, 0.70]):
        record(tmp_path, norm="bn", bs=2, seed=seed, best=best)
    for seed, best in enumerate([0.80, 0.82]):
        record(tmp_path, norm="gn", bs=2, seed=seed, best=best)
    record(tmp_path, norm="gn", bs=2, seed=2, status="failed")
    record(tmp_path, norm="bn", bs=128, seed=0, status="diverged")
    record(tmp_path, norm="gn", bs=128, seed=0, best=0.9012)
    record(tmp_path, norm="gn", bs=128, seed=1, status="interrupted")  # to be resumed: not a failure
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| batch size | steps | lr | bn | gn |" in text
    # mean and sample std: bn (50, 60, 70) -> 60 +- 10; gn (80, 82) -> 81 +- 1.41421...
    assert "| 2 | 2500 | 0.001 | 60.00 ± 10.00 (n=3) | 81.00 ± 1.41 (n=2, 1 failed) |" in text
    # Steps and lr of the finished runs only.
    assert (
        "| 128 | 39 | 0.001 | 1 diverged | 90.12 (n=1, 1 unfinished) |" in text
    )  # a diverged run is never shown as 0%
    assert "from 9 run records (1 diverged, 1 failed, 6 finished, 1 interrupted)" in text
    rows = {
        (r["norm"], r["batch_size"]): r
        for r in csv.DictReader((tmp_path / "rep" / "best_accuracy.csv").read_text().splitlines())
    }
    assert rows[("bn", "2")]["mean"] == "60.0000" and rows[("bn", "2")]["std"] == "10.0000"
    assert rows[("gn", "2")]["std"] == f"{statistics.stdev([80, 82]):.4f}" and rows[("gn", "2")]["failed"] == "1"
    assert (
        rows[("bn", "128")]["n"] == "0" and rows[("bn", "128")]["diverged"] == "1" and rows[("bn", "128")]["mean"] == ""
    )
    assert rows[("gn", "128")]["unfinished"] == "1" and rows[("gn", "128")]["failed"] == "0"
    assert list((tmp_path / "rep").glob("acc_vs_batch_size_*.png"))


def study(root: Path, gn_spread=1.0, brn_gain_large=0.0, sigmoid_slope=-2.0) -> None:
    """Synthetic runs of both studies, 3 seeds each (+-0.5 points around the mean)."""
    sizes = [2, 4, 8, 16, 32, 64, 128]
    bn = {2: 50.0, 4: 70.0, 8: 79.5, 16: 79.5, 32: 80.0, 64: 80.5, 128: 80.0}
    for seed, jitter in enumerate((-0.5, 0.0, 0.5)):
        for i, bs in enumerate(sizes):
            gn = 80.0 + gn_spread * i / (len(sizes) - 1)
            record(root, norm="gn", bs=bs, seed=seed, best=(gn + jitter) / 100)
            record(root, norm="bn", bs=bs, seed=seed, best=(bn[bs] + jitter) / 100)
        for ds, base in (("mnist", 98.0), ("cifar100", 40.0)):
            for bs in (2, 16, 128):
                gain = 5.0 if (ds, bs) == ("cifar100", 2) else brn_gain_large if bs == 128 else 0.0
                bn_curve = [base - 10 + jitter, base - 2 + jitter, base + jitter]
                record(root, ds, "bn", bs, seed, curve=[a / 100 for a in bn_curve])
                record(root, ds, "brn", bs, seed, curve=[(a + gain) / 100 for a in bn_curve])
                record(root, ds, "bnrs", bs, seed, curve=[(a - 20 + 5 * k) / 100 for k, a in enumerate(bn_curve)])
        for blocks in (1, 2, 4, 8):
            record(
                root,
                "fashion_mnist",
                "bn",
                128,
                seed,
                activation="relu",
                blocks=blocks,
                best=(70 + blocks + jitter) / 100,
            )
            record(root, "fashion_mnist", "bn", 128, seed, activation="sigmoid", blocks=blocks,
                   best=(70 + sigmoid_slope * blocks + jitter) / 100)  # fmt: skip


def test_the_report_loads_neither_torch_nor_lightning(tmp_path):
    # A report reads JSON records: numpy, scipy, statsmodels and matplotlib, not the fit's torch
    # and Lightning, which took most of its start. A fresh process, as `normbench report` runs.
    study(tmp_path / "runs")
    code = (
        "import sys; from normbench.main import main; main(['report', sys.argv[1], '--out', sys.argv[2]]); "
        "print(sorted(m for m in ('torch', 'torchvision', 'lightning') if m in sys.modules))"
    )
    args = [sys.executable, "-c", code, str(tmp_path / "runs"), str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert "BN needs a large enough batch size to perform well" in (tmp_path / "out" / "report.md").read_text()


def verdicts(root: Path) -> dict[str, tuple[str, str]]:
    runs = find_runs([root])
    return {claim.__name__: (v.verdict, v.evidence) for claim, v in zip(CLAIMS, judge(runs), strict=True)}


def _slope(points: dict[float, float]) -> float:
    return float(np.polyfit(list(points), list(points.values()), 1)[0])


def test_verdicts_when_the_studies_hold(tmp_path):
    study(tmp_path)
    v = verdicts(tmp_path)
    study3 = {"bn_depends_on_norm_batch", "batch_stats_beat_ema", "batch_free_matches_bn"}
    assert {verdict for k, (verdict, _) in v.items() if k in study3} == {"not enough data"}
    v = {k: x for k, x in v.items() if k not in study3}
    assert all(verdict == "supported" for verdict, _ in v.values()), v
    gn_means = {b: 80.0 + i / 6 for i, b in enumerate((2, 4, 8, 16, 32, 64, 128))}
    assert "cifar10: 80.00 (bs 2) to 81.00 (bs 128) over batch sizes 2–128" in v["gn_stable"][1]
    assert "TOST" in v["gn_stable"][1] and "intersection-union test over the 21 pairs" in v["gn_stable"][1]
    # The interaction: BN's slope on log2(batch size) minus GN's (equal seeds in every cell, so
    # the slope over runs is the slope over the cells' means).
    bn = {2: 50.0, 4: 70.0, 8: 79.5, 16: 79.5, 32: 80.0, 64: 80.5, 128: 80.0}
    by_hand = _slope({np.log2(b): m for b, m in bn.items()}) - _slope({np.log2(b): m for b, m in gn_means.items()})
    assert f"BN − GN per doubling of the batch size {by_hand:+.2f} points (95% CI" in v["bn_needs_batch"][1]
    assert "Welch contrast of the cells' gaps" in v["bn_needs_batch"][1] and "bs 2: -30.00" in v["bn_needs_batch"][1]
    # A fixed number of epochs: batch size 2 took 2,500 steps, 128 took 39.
    assert "optimizer steps differ 64-fold across these cells (39 to 2500)" in v["bn_needs_batch"][1]
    assert "at batch sizes 8, 16, 32, 64, 128" in v["bn_close_to_gn"][1] and "TOST" in v["bn_close_to_gn"][1]
    assert "hard task = cifar100" in v["brn_small_hard"][1] and "cifar100 bs 2: +5.00" in v["brn_small_hard"][1]
    assert "intersection-union test over the 6 cells" in v["brn_small_hard"][1]
    # Each run's mean accuracy over epochs 1-3 (trapezoids): bn's curve b-10, b-2, b gives b-3.5,
    # bnrs's b-30, b-17, b-10 gives b-18.5: 15 points less in every cell.
    assert "mean accuracy over epochs 1–3, bnrs − bn -15.00 points (95% CI" in v["bnrs_slower"][1]
    assert "intersection-union test over 6" in v["bnrs_slower"][1]
    relu = _slope({np.log2(b): 70 + b for b in (1, 2, 4, 8)})
    sigmoid = _slope({np.log2(b): 70 - 2 * b for b in (1, 2, 4, 8)})
    assert f"relu {relu:+.2f} points" in v["depth_activation"][1]
    assert f"sigmoid {sigmoid:+.2f} points" in v["depth_activation"][1]
    assert all("Holm-adjusted over the report's 6 tests" in e for _, e in v.values())


def test_the_report_command_says_each_verdict_of_its_report_where_it_was_typed(tmp_path, capsys):
    study(tmp_path, gn_spread=6.0)  # gn not stable: one claim not supported among supported ones
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out.splitlines()
    n = len(list(tmp_path.rglob("metrics.json")))
    assert out[0] == f"wrote {tmp_path / 'rep' / 'report.md'}; the studies' claims against these {n} runs:"
    said = [re.match(r"  (supported|not supported|inconclusive|not enough data) +(.+)$", line) for line in out[1:]]
    table = re.findall(r"^\| (.+?) \| \*\*(.+?)\*\* \|", (tmp_path / "rep" / "report.md").read_text(), re.MULTILINE)
    assert all(said) and sorted((m.group(2), m.group(1)) for m in said) == sorted(table) and len(table) == len(CLAIMS)
    verdicts_said = [m.group(1) for m in said]  # those with data before those without
    assert verdicts_said.index("not supported") < verdicts_said.index("not enough data")
    assert verdicts_said[-1] == "not enough data" and "supported" in verdicts_said


def test_verdicts_when_the_studies_fail(tmp_path):
    study(tmp_path, gn_spread=6.0, brn_gain_large=4.0, sigmoid_slope=0.5)
    v = verdicts(tmp_path)
    assert v["gn_stable"][0] == "not supported" and "80.00 (bs 2) to 86.00 (bs 128)" in v["gn_stable"][1]
    assert v["brn_small_hard"][0] == "not supported" and "mnist bs 128: +4.00" in v["brn_small_hard"][1]
    assert v["depth_activation"][0] == "not supported"


def test_brn_beats_bn_is_tested_against_its_margin(tmp_path):
    # BRN 1.4 points above BN at cifar100 bs 2 with a spread: above the 1-point margin, but not
    # shown to be (one-sided Welch against +1); everywhere else shown under the margin.
    for seed, jitter in enumerate((-0.3, 0.0, 0.3)):
        for ds, base in (("mnist", 98.0), ("cifar100", 40.0)):
            for bs in (2, 128):
                gain = 1.4 if (ds, bs) == ("cifar100", 2) else 0.0
                record(tmp_path, ds, "bn", bs, seed, best=(base + jitter) / 100)
                record(tmp_path, ds, "brn", bs, seed, best=(base + jitter + gain) / 100)
    from scipy import stats

    verdict, evidence = verdicts(tmp_path)["brn_small_hard"]
    bn = [39.7, 40.0, 40.3]
    brn = [a + 1.4 for a in bn]
    p = stats.ttest_ind(np.array(brn) - 1.0, bn, equal_var=False, alternative="greater").pvalue
    assert p > 0.05 and stats.ttest_ind(brn, bn, equal_var=False).pvalue < 0.05  # != 0 shown, > 1 not
    assert verdict == "not supported"
    assert "cifar100 bs 2: +1.40 points (90% CI" in evidence and f"of a difference > 1: p = {p_text(p)}" in evidence
    assert "mnist bs 2: +0.00 points (90% CI" in evidence and "of a difference < 1" in evidence


def _curve_record(root, norm, seed, evals):
    """A study-1 style run (iterations) of bn or bnrs at batch size 2 with ``evals`` {step: acc}."""
    run = root / f"mnist_bs2_{norm}_seed{seed}" / "version_0"
    run.mkdir(parents=True)
    config = {"seed_everything": seed, "trainer": {"max_steps": 2001},
              "model": {"norm": norm, "net": "dilated_cnn", "activation": "gelu", "num_blocks": 4},
              "data": {"class_path": "normbench.data.MNISTDataModule", "init_args": {"batch_size": 2}}}  # fmt: skip
    rec = {"status": "finished", "config": config, "epochs": [], "global_step": 2001,
           "evals": [{"step": s, "val/acc": a / 100} for s, a in evals.items()],
           "val_acc_best": max(evals.values()) / 100, "val_acc_final": evals[max(evals)] / 100}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(rec))


def test_bnrs_curves_are_compared_step_by_step_and_a_cell_that_did_not_learn_is_left_out(tmp_path):
    # BNRS ahead of BN at 500, both reach 95% of BN's best at 2000. One BN run lacks its
    # evaluation at 1000: averaged by position, its 2000 would sit at 1000 and BN would look faster.
    for seed, jitter in enumerate((-0.4, 0.0, 0.4)):
        bn = {500: 50.0, 1000: 70.0, 1500: 80.0, 2000: 96.0}
        if seed == 0:
            del bn[1000]
        _curve_record(tmp_path, "bn", seed, {s: a + jitter for s, a in bn.items()})
        _curve_record(tmp_path, "bnrs", seed, {s: a + jitter for s, a in {500: 60.0, 1000: 72.0, 1500: 82.0,
                                                                           2000: 95.5}.items()})  # fmt: skip
    verdict, evidence = verdicts(tmp_path)["bnrs_slower"]
    assert "95% of BN's best at iteration 2000 (bn) vs 2000 (bnrs)" in evidence

    # The steps every run has: 500, 1500, 2000 (trapezoids over 1500 iterations).
    def area(a, b, c):
        return (1000 * (a + b) / 2 + 500 * (b + c) / 2) / 1500

    diff = area(60.0, 82.0, 95.5) - area(50.0, 80.0, 96.0)
    assert verdict == "not supported" and f"iterations 500–2000, bnrs − bn {diff:+.2f} points" in evidence

    # BNRS at chance (10%, below 3x chance): no verdict from that cell.
    other = tmp_path / "chance"
    for seed, jitter in enumerate((-0.4, 0.0, 0.4)):
        _curve_record(other, "bn", seed, {500: 50.0 + jitter, 1000: 90.0 + jitter})
        _curve_record(other, "bnrs", seed, {500: 10.0 + jitter, 1000: 11.0 + jitter})
    verdict, evidence = verdicts(other)["bnrs_slower"]
    assert verdict == "inconclusive" and "bnrs mnist bs 2 (11.00%)" in evidence


def test_bn_needs_batch_fits_each_layout_apart(tmp_path):
    # bs 8 on one device and 4 x 2 on four: two fits, never one point for both.
    for seed, jitter in enumerate((-0.5, 0.0, 0.5)):
        for bs, bn_acc in ((2, 60.0), (8, 70.0), (32, 80.0)):
            record(tmp_path, norm="bn", bs=bs, seed=seed, best=(bn_acc + jitter) / 100, world=1)
            record(tmp_path, norm="gn", bs=bs, seed=seed, best=(78.0 + jitter) / 100, world=1)
        for per_device, bn_acc in ((2, 55.0), (8, 75.0)):
            record(tmp_path, norm="bn", bs=per_device, seed=seed, best=(bn_acc + jitter) / 100, world=4)
            record(tmp_path, norm="gn", bs=per_device, seed=seed, best=(78.0 + jitter) / 100, world=4)
    verdict, evidence = verdicts(tmp_path)["bn_needs_batch"]
    assert verdict == "supported"
    # One device: BN − GN -18, -8, +2 at log2 1, 3, 5: +5 per doubling; 4 processes: -23, -3 at 3, 5: +10.
    assert "cifar10: BN − GN per doubling of the batch size +5.00 points" in evidence and "n = 18 runs" in evidence
    assert "cifar10 on 4 processes: BN − GN per doubling of the batch size +10.00 points" in evidence
    assert "n = 12 runs" in evidence


def test_two_networks_on_one_dataset_are_two_tasks_never_one_cell(tmp_path):
    # Study 2's network and study 1's on CIFAR-10, each with BN 20 points below GN at batch size
    # 2 and level with it at 128, at accuracies 25 points apart. Pooled, each cell would mix
    # the two networks (a spread of 12.5 points) and hide the interaction; apart, each network's
    # fit shows it: BN − GN -20, -10, -1, 0 at log2 1, 3, 5, 7 per network.
    nets = {"seed_cnn": ({"net": "seed_cnn", "activation": "relu"}, 80.0),
            "dilated_cnn": ({"net": "dilated_cnn", "activation": "gelu"}, 55.0)}  # fmt: skip
    for seed, jitter in enumerate((-0.5, 0.0, 0.5)):
        for model, gn in nets.values():
            for bs, gap in ((2, -20.0), (8, -10.0), (32, -1.0), (128, 0.0)):
                record(tmp_path, norm="bn", bs=bs, seed=seed, best=(gn + gap + jitter) / 100, model=model)
                record(tmp_path, norm="gn", bs=bs, seed=seed, best=(gn + jitter) / 100, model=model)
    verdict, evidence = verdicts(tmp_path)["bn_needs_batch"]
    assert verdict == "supported", evidence
    slope = _slope({1: -20.0, 3: -10.0, 5: -1.0, 7: 0.0})
    for net in nets:
        assert f"cifar10_{net}: BN − GN per doubling of the batch size {slope:+.2f} points" in evidence
    assert evidence.count("n = 24 runs") == 2
    verdict, evidence = verdicts(tmp_path)["gn_stable"]
    assert "cifar10_seed_cnn: 80.00 (bs" in evidence and "cifar10_dilated_cnn: 55.00 (bs" in evidence
    # One network alone keeps the dataset's name.
    (tmp_path / "one").mkdir()
    record(tmp_path / "one", norm="gn", bs=2, best=0.8)
    record(tmp_path / "one", norm="bn", bs=2, best=0.7)
    assert [r.dataset for r in tasks_apart(find_runs([tmp_path / "one"]))] == ["cifar10", "cifar10"]


def test_no_significant_difference_is_not_equivalence(tmp_path):
    # GN spread 2 points over batch sizes (within the margin) but so noisy that its TOST cannot
    # show it: "stays stable" is not supported, although no difference is significant either.
    for seed, jitter in enumerate((-4.0, 0.0, 4.0)):
        for i, bs in enumerate((2, 16, 128)):
            record(tmp_path, norm="gn", bs=bs, seed=seed, best=(80.0 + i + jitter) / 100)
    verdict, evidence = verdicts(tmp_path)["gn_stable"]
    assert verdict == "not supported", evidence
    assert "TOST" in evidence


def test_verdicts_without_data_say_so(tmp_path):
    record(tmp_path, norm="bn", bs=2, best=0.5)
    assert {verdict for verdict, _ in verdicts(tmp_path).values()} == {"not enough data"}


def test_the_report_states_the_budget_its_runs_held_and_never_mixes_two(tmp_path, capsys):
    held = {"protocol": "steps", "steps": 300, "evaluations": 3}
    for bs in (2, 128):
        record(tmp_path / "steps", norm="bn", bs=bs, best=0.7, budget=held, global_step=300)
    for run in (tmp_path / "steps").glob("*/version_0/metrics.json"):  # as budget.protocol steps sets it
        rec = json.loads(run.read_text())
        rec["config"]["trainer"] = {"max_steps": 300}
        run.write_text(json.dumps(rec))
    main(["report", str(tmp_path / "steps"), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "Budget held (`budget.protocol: steps`): the same optimizer steps at every batch size (300 steps, 3 "
        "evaluations evenly spaced); the finished runs took 300 optimizer steps at learning rate 0.001"
    ) in text
    assert "| 2 | 300 | 0.001 | 70.00 (n=1) |" in text
    # Runs of equal steps compare across batch sizes: the accuracy-vs-batch-size plot has them.
    assert list((tmp_path / "rep").glob("acc_vs_batch_size_*.png"))
    record(tmp_path / "study", norm="bn", bs=2, best=0.7)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "steps"), str(tmp_path / "study"), "--out", str(tmp_path / "rep2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "several budgets (steps, study)" in err[0] and "report each sweep on its own" in err[0]


@pytest.mark.parametrize("holds", ["nothing", "a torn record"])
def test_report_refuses_a_folder_without_readable_records_in_one_line(tmp_path, capsys, holds):
    (tmp_path / "sweep" / "lightning_logs").mkdir(parents=True)
    if holds == "a torn record":
        record(tmp_path / "sweep" / "lightning_logs", best=0.5)
        torn = next((tmp_path / "sweep").rglob("metrics.json"))
        torn.write_text(torn.read_text()[:40])
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "sweep")])
    assert exit_info.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("normbench: error:")]
    assert str(tmp_path / "sweep") in line
    assert ("no run records (metrics.json) under" if holds == "nothing" else "no readable run record under") in line
    assert not (tmp_path / "sweep" / "report").exists()


def test_a_torn_record_is_named_and_the_report_made_from_the_others(tmp_path, capsys):
    # As the console script runs it (in this process): no error exit, a report of the good
    # records, the torn one named.
    for seed, best in enumerate([0.50, 0.60, 0.70]):
        record(tmp_path / "sweep", seed=seed, best=best)
    record(tmp_path / "sweep", seed=3, best=0.99)
    torn = next(tmp_path.glob("sweep/*seed3*/version_0/metrics.json"))
    torn.write_text(torn.read_text()[:100])  # as a copy cut short leaves it
    capsys.readouterr()
    main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "rep")])  # raises SystemExit on an error
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "cannot be read" in x]
    assert line.startswith(f"report: {torn} cannot be read, left out: not valid JSON (")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "from 3 run records (3 finished)" in text and "1 record file could not be read and is left out" in text
    assert f"## Record files that could not be read\n\n- `{torn}`: not valid JSON (" in text
    rows = list(csv.DictReader((tmp_path / "rep" / "best_accuracy.csv").open()))
    assert [(r["n"], r["mean"]) for r in rows] == [("3", "60.0000")]  # the torn 99% is in no mean


# --------------------------------------------------------------------------- study 1: per-iteration figures


def _study1_like_png(path: Path, curves: dict[str, list[float]], later: list[list[float]]) -> None:
    """A figure drawn as study 1's script draws it: loss left, accuracy right (subplots 121/122,
    tight_layout, 640x480), a line per norm in matplotlib's default colours, ylim 0.75-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure()
    plt.subplot(121)
    plt.plot([1.0, 0.5])
    plt.yscale("log")
    plt.subplot(122)
    for name, values in [*curves.items(), *((f"later{i}", v) for i, v in enumerate(later))]:
        plt.plot(values, label=name)
    plt.ylim(0.75, 1.0)
    plt.legend()
    plt.tight_layout()
    plt.savefig(path)
    plt.close()


def test_the_right_panels_frame_is_found_when_the_left_panels_spine_reaches_past_the_middle():
    # As matplotlib 3.10 lays out study 1's figure: the loss panel's right spine at column 323 of
    # 640, in the right half. Both frames and a tick label's stroke under the right frame drawn here.
    from normbench.report.reference import _right_panel_frame

    dark = np.zeros((480, 640), dtype=bool)
    for left, right in [(40, 323), (384, 625)]:
        dark[20:442, [left, right]] = True  # spines
        dark[[20, 441], left : right + 1] = True  # top and bottom
    dark[437:447, 371] = True  # the right panel's "0.75" label, left of its frame
    assert _right_panel_frame(dark, "fig.png") == (384, 625, 20, 441)
    dark[441, 500] = False  # a bottom spine with a gap is no frame
    with pytest.raises(ValueError, match="fig.png: no plot frame found in the right half"):
        _right_panel_frame(dark, "fig.png")


def test_reading_the_studys_figure_recovers_its_values(tmp_path):
    from normbench.report.reference import read_accuracy_panel

    g = __import__("random").Random(0)
    bn = [0.5, 0.9] + [0.95 + 0.03 * g.random() for _ in range(19)]  # a steep first segment, off the panel at 0
    bnrs = [0.6] * 11 + [0.78 + 0.01 * k for k in range(10)]  # below the panel for 10 points, then in
    brn = [0.3, 0.85] + [0.90 + 0.005 * k for k in range(19)]
    # A later line that covers brn exactly from point 8 on, as BRNC and BNWoS cover the study's lines.
    cover = [0.8] * 8 + brn[8:]
    _study1_like_png(tmp_path / "fig.png", {"bn": bn, "bnrs": bnrs, "brn": brn}, [cover])
    got = read_accuracy_panel(tmp_path / "fig.png", (0.75, 1.0))
    for k in range(1, 21):
        value, covered = got["bn"][k]
        # Point 1 joins a segment that leaves the panel, so it is extended from one side only,
        # where the x calibration's sub-pixel error times the slope (11 px per px) shows.
        assert value == pytest.approx(bn[k], abs=0.008 if k == 1 else 0.002) and not covered, k
    assert got["bn"][0] is None or got["bn"][0][0] < 0.75
    for k in range(12, 21):
        assert got["bnrs"][k][0] == pytest.approx(bnrs[k], abs=0.002), k
    assert all(v is None or v[0] == -float("inf") for v in got["bnrs"][:10])
    for k in range(2, 8):
        assert got["brn"][k] == (pytest.approx(brn[k], abs=0.002), False), k
    for k in range(9, 21):
        value, covered = got["brn"][k]
        assert covered and value == pytest.approx(brn[k], abs=0.003), k


def iteration_record(root: Path, norm: str, seed: int, evals: dict[int, float], bs: int = 2) -> None:
    """A study-1 run record: evaluations and losses by step, as RunRecorder writes them."""
    run = root / f"mnist_bs{bs}_{norm}_seed{seed}" / "version_0"
    run.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "trainer": {"max_steps": 10001, "val_check_interval": 500},
        "model": {"norm": norm, "net": "dilated_cnn", "activation": "gelu", "num_blocks": 4},
        "data": {"class_path": "normbench.data.MNISTDataModule", "init_args": {"batch_size": bs, "val_split": 0.0}},
    }
    rec = {
        "status": "finished", "config": config, "epochs": [],
        "evals": [{"step": s, "val/acc": a} for s, a in evals.items()],
        "train_loss_steps": [[s, 2.0 / (1 + s)] for s in range(0, 10001, 10)],
        "val_acc_best": max(evals.values()), "val_acc_final": evals[max(evals)],
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(rec))


def test_report_draws_study1_figures_and_names_the_differences(tmp_path):
    steps = range(0, 10001, 500)
    for seed, shift in enumerate([0.0, 0.02]):
        iteration_record(tmp_path, "bn", seed, {s: min(0.5 + s / 10000 + shift, 0.99) for s in steps})
        iteration_record(tmp_path, "bnrs", seed, {s: 0.2 + s / 20000 + shift for s in steps})
    ref = tmp_path / "ref"
    ref.mkdir()
    bn_ref = [0.5] + [0.80 + 0.009 * k for k in range(1, 21)]
    _study1_like_png(ref / "bs-2-dataset-MNIST.png", {"bn": bn_ref, "bnrs": [0.5] * 21}, [])
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep"), "--reference", str(ref)])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "study1_mnist_dilated_cnn_bs2.png").is_file()
    assert (tmp_path / "rep" / "reference_bs-2-dataset-MNIST.png").is_file()
    row = next(line for line in text.splitlines() if line.startswith("| bn |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    # Ours at 500: mean of 55 and 57 = 56.00, std 1.41; theirs at point 1: 80.9 (read to a pixel,
    # 0.07 points); difference -24.9. At 10,000: ours 99 in both seeds; theirs 80 + 0.9 * 20 = 98.0.
    for cell, ours, theirs in ((cells[0], "56.00 ± 1.41 (n=2)", 80.9), (cells[3], "99.00 ± 0.00 (n=2)", 98.0)):
        mine, read = cell.split(" / ")
        value, diff = read.rstrip(")").split(" (")
        assert mine == ours and float(value) == pytest.approx(theirs, abs=0.15)
        assert float(diff) == pytest.approx(float(ours.split()[0]) - float(value), abs=0.051)
    bnrs_row = next(line for line in text.splitlines() if line.startswith("| bnrs |"))
    assert "not visible" in bnrs_row  # the study's bnrs lies below its panel


# --------------------------------------------------------------------------- statistics and the why


def test_welch_and_hedges_g_equal_their_formulas():
    from scipy import stats

    from normbench.report.tables import Comparison, PairedComparison, Stat

    a, b = [70.0, 72.5, 71.0, 74.0], [65.0, 69.0, 66.5]
    c = Comparison(Stat(a), Stat(b))
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (ma - mb) / (va + vb) ** 0.5
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    assert c.t == pytest.approx(t) and c.p == pytest.approx(2 * stats.t.sf(abs(t), df))
    pooled = (((len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)) / 5) ** 0.5
    assert c.hedges_g == pytest.approx((ma - mb) / pooled * (1 - 3 / (4 * 7 - 9)))
    assert "Welch's t-test" in c.text() and f"p = {c.p:.3f}" in c.text()
    # The 95% interval of the difference: the Welch t quantile times the standard error.
    half = stats.t.ppf(0.975, df) * (va + vb) ** 0.5
    assert c.interval == pytest.approx((ma - mb - half, ma - mb + half))
    assert c.text().startswith(f"{ma - mb:+.2f} points (95% CI {ma - mb - half:+.2f} to {ma - mb + half:+.2f}), ")
    # Paired: the differences' mean over their standard error, n - 1 degrees of freedom.
    x, y = [80.0, 81.0, 79.5], [75.0, 77.0, 74.0]
    d = [u - v for u, v in zip(x, y)]
    t_rel = statistics.fmean(d) / (statistics.stdev(d) / 3**0.5)
    paired = PairedComparison(Stat(x), Stat(y))
    assert paired.t == pytest.approx(t_rel) and paired.p == pytest.approx(2 * stats.t.sf(t_rel, 2))
    half = stats.t.ppf(0.975, 2) * statistics.stdev(d) / 3**0.5
    assert paired.interval == pytest.approx((statistics.fmean(d) - half, statistics.fmean(d) + half))
    assert not Comparison(Stat([1.0]), Stat(b)).testable and "too few runs" in Comparison(Stat([1.0]), Stat(b)).text()


def test_cells_that_did_not_learn_are_marked_and_make_comparing_verdicts_inconclusive(tmp_path):
    # 10 classes: below 30% a cell did not learn. bn and gn at batch size 128 stay near chance.
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        for bs, bn, gn in ((2, 0.50, 0.80), (16, 0.79, 0.80), (128, 0.12, 0.14)):
            record(tmp_path, norm="bn", bs=bs, seed=seed, best=bn + jitter)
            record(tmp_path, norm="gn", bs=bs, seed=seed, best=gn + jitter)
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| 128 | 39 | 0.001 | 12.00 ± 1.00 (n=3, not learned) | 14.00 ± 1.00 (n=3, not learned) |" in text
    assert "| 2 | 2500 | 0.001 | 50.00 ± 1.00 (n=3) |" in text
    v = verdicts(tmp_path)
    # A cell that did not learn feeds no verdict: gn at 2 and 16 are two batch sizes, too few to
    # call GN stable; the BN-vs-GN tests run on 2 and 16 and say that 128 was left out.
    assert v["gn_stable"][0] == "inconclusive" and "bs 128" in v["gn_stable"][1]
    for claim in ("bn_needs_batch", "bn_close_to_gn"):
        assert v[claim][0] in ("supported", "not supported"), (claim, v[claim])
        assert (
            "left out, did not learn (below 3x chance): bn cifar10 bs 128 (12.00%), gn cifar10 bs 128 (14.00%)"
            in v[claim][1]
        )
        assert "bs 128:" not in v[claim][1].split("; left out")[0]
    rows = list(csv.DictReader((tmp_path / "rep" / "best_accuracy.csv").read_text().splitlines()))
    assert {(r["batch_size"], r["learned"]) for r in rows} == {("2", "true"), ("16", "true"), ("128", "false")}


def depth_records(root: Path, accuracy: dict[int, tuple[float, float]]) -> None:
    """Study 2's depth runs on Fashion-MNIST at batch size 128: blocks -> (relu, sigmoid) best
    accuracy in percent, for 3 seeds spread by -0.5, 0 and +0.5 points."""
    for seed, jitter in enumerate((-0.5, 0.0, 0.5)):
        for blocks, by_activation in accuracy.items():
            for activation, best in zip(("relu", "sigmoid"), by_activation, strict=True):
                record(root, "fashion_mnist", "bn", 128, seed, activation=activation, blocks=blocks,
                       best=(best + jitter) / 100)  # fmt: skip


def test_deep_sigmoid_networks_that_do_not_learn_still_feed_the_depth_verdict(tmp_path):
    depth_records(tmp_path, {1: (60.0, 50.0), 2: (65.0, 40.0), 4: (70.0, 20.0), 8: (75.0, 10.0)})
    verdict, evidence = verdicts(tmp_path)["depth_activation"]
    assert verdict == "supported"
    assert "did not learn" in evidence and "sigmoid 4 blocks (20.00%)" in evidence and "sigmoid 8 blocks" in evidence
    # 8 blocks against 1, sigmoid: 10 - 50 = -40 points, Welch's t-test over the 3 seeds.
    assert "sigmoid 8 − 1 blocks: -40.00 points (95% CI " in evidence and "), Welch's t-test" in evidence


def test_shallow_sigmoid_networks_that_did_not_learn_make_the_depth_verdict_inconclusive(tmp_path):
    # At too small a scale the 1- and 2-block sigmoid networks never learn: their "loss" with
    # depth is no evidence either way, whatever the deeper ones do.
    depth_records(tmp_path, {1: (52.0, 22.0), 2: (65.0, 28.0), 4: (75.0, 38.0), 8: (76.0, 35.0)})
    verdict, evidence = verdicts(tmp_path)["depth_activation"]
    assert verdict == "inconclusive", evidence
    assert "sigmoid 1 blocks (22.00%), sigmoid 2 blocks (28.00%) did not learn" in evidence
    assert "what the claim predicts" not in evidence


def _diagnosed(root, norm, bs, seed, final, batch_stats=None, precise=None, gap=None, ratio=None, grads=None,
               diagnostics=None, **kw):  # fmt: skip
    end = {}
    if gap is not None:
        end["batch_vs_running"] = {"blocks.0.norm": {"mean_gap": 9.0, "std_ratio": 9.0},
                                   "blocks.3.norm": {"mean_gap": gap, "std_ratio": ratio}}  # fmt: skip
    if grads is not None:
        end["grad_per_block"] = grads
    extra = {"diagnostics": {"eval_images": None, "end_of_run": end, **(diagnostics or {})}}
    if batch_stats is not None:
        extra.update(val_acc_batch_stats_final=batch_stats, val_acc_precise_bn=precise)
    record(root, norm=norm, bs=bs, seed=seed, best=final, **kw, **extra)


def test_the_why_section_states_what_precise_bn_recovers_with_the_last_layers_figures(tmp_path):
    # At batch size 2, BN loses 10 points to GN and PreciseBN recovers 8 of them (paired
    # differences 8.2, 7.7, 8.1: significant): stale running statistics. At 128 BN loses 10 and
    # PreciseBN recovers 1, after which BN still trails GN by 9 (Welch): the network is worse.
    for seed, j, k in ((0, -0.01, 0.002), (1, 0.0, -0.003), (2, 0.01, 0.001)):
        _diagnosed(tmp_path, "bn", 2, seed, 0.60 + j, batch_stats=0.66 + j, precise=0.68 + j + k, gap=0.5 + j,
                   ratio=0.8)  # fmt: skip
        _diagnosed(tmp_path, "gn", 2, seed, 0.70 + j)
        _diagnosed(tmp_path, "bn", 128, seed, 0.60 + j, batch_stats=0.61, precise=0.61 + j, gap=0.05, ratio=1.0 + j)
        _diagnosed(tmp_path, "gn", 128, seed, 0.70 + 2 * j)
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    why = text.split("## Why", 1)[1]
    # The last layer's figures (blocks.3.norm), not the first's.
    assert (
        f"| 2 | bn | 60.00 ± 1.00 (n=3) | 66.00 ± 1.00 (n=3) | 68.00 ± {statistics.stdev([67.2, 67.7, 69.1]):.2f} (n=3) "
        "| 0.500 ± 0.010 (n=3) | 0.800 ± 0.000 (n=3) |" in why
    )
    assert "| 2 | gn | 70.00 ± 1.00 (n=3) | – | – | – | – |" in why
    assert "at batch size 2, BN is behind GN by 10.00 points" in why
    at2, at128 = (line for line in why.splitlines() if line.startswith("- at batch size "))
    t = stats.ttest_rel([67.2, 67.7, 69.1], [59.0, 60.0, 61.0])
    assert "PreciseBN recovers +8.00 points of them (+8.00 points (95% CI " in at2
    assert f"), paired t-test t = {t.statistic:.2f}" in at2
    assert "stale running statistics cost that much" in at2 and "is worse" not in at2
    gap = stats.ttest_ind([60.0, 61.0, 62.0], [68.0, 70.0, 72.0], equal_var=False)
    assert "at batch size 128, BN is behind GN by 10.00 points" in at128 and "stale" not in at128
    assert "after PreciseBN BN still trails GN (BN − GN -9.00 points (95% CI " in at128
    assert f"), Welch's t-test t = {gap.statistic:.2f}" in at128
    assert "the network it trained on noisy batch statistics is worse" in at128
    assert "lay 0.500 running standard deviations from the running mean, with a std ratio of 0.800" in why
    assert (tmp_path / "rep" / "study2_beside_the_study.png").is_file()


def test_the_why_section_names_no_cause_its_tests_do_not_show_and_pairs_run_by_run(tmp_path):
    # BN 10 points behind GN; PreciseBN's gain, run by run, is +9, -1, +7 (its third run, seed 3,
    # has no PreciseBN figure and is left out of the pairs, not paired with another run's), so
    # neither the gain (paired) nor BN's remaining gap to GN (Welch) is significant at n = 3.
    for seed, final, precise in ((0, 0.60, 0.69), (1, 0.61, 0.60), (2, 0.59, 0.66), (3, 0.60, None)):
        _diagnosed(tmp_path, "bn", 8, seed, final, batch_stats=0.65 if precise else None, precise=precise)
    for seed, j in enumerate((-0.01, 0.0, 0.01, 0.0)):
        _diagnosed(tmp_path, "gn", 8, seed, 0.70 + j)
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    (line,) = [
        s for s in (tmp_path / "rep" / "report.md").read_text().splitlines() if s.startswith("- at batch size 8")
    ]
    t = stats.ttest_rel([69.0, 60.0, 66.0], [60.0, 61.0, 59.0])
    assert "PreciseBN changes BN's accuracy by +5.00 points (95% CI " in line
    assert f"), paired t-test t = {t.statistic:.2f}" in line
    assert "n = 3, Cohen" in line and "what cost BN its points cannot be told" in line
    assert "stale" not in line and "is worse" not in line
    assert "not corrected for the section's many" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize(
    ("diagnostics", "said"),
    [
        # Asked for 500 of a 2,000-image set, measured on 512 (whole batches of 32): a part.
        ({"eval_images": 500, "measured": {"batch_stats_images": 512, "val_images": 2000}}, "first 512 validation"),
        # Asked for 500 of a 500-image set: all of it, nothing to compare with care.
        ({"eval_images": 500, "measured": {"batch_stats_images": 500, "val_images": 500}}, None),
        ({"eval_images": None, "measured": {"batch_stats_images": 2000, "val_images": 2000}}, None),
        # A record from before the set's size was recorded: as asked.
        ({"eval_images": 500, "measured": {"batch_stats_images": 512}}, "first 512 validation"),
        ({"eval_images": 1500}, "first 1,500 validation"),
    ],
)
def test_the_why_section_says_when_the_diagnostics_saw_part_of_the_validation_set(tmp_path, diagnostics, said):
    for seed in range(2):
        _diagnosed(tmp_path, "bn", 8, seed, 0.6, batch_stats=0.62, precise=0.63, diagnostics=diagnostics)
        _diagnosed(tmp_path, "gn", 8, seed, 0.7)
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    why = (tmp_path / "rep" / "report.md").read_text().split("## Why", 1)[1].split("\n## ", 1)[0]
    notes = [line for line in why.splitlines() if line.startswith("(The batch-statistics and PreciseBN")]
    if said is None:
        assert notes == [], notes
    else:
        assert len(notes) == 1 and f"are on the {said} images, the running-statistics one on all" in notes[0], notes


def test_the_gradient_section_gives_first_last_and_their_ratio_against_depth(tmp_path):
    for seed, j in enumerate((0.0, 0.002)):
        for blocks in (1, 4):
            grads = [0.01 + j] + [0.005] * (blocks - 2) + [0.002 + j] if blocks > 1 else [0.01 + j]
            _diagnosed(tmp_path, "bn", 128, seed, 0.7, grads=grads, activation="sigmoid", blocks=blocks)
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    section = (tmp_path / "rep" / "report.md").read_text().split("## Gradient magnitude per block against depth", 1)[1]
    ratio = statistics.fmean([0.002 / 0.01, 0.004 / 0.012])
    assert (
        f"| sigmoid | 4 | 70.00 ± 0.00 (n=2) | 0.01100 ± 0.00141 (n=2) | 0.00300 ± 0.00141 (n=2) | {ratio:.3f}"
        in section
    )
    assert (
        "| sigmoid | 1 | 70.00 ± 0.00 (n=2) | 0.01100 ± 0.00141 (n=2) | 0.01100 ± 0.00141 (n=2) | 1.000 ± 0.000"
        in section
    )
    assert "0.0124 → 0.0039 (ReLU)" in section


def test_runs_in_bf16_are_their_own_condition_and_compared_with_fp32_by_welch(tmp_path):
    from scipy import stats

    fp32, bf16 = [0.70, 0.72, 0.745], [0.69, 0.735, 0.71]
    for seed, (a, b) in enumerate(zip(fp32, bf16)):
        record(tmp_path, norm="bn", bs=2, seed=seed, best=a, precision=32 if seed == 0 else "32-true")
        record(tmp_path, norm="bn", bs=2, seed=seed, best=b, precision="bf16-mixed")
        record(tmp_path, norm="gn", bs=2, seed=seed, best=0.60 + 0.01 * seed)  # no precision in its config: fp32
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    # Never averaged with fp32: a column of its own in the accuracy table ...
    assert "| batch size | steps | lr | bn | bn bf16-mixed | gn |" in text
    assert (
        f"| 2 | 2500 | 0.001 | {100 * statistics.fmean(fp32):.2f} ± {100 * statistics.stdev(fp32):.2f} (n=3) |" in text
    )
    # ... and a row of the precision table: the difference and Welch's test, by hand.
    a, b = [100 * v for v in bf16], [100 * v for v in fp32]
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 3
    t = (statistics.fmean(a) - statistics.fmean(b)) / (va + vb) ** 0.5
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    p = 2 * stats.t.sf(abs(t), df)
    row = next(line for line in text.splitlines() if line.startswith("| 2 | bn |"))
    half = stats.t.ppf(0.975, df) * (va + vb) ** 0.5
    diff = statistics.fmean(a) - statistics.fmean(b)
    assert f"{diff:+.2f} points (95% CI {diff - half:+.2f} to {diff + half:+.2f}), Welch's t-test t = {t:.2f}" in row
    assert f"p = {p:.3f}" in row
    assert "| batch size | norm | 32-true (%) | bf16-mixed (%) | bf16-mixed − 32-true |" in text
    assert not any(line.startswith("| 2 | gn |") for line in text.splitlines())  # gn ran in fp32 only


STUDY2_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "study2" / "README.md"


def test_the_overlay_holds_the_studys_whole_table(tmp_path, monkeypatch):
    from normbench.report import figures

    # The study's 7-row table as its reference page prints it, against the figure's numbers.
    if not STUDY2_REFERENCE.is_file():
        pytest.skip(f"the study's reference page is not at {STUDY2_REFERENCE}")
    rows = [line.split("|")[1:4] for line in STUDY2_REFERENCE.read_text().splitlines()
            if line.startswith("| ") and "±" in line]  # fmt: skip
    table = {"bn": {}, "gn": {}}
    for bs, bn, gn in rows:
        for norm, cell in (("bn", bn), ("gn", gn)):
            mean, std = (float(x) for x in cell.split("±"))
            table[norm][int(bs)] = (mean, std)
    assert figures.STUDY2_CIFAR10 == table and sorted(table["bn"]) == [2, 4, 8, 16, 32, 64, 128]
    # And the figure draws every one of them: 7 points a norm on the study's axis.
    import matplotlib.axes

    drawn = []

    original = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label", ""), list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    for seed in range(2):
        for bs in (2, 128):
            record(tmp_path, norm="bn", bs=bs, seed=seed, best=0.7 + 0.01 * seed)
            record(tmp_path, norm="gn", bs=bs, seed=seed, best=0.6 + 0.01 * seed)
    assert figures.study2_figure(find_runs([tmp_path]), tmp_path) == "study2_beside_the_study.png"
    theirs = {label.split(",")[0]: (x, y) for label, x, y in drawn if "the study" in label}
    for norm in ("bn", "gn"):
        assert theirs[norm] == ([2, 4, 8, 16, 32, 64, 128], [m for _, (m, _) in sorted(table[norm].items())])


def test_a_norm_batch_is_a_condition_of_its_own_and_a_column(tmp_path):
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        record(tmp_path, norm="bn", bs=128, seed=seed, best=0.70 + jitter)
        record(tmp_path / "nb4", norm="bn", bs=128, seed=seed, best=0.60 + jitter)
    # The second set names its norm batch in its config, as a run of model.norm_batch does.
    for run in (tmp_path / "nb4").glob("*/version_0/metrics.json"):
        rec = json.loads(run.read_text())
        rec["config"]["model"]["norm_batch"] = 4
        run.write_text(json.dumps(rec))
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| batch size | steps | lr | bn | bn nb4 |" in text
    assert "| 128 | 39 | 0.001 | 70.00 ± 1.00 (n=3) | 60.00 ± 1.00 (n=3) |" in text
    rows = {r["norm"]: r for r in csv.DictReader((tmp_path / "rep" / "best_accuracy.csv").read_text().splitlines())}
    assert rows["bn"]["norm_batch"] == "128" and rows["bn nb4"]["norm_batch"] == "4"


def study3_records(root: Path, measured: dict | None = None) -> dict[int, list[float]]:
    """bn at normalization batches 2 to 64 of an SGD batch of 64, 3 seeds, and controls; returns
    bn's best accuracies by normalization batch. ``measured``: the diagnostics' images, as a
    record states them (None: nothing stated, read as all)."""
    bn = {}
    for nb, base in ((2, 70.0), (4, 74.0), (8, 77.0), (16, 79.0), (32, 80.0), (64, 80.5)):
        bn[nb] = []
        for seed, jitter in enumerate((-0.4, 0.1, 0.3)):
            best = base + jitter
            bn[nb].append(best)
            # Batch statistics beat the running ones by 6 points at 2, by nothing from 16 on.
            lift = {2: 6.0, 4: 3.0, 8: 1.0}.get(nb, 0.0) + 0.2 * seed
            # PreciseBN from 256 images recovers half of what batch statistics gain, from 4,096 all of it.
            precise = {"256": (best + lift / 2) / 100, "4096": (best + lift + 0.1 * seed) / 100}
            record(root, norm="bn", bs=64, seed=seed, best=best / 100, model={"norm_batch": nb} if nb < 64 else None,
                   val_acc_batch_stats_final=(best + lift) / 100,
                   diagnostics={"precise_bn_by_images": precise, **(measured or {})})  # fmt: skip
    for seed, jitter in enumerate((-0.3, 0.0, 0.4)):
        record(root, norm="gn", bs=64, seed=seed, best=(80.0 + jitter) / 100)
        record(root, norm="dyt", bs=64, seed=seed, best=(72.0 + jitter) / 100)
    return bn


def test_study3_verdicts_from_records(tmp_path):
    from scipy import stats

    bn = study3_records(tmp_path)
    v = verdicts(tmp_path)
    verdict, evidence = v["bn_depends_on_norm_batch"]
    x = [np.log2(nb) for nb, accs in bn.items() for _ in accs]
    y = [a for accs in bn.values() for a in accs]
    ref = stats.linregress(x, y)
    assert verdict == "supported" and f"normalization batch {ref.slope:+.2f} points" in evidence
    verdict, evidence = v["batch_stats_beat_ema"]
    # At normalization batch 2: the paired differences 6.0, 6.2, 6.4 (final = best: one evaluation).
    t = stats.ttest_rel([b + 6.0 + 0.2 * s for s, b in enumerate(bn[2])], bn[2])
    assert (
        verdict == "supported"
        and "normalization batch 2: +6.20 points (95% CI " in evidence
        and f"), paired t-test t = {t.statistic:.2f}" in evidence
    )
    verdict, evidence = v["batch_free_matches_bn"]
    # BN's best cell is normalization batch 64 (80.5); gn (80.03) is within 3 points, dyt is not.
    gap = statistics.fmean([80.0 - 0.3, 80.0, 80.0 + 0.4]) - statistics.fmean(bn[64])
    assert verdict == "supported", evidence
    assert f"gn − bn at normalization batch 64 (BN's best): {gap:+.2f} points" in evidence and "dyt − bn" in evidence
    rows = {r["norm"]: r for r in csv.DictReader(_report_csv(tmp_path).splitlines())}
    assert rows["bn nb2"]["norm_batch"] == "2" and rows["bn"]["norm_batch"] == "64" and rows["gn"]["norm_batch"] == "64"


def test_batch_statistics_on_part_of_the_validation_set_are_not_paired_with_running_ones_on_all(tmp_path):
    # NormDiagnostics' default measures on the first 500 images; the running-statistics accuracy
    # is on the whole set. A paired test of the two would compare different images: none is made.
    study3_records(tmp_path, {"eval_images": 500, "measured": {"batch_stats_images": 512, "val_images": 2000}})
    verdict, evidence = verdicts(tmp_path)["batch_stats_beat_ema"]
    assert verdict == "not enough data", evidence
    assert "measured on the whole validation set" in evidence and "18 runs" in evidence
    assert "first 512 validation images" in evidence
    # The evaluation table shows the figures, and no paired difference for them either.
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    table = (tmp_path / "rep" / "report.md").read_text().split("| normalization batch", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and ", p = " not in rows[0]
    assert rows[0].count("on the first 512 images, not paired with EMA") == 3  # batch statistics, PreciseBN x 2


def test_a_batch_free_layer_must_match_bn_in_every_context(tmp_path):
    # SGD batch 64: gn matches BN's best (study3_records). SGD batch 32: bn at normalization
    # batches 4 and 32 near 80%, gn at 50%: no control matches there, so the claim, which is
    # about BN wherever it was run, is not supported (p of the worse context).
    study3_records(tmp_path)
    for seed, jitter in enumerate((-0.4, 0.1, 0.3)):
        for nb, base in ((4, 76.0), (32, 80.0)):
            record(tmp_path, norm="bn", bs=32, seed=seed, best=(base + jitter) / 100,
                   model={"norm_batch": nb} if nb < 32 else None)  # fmt: skip
        record(tmp_path, norm="gn", bs=32, seed=seed, best=(50.0 + jitter) / 100)
    verdict, evidence = verdicts(tmp_path)["batch_free_matches_bn"]
    assert verdict == "not supported", evidence
    assert "cifar10 bs 32, any of 1: Bonferroni p = 1.000" in evidence
    assert "cifar10 bs 64, any of 2: Bonferroni p = " in evidence
    assert "in every context (intersection-union over 2): p = 1.000" in evidence


def test_study3_leaves_out_cells_that_did_not_learn_and_bn_with_weight_standardization(tmp_path):
    bn = study3_records(tmp_path)
    for seed, jitter in enumerate((-0.4, 0.1, 0.3)):
        # bn at normalization batch 1 at chance, and weight-standardized bn: neither is BN's cell.
        record(tmp_path, norm="bn", bs=64, seed=seed, best=(10.0 + jitter) / 100, model={"norm_batch": 1},
               val_acc_batch_stats_final=(10.0 + jitter) / 100)  # fmt: skip
        record(
            tmp_path, norm="bn", bs=64, seed=seed, best=(99.0 + jitter) / 100, model={"weight_standardization": True}
        )
    v = verdicts(tmp_path)
    verdict, evidence = v["bn_depends_on_norm_batch"]
    from scipy import stats

    ref = stats.linregress([np.log2(nb) for nb, a in bn.items() for _ in a], [x for a in bn.values() for x in a])
    assert f"normalization batch {ref.slope:+.2f} points" in evidence  # the same fit: neither cell in it
    assert "left out, did not learn (below 3x chance): cifar10 SGD batch 64 normalization batch 1 (10.00%)" in evidence
    verdict, evidence = v["batch_stats_beat_ema"]
    assert "normalization batch 1:" not in evidence and "normalization batch 2, p =" in evidence
    assert verdict == "supported"
    verdict, evidence = v["batch_free_matches_bn"]
    assert "at normalization batch 64 (BN's best)" in evidence  # not bn+ws at 99%
    assert verdict == "supported"  # gn within 3 points of 80.5, not of bn+ws's 99


def test_batch_stats_beat_ema_tests_the_smallest_normalization_batch_of_every_context(tmp_path):
    study3_records(tmp_path)
    # The same claim on mnist, where batch statistics lose at normalization batch 4.
    for seed, jitter in enumerate((-0.4, 0.1, 0.3)):
        for nb, lift in ((4, -2.0 - 0.3 * seed), (16, 0.5 + 0.1 * seed)):
            record(tmp_path, "mnist", "bn", 16, seed, best=(90.0 + jitter) / 100, model={"norm_batch": nb},
                   val_acc_batch_stats_final=(90.0 + jitter + lift) / 100)  # fmt: skip
    verdict, evidence = verdicts(tmp_path)["batch_stats_beat_ema"]
    assert "cifar10 SGD batch 64 normalization batch 2, mnist SGD batch 16 normalization batch 4" in evidence
    assert verdict == "not supported"


def test_study3_section_draws_bn_against_its_norm_batch_and_tabulates_evaluation(tmp_path):
    from scipy import stats

    bn = study3_records(tmp_path)
    main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    section = text[text.index("## Study 3") :]
    assert "![acc_vs_norm_batch_cifar10_bs64.png](acc_vs_norm_batch_cifar10_bs64.png)" in section
    assert (tmp_path / "rep" / "acc_vs_norm_batch_cifar10_bs64.png").stat().st_size > 10_000
    # The controls as flat references, with their own cells.
    gn = Stat([80.0 - 0.3, 80.0, 80.0 + 0.4])
    assert f"| gn | {gn.cell()} |" in section and "| dyt |" in section
    header = ("| normalization batch | best (%) | EMA, last (%) | batch statistics (%); − EMA | "
              "PreciseBN 256 images (%); − EMA | PreciseBN 4,096 images (%); − EMA |")  # fmt: skip
    assert header in section
    # At normalization batch 2: PreciseBN from 4,096 images gains 6.0, 6.1 (+0.2 +0.1), ... over EMA.
    ema = bn[2]
    p4096 = [b + 6.0 + 0.2 * s + 0.1 * s for s, b in enumerate(ema)]
    t = stats.ttest_rel(p4096, ema)
    diff = statistics.fmean(p4096) - statistics.fmean(ema)
    row = next(line for line in section.splitlines() if line.startswith("| 2 |"))
    assert f"{Stat(p4096).cell()}; {diff:+.2f}, p = {p_text(t.pvalue)} |" in row


def _report_csv(root: Path) -> str:
    main(["report", str(root), "--out", str(root / "rep")])
    return (root / "rep" / "best_accuracy.csv").read_text()


def test_runs_that_agree_to_within_rounding_are_reported_without_scipys_precision_warning(tmp_path):
    # PreciseBN's gain the same in every run to within float rounding (the next float after 0.6
    # in one): scipy's paired t-test warns of precision loss in its moments, which tells a reader
    # of the report nothing the report does not say.
    import math
    import warnings

    for seed, value in enumerate((0.6, 0.6, math.nextafter(0.6, 1.0))):
        _diagnosed(tmp_path, "bn", 8, seed, 0.5, batch_stats=0.55, precise=value)
        _diagnosed(tmp_path, "gn", 8, seed, 0.7)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert not [w for w in said if "Precision loss" in str(w.message)], [str(w.message) for w in said]


def test_judge_decides_each_verdict_on_its_holm_adjusted_p(monkeypatch):
    # Guards against judge() `v.holds and adjusted < ALPHA` -> `v.holds and v.p < ALPHA`
    # (the Holm correction computed and printed, but not applied). Three claims with raw
    # p 0.03, 0.04 and 0.2 that all point the claimed way: by hand, Holm's adjusted p are
    # 3 x 0.03 = 0.09, max(0.09, 2 x 0.04) = 0.09 and 0.2, none below 0.05; a fourth claim
    # with p = 0.001 stays supported (4 x 0.001 = 0.004).
    from normbench.report import verdicts
    from normbench.report.claims import tested

    raw = {"a": 0.03, "b": 0.04, "c": 0.2}

    def claim(name, p):
        return lambda runs: tested(name, f"{name} evidence", p, True)

    monkeypatch.setattr(verdicts, "CLAIMS", tuple(claim(n, p) for n, p in raw.items()))
    found = verdicts.judge([])
    assert [v.p_holm for v in found] == pytest.approx([0.09, 0.09, 0.2])
    assert [v.verdict for v in found] == ["not supported"] * 3
    # As decided before the correction: supported on their own p.
    assert [tested(n, "", p, True).verdict for n, p in raw.items()] == ["supported", "supported", "not supported"]
    monkeypatch.setattr(verdicts, "CLAIMS", (claim("d", 0.001), *verdicts.CLAIMS))
    found = verdicts.judge([])
    assert found[0].p_holm == pytest.approx(0.004) and found[0].verdict == "supported"
    assert [v.verdict for v in found[1:]] == ["not supported"] * 3


def test_a_condition_whose_mean_is_exactly_the_floor_has_learned():
    # Guards against Stat.learned `self.mean >= self.floor` -> `>` ("learned when their mean
    # accuracy reaches LEARNED x chance"). 30.0 is 3 x chance of 10 classes.
    from normbench.report.tables import LEARNED, Stat

    floor = LEARNED * 100.0 / 10
    assert floor == 30.0
    assert Stat([29.0, 31.0], floor=floor).learned is True
    assert Stat([29.0, 30.0], floor=floor).learned is False
    assert "not learned" not in Stat([30.0], floor=floor).cell()


def test_bnrs_slower_names_where_each_curve_first_reaches_95_percent_of_bns_best(tmp_path):
    # Guards against bnrs_slower `target = 0.95 * max(...)` -> `0.9 * max(...)`: in
    # test_bnrs_curves_are_compared_step_by_step_and_a_cell_that_did_not_learn_is_left_out both
    # norms reach 90% and 95% of BN's best at the same step. Here they do not. Independent: the
    # first evaluation where the mean curve (over the seeds, which share every step) is at least
    # 0.95 x BN's best mean.
    bn = {500: 50.0, 1000: 88.0, 1500: 93.0, 2000: 96.0}
    bnrs = {500: 40.0, 1000: 70.0, 1500: 90.0, 2000: 95.0}
    for norm, curve in (("bn", bn), ("bnrs", bnrs)):
        for seed, jitter in enumerate((-0.4, 0.0, 0.4)):
            _curve_record(tmp_path, norm, seed, {s: a + jitter for s, a in curve.items()})
    target = 0.95 * max(bn.values())  # the seeds' jitters average to 0: 91.2
    first = {name: min(s for s, a in c.items() if a >= target) for name, c in (("bn", bn), ("bnrs", bnrs))}
    assert first == {"bn": 1500, "bnrs": 2000}
    _, evidence = verdicts(tmp_path)["bnrs_slower"]
    assert f"95% of BN's best at iteration {first['bn']} (bn) vs {first['bnrs']} (bnrs)" in evidence
