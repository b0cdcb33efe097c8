"""A script, not a test module: ``python sync_forks.py N ROOT [--deprecated]``.

N times over, two ranks of a gloo process group train bn and brn through the cross-process
reduction, destroy the process group and exit through Python's whole shutdown (atexit, module
teardown, C++ static destructors: the exit a spawned process takes). The ranks are forked from
this process, which imports torch once, so a round costs a fork, not two torch imports (about
2 s each on 2 cores). Exits 1, naming the round, if a rank ends by a signal or a non-zero status.

``--deprecated`` reduces through ``torch.distributed.nn.functional.all_reduce``, the reduction
that aborted about one process in ten at exit (kept to show that this harness catches it).
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist

import normbench.norms.stats as norm_stats
from normbench.norms import convert_sync_norms, create_norm

C, SPLIT = 6, (3, 5)


def _rank(rank: int, init_file: str, deprecated: bool) -> None:
    if deprecated:
        warnings.simplefilter("ignore")
        from torch.distributed.nn.functional import all_reduce

        norm_stats._all_reduce = lambda t, group: all_reduce(t, group=group or dist.group.WORLD)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        part = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], None)
        for name in ("bn", "brn"):
            torch.manual_seed(0)
            layer = convert_sync_norms(create_norm(name, C))
            x = torch.randn(sum(SPLIT), C, 3, 3)[part].clone().requires_grad_()
            (layer(x) * torch.randn(x.shape)).sum().backward()
    finally:
        dist.destroy_process_group()


rounds, root = int(sys.argv[1]), sys.argv[2]
deprecated = "--deprecated" in sys.argv[3:]
failed = []
for i in range(rounds):
    children = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            # The child's SystemExit unwinds to the interpreter, which then shuts down in full.
            _rank(rank, os.path.join(root, f"init{i}"), deprecated)
            sys.exit(0)
        children.append(pid)
    for rank, pid in enumerate(children):
        _, status = os.waitpid(pid, 0)
        if status:
            how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {os.WEXITSTATUS(status)}"
            failed.append(f"round {i} rank {rank}: {how}")
print(f"{rounds} rounds, {len(failed)} rank exits failed" + (": " + "; ".join(failed) if failed else ""))
sys.exit(1 if failed else 0)
