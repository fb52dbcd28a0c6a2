"""Two renorm commands started together: does the default thread count hold up?

    python -m benchmarks.threads_pair [--wbits 2] [--stagger S] [--out threads_pair.md]

Runs `renorm compress fmnist-mobilenet_v2 --calib fashion-mnist:train --wbits W --scheme
uniform --reconstruct` as a real CLI process: alone, then two at once (as a sweep over
settings launched in parallel does), each with renorm's default thread count and with
`--threads` set to every core. The 1-minute load average cannot see a process that started
a second ago; renorm.device.default_threads also counts the threads running at that moment.
With --stagger S the second process starts S seconds after the first, which has already chosen
its threads: without --threads, renorm chooses them again at the start of every stage.
Each row gives the wall time of each process, the threads it chose (from its report) and
its reconstruction and quantization stages. Writes docs/results/threads_pair.md (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import COMMIT, RESULTS, markdown_table
from renorm.device import available_cores
from renorm.files import write_atomic


def command(report: Path, wbits: int, threads: int | None) -> list[str]:
    args = [sys.executable, "-m", "renorm.cli", "compress", "fmnist-mobilenet_v2", "--calib", "fashion-mnist:train",
            "--wbits", str(wbits), "--scheme", "uniform", "--reconstruct", "--quiet", "--report", str(report)]
    return args + (["--threads", str(threads)] if threads is not None else [])


def run_together(count: int, wbits: int, threads: int | None, folder: Path, stagger: float = 0.0) -> list[dict]:
    """Start `count` processes, each `stagger` seconds after the one before; wait for all; their wall
    times and reports."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    started, processes = [], []
    for i in range(count):
        if i:
            time.sleep(stagger)
        report = folder / f"report{i}.json"
        report.unlink(missing_ok=True)
        started.append(time.perf_counter())
        processes.append((subprocess.Popen(command(report, wbits, threads), env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE), report))
    results = []
    for start, (process, report) in zip(started, processes):
        _, err = process.communicate()
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise SystemExit(f"renorm compress failed ({process.returncode}): {err.decode()[-2000:]}")
        data = json.loads(report.read_text())
        # threads at the start, and (without --threads: chosen again at every stage) in the reconstruction
        results.append({"seconds": seconds, "threads": data["runtime"]["threads"],
                        "reconstruct_threads": data["stages"]["reconstruct"].get("threads", data["runtime"]["threads"]),
                        "reconstruct": data["stages"]["reconstruct"]["seconds"],
                        "quantize": data["stages"]["quantize"]["seconds"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wbits", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="rows: processes started together")
    parser.add_argument("--idle-load", type=float, default=0.5,
                        help="before each row wait (up to 3 minutes) for the 1-minute load average to fall below this")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between the starts of the processes of a row (default 0: together)")
    parser.add_argument("--out", default="threads_pair.md", help="file name under docs/results")
    parser.add_argument("--default-only", action="store_true", help="only the rows with renorm's default threads")
    args = parser.parse_args()
    cores = available_cores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.processes:
            for threads in (None,) if args.default_only else (None, cores):
                deadline = time.monotonic() + 180  # an idle machine, as far as the load average can tell
                while os.getloadavg()[0] >= args.idle_load and time.monotonic() < deadline:
                    time.sleep(5.0)
                load = os.getloadavg()[0]
                results = run_together(count, args.wbits, threads, Path(tmp), args.stagger)
                label = "default" if threads is None else f"--threads {threads}"
                row = [str(count), label, f"{load:.2f}", *(", ".join(str(r[key]) for r in results)
                                                           for key in ("threads", "reconstruct_threads")),
                       *(", ".join(f"{r[key]:.1f}" for r in results) for key in ("seconds", "reconstruct", "quantize"))]
                rows.append(row)
                print(" | ".join(row), flush=True)
    together = "processes started together" if not args.stagger else f"processes started {args.stagger:g} s apart"
    table = markdown_table([together, "threads asked", "load average (1 min) before", "threads at start",
                            "threads in reconstruct", "wall s", "reconstruct s", "quantize s"], rows)
    text = (f"# Two renorm commands at once\n\n`python -m benchmarks.threads_pair --wbits {args.wbits} --processes "
            f"{' '.join(map(str, args.processes))} --idle-load {args.idle_load}"
            f"{f' --stagger {args.stagger:g}' if args.stagger else ''}"
            f"{' --default-only' if args.default_only else ''}`; renorm commit "
            f"{COMMIT}, torch {torch.__version__}, {cores} cores in this process's affinity mask, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\nEach process: `renorm compress "
            f"fmnist-mobilenet_v2 --calib fashion-mnist:train --wbits {args.wbits} --scheme uniform --reconstruct` "
            "(1000 calibration images, GPTQ on 256), started "
            f"{'at the same moment as the others in its row' if not args.stagger else f'{args.stagger:g} s after the one before it'}"
            ", once the "
            f"1-minute load average had fallen below {args.idle_load} (or after 3 minutes of waiting); the "
            "machine's other load is not controlled.\n\n"
            f"{table}\n")
    write_atomic(RESULTS / args.out, lambda handle: handle.write(text.encode()))
    print(table)


if __name__ == "__main__":
    main()
