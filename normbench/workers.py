"""The machine's slots for a sweep's runs: how many worker processes ``--workers auto``
starts, and the share of the machine each one takes (its GPU, or its threads and cores on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from normbench.results import cpu_cores


def available_memory_gib() -> float:
    """Memory this machine has free for new processes, in GiB (Linux's MemAvailable; inf where
    it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


# What one CPU worker process may hold: torch, Lightning and normbench imported (about 0.5 GiB
# resident) and a data set in memory (CIFAR-10's training images as uint8: 0.15 GiB).
WORKER_GIB = 1.0


def auto_workers(runs: int, gpus: int, threads_per_run: int | None = None, memory_gib: float | None = None) -> int:
    """How many workers ``--workers auto`` (the default) runs at once: one per GPU where there
    are GPUs; on CPU one per ``threads_per_run`` cores (one per core by default), since single-
    thread workers that each stay one process for the whole sweep are the fastest layout
    measured (docs/speed.md: on both 2-core CPUs measured, its 12-run grid beat one process of
    all cores' threads by 12% to 19%), and no more than one per ``WORKER_GIB`` of available
    memory (``memory_gib``, default: read now); never more than there are ``runs``, at least 1.

    Each run's result does not depend on it: only its thread count does, which its record
    states (``hardware``).
    """
    if gpus:
        per_machine = gpus
    else:
        memory = available_memory_gib() if memory_gib is None else memory_gib
        per_machine = min(len(cpu_cores()) // (threads_per_run or 1), int(memory // WORKER_GIB))
    return max(1, min(runs, per_machine))


def worker_threads(workers: int, gpus: int, threads_per_run: int | None) -> int | None:
    """Torch threads of each of ``workers`` worker processes: ``threads_per_run`` where given,
    else cores // workers on CPU (at least 1) and torch's default on GPUs (None)."""
    if threads_per_run is not None or gpus:
        return threads_per_run
    return max(1, len(cpu_cores()) // workers)


def cpu_slots(workers: int, threads: int) -> list[list[int]]:
    """The cores each of ``workers`` concurrent runs is pinned to: consecutive blocks of
    ``threads`` cores, disjoint while ``workers * threads`` cores exist, wrapping around
    (shared) beyond that."""
    cores = cpu_cores()
    return [
        sorted({cores[(slot * threads + i) % len(cores)] for i in range(min(threads, len(cores)))})
        for slot in range(workers)
    ]


def limit_threads(threads: int, cores: list[int] | None = None) -> None:
    """Give this process ``threads`` intra-op and inter-op threads (and OMP_NUM_THREADS and
    MKL_NUM_THREADS for the processes it starts, such as data loader workers) and, where the OS
    allows, pin it to ``cores``.

    Torch accepts the inter-op count only before its first parallel work, so this runs first
    thing in a fresh worker process.
    """
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_interop_threads(threads)
    torch.set_num_threads(threads)


@dataclass
class Slot:
    """One worker's share of the machine: its GPU (``CUDA_VISIBLE_DEVICES``), or its threads
    and cores on CPU."""

    gpu: str | None = None
    threads: int | None = None
    cores: list[int] | None = None


def gpu_slots(workers: int, gpus: int) -> list[Slot]:
    """One GPU per worker, in turn (worker w on the w-th visible GPU modulo their count): of
    ``CUDA_VISIBLE_DEVICES`` when it is set, else of 0 .. gpus - 1."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible[:gpus] if len(visible) >= gpus else [str(i) for i in range(gpus)]
    return [Slot(gpu=ids[w % len(ids)]) for w in range(workers)]


_SLOT: Slot | None = None  # the share of the machine this process has taken (enter_slot)


def enter_slot(slot: Slot) -> None:
    """Take ``slot`` in this process: its GPU as ``CUDA_VISIBLE_DEVICES`` before anything
    touches CUDA here, so that device 0 of every run is that GPU and Lightning's default of one
    device takes it; on CPU its threads and cores. Taking the slot this process holds again
    changes nothing (torch fixes inter-op threads at its first parallel work)."""
    global _SLOT
    if slot == _SLOT:
        return
    if slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
    if slot.threads is not None:
        limit_threads(slot.threads, slot.cores)
    _SLOT = slot


def layout(workers: int, gpus: int, threads_per_run: int | None) -> str:
    """Where the runs go, in words: ``2 worker processes, 1 thread each, on 2 cores``."""
    if workers <= 1:
        threads = "torch's default threads" if threads_per_run is None else f"{threads_per_run} threads"
        return f"one run after another in this process, {threads}"
    threads = worker_threads(workers, gpus, threads_per_run)
    where = f"on {gpus} GPUs" if gpus else f"on {len(cpu_cores())} cores"
    each = "" if threads is None else f", {threads} thread{'s' * (threads != 1)} each"
    return f"{workers} worker processes{each}, {where} (--workers 1: one after another here)"
