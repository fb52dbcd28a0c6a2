"""Several processes (torch.distributed, gloo on the CPU) give the statistics and the numbers of one.

Re-normalization splits each chunk across the processes and all-reduces the moments at
every BatchNorm; evaluation splits the images and all-reduces its counts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import SmallNet, perturbed, write_image
from renorm import cli, distributed
from renorm.data import make_preset, open_images
from renorm.evaluate import evaluate
from renorm.renormalize import renormalize, renormalize_with_summary

SRC = Path(__file__).resolve().parents[1] / "src"
IMAGES = 129  # chunks of 64, 64 and 1: in the last one, the first process has no image


def _inputs():
    torch.manual_seed(0)
    model = perturbed(SmallNet())
    images = torch.randn(IMAGES, 3, 10, 10, generator=torch.Generator().manual_seed(4)) * 1.3 + 0.2
    labels = torch.randint(0, 10, (IMAGES,), generator=torch.Generator().manual_seed(5))
    return model, images, labels


def _stages(folder: str):
    """What each process computes: exact and shift statistics, accuracy, agreement; statistics on image files."""
    model, images, labels = _inputs()
    files = open_images(folder, make_preset("imagenet", resize=10, crop=10), labeled=False)
    on_files = renormalize(model, files, chunk=8)
    exact = renormalize(model, images, chunk=64)
    shift = renormalize(model, images, mode="shift", reference=model, chunk=64)
    compressed = perturbed(SmallNet(), seed=3)
    compressed.load_state_dict({k: v for k, v in model.state_dict().items() if "running" not in k}, strict=False)
    compressed.conv2.weight.data.mul_(1.2)
    auto, chose = renormalize_with_summary(compressed, images, mode="auto", reference=model, chunk=64)
    return {"auto": {k: v for k, v in auto.state_dict().items() if "running" in k}, "chose": chose,
            "files": {k: v for k, v in on_files.state_dict().items() if "running" in k}, "skipped": files.skipped,
            "exact": {k: v for k, v in exact.state_dict().items() if "running" in k},
            "shift": {k: v for k, v in shift.state_dict().items() if "running" in k},
            "accuracy": evaluate(exact, images_with_labels(images, labels), batch_size=16),
            "agreement": evaluate(exact, images, reference=model, batch_size=16),
            "loader": evaluate(exact, list(zip(images.split(16), labels.split(16))))}


def images_with_labels(images, labels):
    from renorm.images import ImageSource

    class Labeled(ImageSource):  # an ImageSource, so that each process reads only its share
        def __len__(self):
            return len(images)

        def load(self, index):
            return images[index], int(labels[index])

    return Labeled(name="random", classes=tuple(str(i) for i in range(10)))


def _worker(rank: int, size: int, rendezvous: str, out: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        assert distributed.world_size() == size and distributed.rank() == rank
        torch.save(_stages(folder), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


def test_two_processes_give_the_statistics_and_evaluation_of_one(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(21):  # chunks of 8, 8 and 5 images; the second holds an unreadable file
        write_image(folder / f"{index:02d}.png", size=(12, 11), seed=index)
    (folder / "09.png").write_text("not an image")
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "result"), str(folder)), nprocs=2,
             join=True)
    one = _stages(str(folder))
    assert [Path(p).name for p in one["skipped"]] == ["09.png"]
    for rank in range(2):
        many = torch.load(tmp_path / f"result.{rank}")
        assert many["skipped"] == one["skipped"]  # each process names the file the other one skipped
        assert many["chose"]["chosen"] == one["chose"]["chosen"]
        assert many["chose"]["kl"] == pytest.approx(one["chose"]["kl"], rel=1e-4, abs=1e-8)
        for mode in ("files", "exact", "shift", "auto"):
            for key, value in one[mode].items():
                torch.testing.assert_close(many[mode][key], value, rtol=1e-5, atol=1e-7, msg=f"{mode} {key}")
        assert _strip(many["accuracy"]) == _strip(one["accuracy"])
        assert _strip(many["agreement"]) == pytest.approx(_strip(one["agreement"]), rel=1e-6)
        assert _strip(many["loader"]) == _strip(one["loader"]) == _strip(one["accuracy"])
        assert many["accuracy"]["images"] == many["agreement"]["images"] == many["loader"]["images"] == IMAGES


def _torchrun(*words: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "renorm.cli", *words], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_compress_and_evaluate_match_one_process(tmp_path, capsys):
    """The README's command: `torchrun --nproc-per-node 2 ... renorm compress` (here through python -m, so that
    it runs this checkout), two gloo processes on the CPU."""
    common = ["fmnist-resnet18", "--calib", "fashion-mnist-mini:train", "--num-images", str(IMAGES), "--wbits", "4",
              "--device", "cpu", "--quiet"]
    run = _torchrun("compress", *common, "--out", "two.pt", "--report", "two.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("model: fmnist-resnet18") == 1  # only the first process prints
    assert cli.main(["compress", *common, "--out", str(tmp_path / "one.pt"), "--threads", "1"]) == 0
    one = torch.load(tmp_path / "one.pt", weights_only=False)["state_dict"]
    two = torch.load(tmp_path / "two.pt", weights_only=False)["state_dict"]
    assert one.keys() == two.keys()
    for key in one:
        if "running" in key:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7, msg=key)
        else:
            assert torch.equal(two[key], one[key]), key
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["calibration"]["images_used"] == IMAGES
    assert report["runtime"] == {"device": "cpu", "threads": 1, "workers": 0, "processes": 2}

    run = _torchrun("evaluate", "two.pt", "--data", "fashion-mnist-mini:test", "--device", "cpu", "--quiet",
                    "--report", "eval-two.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "two.pt"), "--data", "fashion-mnist-mini:test", "--quiet",
                     "--threads", "1", "--report", str(tmp_path / "eval-one.json")]) == 0
    many = json.loads((tmp_path / "eval-two.json").read_text())
    single = json.loads((tmp_path / "eval-one.json").read_text())
    assert many["accuracy"] == single["accuracy"] and many["evaluation"]["images"] == single["evaluation"]["images"]
    assert (many["runtime"]["processes"], single["runtime"]["processes"]) == (2, 1)


def test_sensitivity_export_and_demo_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["sensitivity", "fmnist-resnet18", "--calib", "fashion-mnist-mini:train"]) == 2
    assert "without torchrun" in capsys.readouterr().err
    assert cli.main(["export", "fmnist-resnet18", "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "renorm export runs in one process" in capsys.readouterr().err
    assert cli.main(["demo"]) == 2
    assert "renorm demo runs in one process" in capsys.readouterr().err
