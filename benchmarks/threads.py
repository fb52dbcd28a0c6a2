"""Threads on a busy machine: weight quantization and an inference pass at 1..cores threads,
with 0..cores other busy processes competing for the cores.

    python -m benchmarks.threads [--repeats 1]

Each row runs in this process with torch.set_num_threads(T) while B extra processes spin
(pure Python busy loops, started here and stopped after the row). Workloads: W4 pow2
quantization of torchvision resnet18 (random weights; many small tensor operations) and
one inference pass of resnet18 over 32 synthetic 224x224 images (large convolutions).
The machine's own load (other users) is printed with each row: it is not controlled.
Writes docs/results/threads.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torchvision

from benchmarks.common import COMMIT, RESULTS, markdown_table
from renorm.device import available_cores, default_threads
from renorm.files import write_atomic
from renorm.quantize.weights import WeightQuantConfig, quantize_weights

SPIN = "while True: pass"


def spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()


def quantize(model: torch.nn.Module) -> None:
    quantize_weights(model, WeightQuantConfig(4, "pow2"))


@torch.no_grad()
def inference(model: torch.nn.Module, images: torch.Tensor) -> None:
    model(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the best is kept (default 1)")
    args = parser.parse_args()
    cores = available_cores()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    images = torch.randn(32, 3, 224, 224)
    workloads = {"quantize W4 pow2 (s)": lambda: quantize(model), "inference 32 imgs (s)": lambda: inference(model, images)}
    rows = []
    for busy in range(cores + 1):
        others = spinners(busy)
        try:
            time.sleep(1.0)
            for threads in range(1, cores + 1):
                torch.set_num_threads(threads)
                row = [str(busy), str(threads), f"{os.getloadavg()[0]:.2f}"]
                for run in workloads.values():
                    best = float("inf")
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        run()
                        best = min(best, time.perf_counter() - start)
                    row.append(f"{best:.2f}")
                rows.append(row)
                print(" | ".join(row), flush=True)
        finally:
            stop(others)
    table = markdown_table(["extra busy processes", "threads", "load average (1 min)", *workloads], rows)
    text = (f"# Threads on a busy machine\n\n`python -m benchmarks.threads --repeats {args.repeats}`; renorm commit "
            f"{COMMIT}, torch {torch.__version__}, {cores} cores in this process's affinity mask, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. renorm's default here: "
            f"{default_threads()} threads (see renorm.device.default_threads). The load average counts every "
            "process on the machine, other users' included: it is not controlled.\n\n{table}\n")
    write_atomic(RESULTS / "threads.md", lambda handle: handle.write(text.encode()))
    print(table)


if __name__ == "__main__":
    main()
