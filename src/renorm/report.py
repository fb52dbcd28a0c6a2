"""The JSON report (a stable contract), stage timing and memory, and the accuracy table.

Top-level keys of a report: "accuracy" maps each evaluated stage ("fp32", "compressed",
"renormalized", "final"; "model" for `renorm evaluate`) to its metrics: "top1"/"top5"
(percent) on labeled data, "agreement_top1"/"agreement_top5"/"kl" against the FP32
model on unlabeled data. Also "config", "model", "calibration", "evaluation", "stages"
(seconds and peak RSS per stage; peak GPU memory too where CUDA is in use), "weights", "activations", "batchnorm", "table".
"""
from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from renorm.files import write_atomic

STAGE_LABELS = {"fp32": "FP32", "compressed": "compressed, before re-normalization",
                "renormalized": "compressed + re-normalized", "final": "+ activation quantization",
                "model": "model"}
METRIC_LABELS = (("top1", "top-1 %"), ("top5", "top-5 %"), ("agreement_top1", "agree top-1 %"),
                 ("agreement_top5", "agree top-5 %"), ("kl", "KL"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last reset_peak_rss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux), so the next reading covers one stage."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@contextmanager
def stage(stages: dict[str, dict], name: str) -> Iterator[dict]:
    """Record seconds and peak RSS (MiB) of the enclosed block under stages[name], and the peak
    of PyTorch's CUDA memory (peak_gpu_mb) when CUDA is in use; the GPU's queued work is waited
    for before the clock stops."""
    reset_peak_rss()
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    record: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        yield record
    finally:
        if torch.cuda.is_initialized():  # in use before the stage or since
            torch.cuda.synchronize()
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["peak_rss_mb"] = round(peak_rss_mb(), 1)
        stages[name] = record


def accuracy_table(accuracy: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per stage, one column per metric present."""
    columns = [(key, label) for key, label in METRIC_LABELS if any(key in m for m in accuracy.values())]
    lines = ["| stage | " + " | ".join(label for _, label in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for stage_name, metrics in accuracy.items():
        cells = [_format(key, metrics.get(key)) for key, _ in columns]
        lines.append(f"| {STAGE_LABELS.get(stage_name, stage_name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(key: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if key == "kl" else f"{value:.2f}"


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path`, atomically (renorm.files.write_atomic)."""
    text = json.dumps(data, indent=2, default=_jsonable) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot put a {type(value).__name__} in a report")
