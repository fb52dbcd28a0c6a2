"""Shared pieces of the benchmark scripts: data, evaluation, tables, plots, provenance."""
from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from renorm.data import PRESETS, Batches, open_images, sample
from renorm.evaluate import accuracy, agreement, predict
from renorm.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
THREADS = int(os.environ.get("RENORM_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def fashion_mnist(num_calib: int = 1000, num_test: int | None = None, seed: int = 0):
    """(calibration images, test images, test labels, names): unlabeled train sample, labeled test set."""
    preset = PRESETS["fashion-mnist"]
    calib_source = sample(open_images("fashion-mnist:train", preset, labeled=False), num_calib, seed)
    test_source = open_images("fashion-mnist:test", preset, labeled=True)
    if num_test is not None:
        test_source = sample(test_source, num_test, seed)
    calib = Batches(calib_source, 250).first(len(calib_source))
    test_x, test_y = [], []
    for x, y in Batches(test_source, 500):
        test_x.append(x)
        test_y.append(y)
    return calib, torch.cat(test_x), torch.cat(test_y), {"calib": calib_source.name, "test": test_source.name}


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    logits, _ = predict(model, x, batch_size)
    return accuracy(logits, y)["top1"]


def agree(model: nn.Module, x: torch.Tensor, reference_logits: torch.Tensor, batch_size: int = 50) -> dict:
    logits, _ = predict(model, x, batch_size)
    return agreement(logits, reference_logits)


def copy_of(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _commit_at_start() -> str:
    """The commit the benchmark runs (read once, at import: a run may outlive the next commit).

    RENORM_BENCH_COMMIT names it where the tree is a copy without git (benchmarks/gpu_check.sh).
    """
    if os.environ.get("RENORM_BENCH_COMMIT"):
        return os.environ["RENORM_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
    return (head or "?") + (" with uncommitted changes" if dirty else "")


COMMIT = _commit_at_start()


def provenance() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"renorm commit {COMMIT}, torch {torch.__version__}, {THREADS} threads on {os.cpu_count()} cores ({cpu}), "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, command: str, body: str, data: Any = None) -> Path:
    """Write docs/results/NAME.md (and NAME.json with the raw numbers)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = f"## {title}\n\nRegenerate: `{command}` ({provenance()})\n\n{body}\n"
    path = RESULTS / f"{name}.md"
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))
    if data is not None:
        raw = json.dumps(data, indent=2) + "\n"
        write_atomic(RESULTS / f"{name}.json", lambda handle: handle.write(raw.encode("utf-8")))
    print(text, flush=True)
    return path


def command_line() -> str:
    module = Path(sys.argv[0]).stem
    return " ".join([f"python -m benchmarks.{module}", *sys.argv[1:]])


def merged(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (per model) merged over the models already in docs/results/NAME.json.

    Lets a script run one model at a time (`--models`) and still write one table for all.
    """
    path = RESULTS / f"{name}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update(data)
    return previous
