"""The study's own training loop, the baseline ``normbench bench`` measures against.

A re-implementation of the plain PyTorch loop of "Normalization: Batch vs Group" (the study's
seed code; the copy this project was given is ``bench/seed_loop.py`` of its shared material),
doing per step what that loop does: the study's CNN (3x3 conv stem, ``num_blocks`` conv3x3 +
norm + ReLU blocks of ``width`` channels, adaptive average pooling, linear head), Adam with lr
1e-3, a torchvision dataset behind a DataLoader (shuffle, ``num_workers`` 2, persistent workers)
with ToTensor + Normalize(0.5, 0.5) per image, and ``loss.item()`` after every step. It is
shipped with normbench so that ``normbench bench`` works wherever normbench is installed.

It prints one JSON line: images per second over the timed steps (after a warm-up) with
``--steps``, or over whole epochs, test evaluation included, with the best test accuracy, with
``--epochs``::

    python -m normbench.baseline --dataset mnist --data-dir data --batch-size 2 --norm batch --epochs 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision
from torch import nn
from torchvision import transforms

DATASETS = {
    "cifar10": (torchvision.datasets.CIFAR10, 3, 10),
    "cifar100": (torchvision.datasets.CIFAR100, 3, 100),
    "mnist": (torchvision.datasets.MNIST, 1, 10),
    "fashionmnist": (torchvision.datasets.FashionMNIST, 1, 10),
}


def study_norm(norm: str, channels: int) -> nn.Module:
    """torch's BatchNorm2d for ``batch``, GroupNorm with 4 groups otherwise, as the study."""
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(4, channels)


class StudyBlock(nn.Module):
    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm = study_norm(norm, channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class StudyNetwork(nn.Module):
    """The study's CNN, module for module (so its parameters draw the same initial values)."""

    def __init__(self, num_blocks: int, norm: str, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.blocks = nn.Sequential(*[StudyBlock(width, norm) for _ in range(num_blocks)])
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.conv1(x))), 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m normbench.baseline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--norm", choices=["batch", "group"], default="batch")
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, help="time this many training steps, then stop")
    p.add_argument("--epochs", type=int, help="train this many epochs and report the best test accuracy")
    p.add_argument("--train-subset", type=int, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, help="evaluate on only the first N test images")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (with --steps)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the loop and print (and return) its JSON line.

    Args:
        argv: command-line arguments; None reads ``sys.argv``.
    """
    parser = build_parser()
    a = parser.parse_args(argv)
    if (a.steps is None) == (a.epochs is None):
        parser.error("give exactly one of --steps and --epochs")
    torch.manual_seed(a.seed)
    dataset, in_channels, num_classes = DATASETS[a.dataset]
    half = (0.5,) * in_channels
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(half, half)])
    train_set = dataset(root=a.data_dir, train=True, download=False, transform=transform)
    test_set = dataset(root=a.data_dir, train=False, download=False, transform=transform)
    if a.train_subset:
        train_set = torch.utils.data.Subset(train_set, range(a.train_subset))
    if a.test_subset:
        test_set = torch.utils.data.Subset(test_set, range(a.test_subset))

    def loader(ds, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds, batch_size=a.batch_size, shuffle=shuffle, num_workers=a.num_workers,
            persistent_workers=a.num_workers > 0,
        )  # fmt: skip

    train_loader, test_loader = loader(train_set, True), loader(test_set, False)
    device = torch.device(a.device)
    model = StudyNetwork(a.num_blocks, a.norm, in_channels, num_classes, a.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> float:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        return loss.item()  # the study reads the loss, a host sync, every step

    out = {"dataset": a.dataset, "batch_size": a.batch_size, "norm": a.norm, "device": a.device,
           "threads": torch.get_num_threads()}  # fmt: skip
    if a.steps:
        model.train()
        done, start = 0, None
        while done < a.steps + a.warmup:
            for inputs, labels in train_loader:
                if done == a.warmup:
                    start = time.perf_counter()
                step(inputs, labels)
                done += 1
                if done == a.steps + a.warmup:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out.update(steps=a.steps, seconds=round(seconds, 3), images_per_s=round(a.steps * a.batch_size / seconds, 1))
    else:
        best, start, seen = 0.0, time.perf_counter(), 0
        for _ in range(a.epochs):
            model.train()
            for inputs, labels in train_loader:
                step(inputs, labels)
                seen += labels.numel()
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for inputs, labels in test_loader:
                    correct += (model(inputs.to(device)).argmax(1).cpu() == labels).sum().item()
                    total += labels.numel()
            best = max(best, 100.0 * correct / total)
        seconds = time.perf_counter() - start
        out.update(epochs=a.epochs, seconds=round(seconds, 3), images_per_s=round(seen / seconds, 1),
                   best_test_acc=round(best, 2))  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
