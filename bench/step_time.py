"""One training step of study 2's network (the study's own module layout, normbench.baseline's
StudyNetwork: 4 blocks of width 64, 28x28, one channel, torch's BatchNorm2d, Adam; forward +
backward + step + ``loss.item()``) in milliseconds, in the study's memory order
(NCHW) and in normbench's channels-last, fp32 and under ``torch.autocast("cpu", bfloat16)``
(what ``--trainer.precision bf16-mixed`` turns on), at batch sizes 2, 16 and 128: the compute
that bounds any whole-process ratio in the README's speed section. Median of 3 timings.

    python bench/step_time.py [threads]     # default: torch's own thread count
"""

import sys
import time

import torch
import torch.nn.functional as F

from normbench.baseline import StudyNetwork


def step_ms(batch_size: int, channels_last: bool, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    net = StudyNetwork(num_blocks=4, norm="batch", in_channels=1, num_classes=10, width=64)
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)

    def step() -> float:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(5):
        step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1000)
    return sorted(times)[1]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    print(f"threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for bs, steps in ((2, 200), (16, 60), (128, 15)):
        row = {f"{'channels-last' if cl else 'NCHW'} {'bf16' if bf else 'fp32'}": round(step_ms(bs, cl, bf, steps), 2)
               for cl in (False, True) for bf in (False, True)}  # fmt: skip
        print(f"batch size {bs}: ms a step", row, flush=True)
