"""At scale on this machine: one process or two (torch.distributed, gloo), threads, decoding workers.

    python -m benchmarks.scale [--images 256] [--quick] [--model resnet50] [--device cuda]

torchvision resnet18 (random weights) at 224 px on JPEG files (written once into a
temporary folder: 500x375 smooth random pictures, so that decoding and resizing cost what
they cost for photos). For each setting (processes x threads per process x decoding
workers) three workloads run in fresh processes, launched with torchrun when there are
two: a plain inference pass over the images (decoding included; renorm.evaluate.predict,
which splits the images across processes), exact re-normalization alone, and the whole
W4A8 pipeline (renorm.compress: quantize, re-normalize, calibrate 8-bit activations; no
evaluation). Images/s counts the calibration images. Each process runs one warm-up batch
before its clock starts. Writes docs/results/scale.md (scale_MODEL_DEVICE.md for another
model or device). With --device cuda: one process, without and with 4 decoding workers,
with the images decoded once beforehand (a tensor in memory: what the GPU itself costs),
and one process per GPU (nccl) when there are several.
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

import numpy as np

SETTINGS = [(1, 1, 0), (1, 2, 0), (1, 1, 1), (2, 1, 0)]  # (processes, threads each, decoding workers each)
IN_MEMORY = -1  # "decoding workers" of a setting whose images are decoded before the clock starts
WORKLOADS = ("inference", "renormalize", "pipeline")


def write_photos(folder: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        picture.save(folder / f"{index:05d}.jpg", quality=90)


def measure(workload: str, folder: str, images: int, workers: int, model_name: str, device_spec: str) -> None:
    """Run one workload in this process (one of several under torchrun); rank 0 prints its seconds as JSON."""
    import torch
    import torch.distributed as dist
    import torchvision

    from renorm import distributed
    from renorm.api import Config, compress
    from renorm.device import resolve_device
    from renorm.data import PRESETS, open_images, sample
    from renorm.evaluate import predict
    from renorm.renormalize import renormalize

    device = resolve_device(device_spec)
    distributed.setup(device)
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name).eval().to(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    source = sample(open_images(folder, PRESETS["imagenet"], labeled=False, workers=max(workers, 0)), images, seed=0)
    if workers == IN_MEMORY:
        source = torch.stack([source.load(index)[0] for index in range(len(source))])
    with torch.no_grad():  # warm-up: CUDA context, cuDNN's choice of kernels
        model(torch.zeros(2, 3, 224, 224, device=device))
    synchronize()
    if distributed.active():
        dist.barrier()
    start = time.perf_counter()
    if workload == "inference":
        predict(model, source, batch_size=64)
    elif workload == "renormalize":
        renormalize(model, source, chunk=64, batch_size=64)
    else:
        compress(model, source, Config(wbits=4, abits=8, num_images=images, act_images=min(400, images),
                                       batch_size=64))
    synchronize()
    if distributed.active():
        dist.barrier()
    seconds = time.perf_counter() - start
    if distributed.is_main():
        print(json.dumps({"seconds": seconds}), flush=True)
    if distributed.active():
        dist.destroy_process_group()


def run(workload: str, folder: Path, images: int, processes: int, threads: int, workers: int, model: str,
        device: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    inner = ["-m", "benchmarks.scale", "--measure", workload, "--folder", str(folder), "--images", str(images),
             "--workers", str(workers), "--model", model, "--device", device]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   *inner]
    else:
        command = [sys.executable, *inner]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="calibration images (default 256)")
    parser.add_argument("--quick", action="store_true", help="64 images, two settings")
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier (default resnet18)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--measure", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.folder, args.images, args.workers, args.model, args.device)
        return

    from benchmarks.common import COMMIT, RESULTS, markdown_table
    from renorm.files import write_atomic

    images = 64 if args.quick else args.images
    settings = SETTINGS[:1] + SETTINGS[-1:] if args.quick else SETTINGS
    if args.device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
        settings = [(1, 1, 0), (1, 1, 4), (1, 1, IN_MEMORY)] + ([(gpus, 1, 0)] if gpus > 1 else [])
    rows, started = [], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as folder:
        write_photos(Path(folder), images)
        for processes, threads, workers in settings:
            load = os.getloadavg()[0]
            seconds = {w: run(w, Path(folder), images, processes, threads, workers, args.model, args.device)
                       for w in WORKLOADS}
            row = [str(processes), str(threads), "decoded beforehand" if workers == IN_MEMORY else str(workers),
                   f"{load:.2f}"]
            row += [f"{seconds[w]:.1f} ({images / seconds[w]:.1f})" for w in WORKLOADS]
            row += [f"{seconds['renormalize'] / seconds['inference']:.2f}"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    table = markdown_table(["processes", "threads each", "decoding workers each", "load before (1 min)",
                            "inference s (img/s)", "re-normalization s (img/s)", "W4A8 pipeline s (img/s)",
                            "re-normalization / inference"], rows)
    stem = "scale" if (args.model, args.device) == ("resnet18", "cpu") else f"scale_{args.model}_{args.device}"
    name = f"{stem}_quick.md" if args.quick else f"{stem}.md"
    options = " --quick" if args.quick else f" --images {images}"
    options += "" if args.model == "resnet18" else f" --model {args.model}"
    options += "" if args.device == "cpu" else f" --device {args.device}"
    backend = "gloo" if args.device == "cpu" else "nccl"
    text = (f"# One process or several, threads, decoding workers\n\n`python -m benchmarks.scale{options}`; renorm "
            f"commit {COMMIT}, {os.cpu_count()} cores, device {args.device}, started {started}. torchvision "
            f"{args.model} (random weights), {images} JPEG files (500x375) at 224 px, batch and chunk 64. Several "
            f"processes: torchrun, {backend}. The load average counts every process on the machine, other users' "
            "included: it is not controlled.\n\n" + table + "\n")
    write_atomic(RESULTS / name, lambda handle: handle.write(text.encode()))
    print(table)


if __name__ == "__main__":
    main()
