#!/usr/bin/env python3
"""What NormDiagnostics costs a training step at its default interval.

Trains the study's network (brn, which logs the most) for the same steps on the same random
MNIST-shaped batches, with and without the diagnostics, alternating the two several times, and
prints the median wall time of each and their ratio. Validation and end-of-fit PreciseBN are
off: this measures the training step alone.

    python bench/diagnostics_overhead.py --steps 300 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from normbench.callbacks import NormDiagnostics
from normbench.module import NormBenchModule


def fit_seconds(diagnostics: bool, args, data: TensorDataset, root: str) -> float:
    L.seed_everything(0, verbose=False)
    model = NormBenchModule(norm=args.norm, num_classes=10, in_channels=1)
    callbacks = [NormDiagnostics(every_n_steps=args.every_n_steps, precise_bn_batches=0)] if diagnostics else []
    trainer = L.Trainer(
        max_steps=args.steps, limit_val_batches=0, logger=TensorBoardLogger(root, name=str(diagnostics)),
        callbacks=callbacks, accelerator=args.accelerator, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=True))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--every-n-steps", type=int, default=50)
    p.add_argument("--norm", default="brn")
    p.add_argument("--accelerator", default="auto")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4096, 1, 28, 28, generator=g), torch.randint(0, 10, (4096,), generator=g))
    times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as root:
        fit_seconds(False, args, data, root)  # warm-up
        for _ in range(args.repeats):
            for diagnostics in (False, True):
                times[diagnostics].append(fit_seconds(diagnostics, args, data, root))
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({
        "norm": args.norm, "batch_size": args.batch_size, "steps": args.steps, "every_n_steps": args.every_n_steps,
        "threads": torch.get_num_threads(), "seconds_without": round(without, 3), "seconds_with": round(with_, 3),
        "overhead_ratio": round(with_ / without, 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
