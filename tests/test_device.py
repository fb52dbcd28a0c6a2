"""Where the work runs: threads, image-decoding workers, devices, dtypes, and state that moves with .to()."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import SmallNet, perturbed, write_image
from renorm import device as runtime
from renorm.data import Batches, iter_batches, make_preset, open_images, sample
from renorm.errors import RenormError
from renorm.evaluate import evaluate
from renorm.renormalize import renormalize

SMALL = make_preset("imagenet", resize=12, crop=12)


@pytest.fixture
def photo_folder(tmp_path):
    """Two classes of 23 images each, and one unreadable file among them."""
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(23):
            write_image(tmp_path / label / f"{index:02d}.png", size=(20 + index % 5, 16), seed=index + 100 * (label == "b"))
    (tmp_path / "a" / "07x.png").write_text("not an image")
    return tmp_path


@pytest.fixture
def loaders(monkeypatch):
    """The num_workers of every DataLoader built while the test runs (the workers really decode)."""
    built = []
    original = torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        built.append(kwargs.get("num_workers", 0))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", spy)
    return built


def test_workers_give_the_same_batches_in_the_same_order_and_skip_the_same_files(photo_folder, loaders):
    serial = sample(open_images(str(photo_folder), SMALL, workers=0), 40, seed=3)
    parallel = sample(open_images(str(photo_folder), SMALL, workers=2), 40, seed=3)
    assert parallel.workers == 2 and serial.workers == 0
    one = list(iter_batches(serial, 7))
    two = list(iter_batches(parallel, 7))
    assert [len(x) for x, _ in one] == [len(x) for x, _ in two] == [7] * 5 + [4]  # 39 readable of 40
    for (x1, y1), (x2, y2) in zip(one, two):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert serial.skipped == parallel.skipped and len(serial.skipped) == 1
    assert loaders == [2]  # the parallel pass decoded in two worker processes; the serial one in none


def test_workers_give_identical_statistics_and_accuracy(photo_folder, loaders):
    torch.manual_seed(0)
    model = perturbed(SmallNet(classes=2))
    results = []
    for workers in (0, 2):
        calib = sample(open_images(str(photo_folder), SMALL, labeled=False, workers=workers), 30, seed=1)
        renormalized = renormalize(model, calib, batch_size=8, chunk=16)
        labeled = open_images(str(photo_folder), SMALL, labeled=True, workers=workers)
        results.append((renormalized.state_dict(), evaluate(renormalized, labeled, batch_size=8)))
    (state0, metrics0), (state2, metrics2) = results
    assert loaders and set(loaders) == {2}  # workers=2 passes went through worker processes
    for key in state0:
        assert torch.equal(state0[key], state2[key]), key
    assert {k: v for k, v in metrics0.items() if k != "seconds"} == {k: v for k, v in metrics2.items() if k != "seconds"}


def test_default_workers_none_for_images_in_memory_some_for_files(photo_folder):
    assert open_images("fashion-mnist-mini:test", make_preset("fashion-mnist"), workers=None).workers == 0
    assert open_images(str(photo_folder), SMALL, workers=None).workers == runtime.default_workers(False)
    assert runtime.default_workers(False, threads_used=1) == 0
    assert runtime.default_workers(False, threads_used=3) == 2
    assert runtime.default_workers(False, threads_used=64) == 4
    with pytest.raises(RenormError, match="--workers"):
        open_images(str(photo_folder), SMALL, workers=-1)


# --------------------------------------------------------------------------- quantization state moves with .to()
def _quantized_net():
    from renorm.prune import PruneConfig, prune
    from renorm.quantize.weights import WeightQuantConfig, quantize_weights

    torch.manual_seed(0)
    model = perturbed(SmallNet())
    pruned, _ = prune(model, PruneConfig(0.5), example=torch.randn(2, 3, 8, 8))
    return model, quantize_weights(pruned, WeightQuantConfig(4, "pow2"))


def test_codes_scales_and_masks_are_buffers_that_follow_to_and_keep_their_values():
    from renorm.quantize.weights import ATTRIBUTE, MASK_ATTRIBUTE

    model, quantized = _quantized_net()
    assert set(quantized.state_dict()) == set(model.state_dict())  # the float model's keys, nothing added
    layer = quantized.conv2
    record = getattr(layer, ATTRIBUTE)
    buffers = {name for name, _ in quantized.named_buffers()}
    assert {"conv2._renorm_quantized.codes", "conv2._renorm_quantized.scale", "conv2._renorm_mask"} <= buffers
    codes, scale, mask = record.codes.clone(), record.scale.clone(), getattr(layer, MASK_ATTRIBUTE).clone()
    quantized.to(torch.float64)
    assert record.scale.dtype == torch.float64 and layer.weight.dtype == torch.float64
    assert torch.equal(record.dequantize(), layer.weight)  # still the weights' own codes, in float64
    quantized.to(torch.float32)
    moved = copy.deepcopy(quantized).to("cpu")
    moved_record = getattr(moved.conv2, ATTRIBUTE)
    assert torch.equal(moved_record.codes, codes) and moved_record.codes.dtype == torch.int8
    assert torch.equal(moved_record.scale, scale) and moved_record.scale.dtype == torch.float32
    assert torch.equal(getattr(moved.conv2, MASK_ATTRIBUTE), mask)
    assert torch.equal(moved_record.dequantize(), moved.conv2.weight)
    assert moved_record.bits == 4 and moved_record.scheme == "pow2"


def test_quantization_state_moves_to_another_device_with_the_model():
    from renorm.quantize.weights import ATTRIBUTE, MASK_ATTRIBUTE

    _, quantized = _quantized_net()
    quantized.to("meta")  # no GPU here: the meta device stands for one (its tensors hold no values)
    assert getattr(quantized.conv2, ATTRIBUTE).codes.device.type == "meta"
    assert getattr(quantized.conv2, ATTRIBUTE).scale.device.type == "meta"
    assert getattr(quantized.conv2, MASK_ATTRIBUTE).device.type == "meta"


# --------------------------------------------------------------------------- helper tensors on the data's device
def test_no_stage_creates_a_helper_tensor_on_the_default_device():
    """With meta as the default device and the model and images on the CPU, a helper tensor created
    without device= lands on meta and the stage fails: each must place its tensors beside the data,
    as on a GPU."""
    from renorm.prune import PruneConfig, prune
    from renorm.quantize.activations import ActivationQuantConfig, calibrate_activations
    from renorm.quantize.weights import WeightQuantConfig, quantize_weights
    from renorm.reconstruct import ReconstructConfig, reconstruct

    torch.manual_seed(0)
    model = perturbed(SmallNet())
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(3))
    with torch.device("meta"):
        pruned, _ = prune(model, PruneConfig(0.3), example=x[:4])
        for scheme in ("pow2", "uniform"):
            quantized = quantize_weights(pruned, WeightQuantConfig(4, scheme), example=x[:1])
        quantized = reconstruct(quantized, pruned, x, ReconstructConfig(method="gptq", num_images=40))
        exact = renormalize(quantized, x, chunk=16)
        renormalize(quantized, x, mode="shift", reference=model, chunk=16)
        final = calibrate_activations(exact, x, ActivationQuantConfig(8, 40))
        metrics = evaluate(final, [(x, y)], reference=model)
    assert exact.bn1.running_mean.device.type == "cpu" and metrics["images"] == 40


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_refused_with_the_fix(dtype):
    from renorm.api import Config, compress

    with pytest.raises(RenormError, match=r"model\.float\(\)"):
        compress(SmallNet().to(dtype), torch.randn(8, 3, 8, 8), Config(wbits=4))


# --------------------------------------------------------------------------- the command line
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(capsys, monkeypatch):
    from renorm import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["evaluate", "fmnist-resnet18", "--data", "fashion-mnist-mini:test", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device cpu" in err and "no CUDA GPU" in err
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RenormError, match="not a device"):
        runtime.resolve_device("tpu")


def test_every_stage_runs_with_device_cpu(tmp_path, photo_folder, capsys):
    from renorm import cli

    torch.manual_seed(0)
    torch.save(perturbed(SmallNet(classes=2)), tmp_path / "small.pt")
    model = [str(tmp_path / "small.pt"), "--trust-pickle", "--resize", "12", "--crop", "12", "--quiet",
             "--device", "cpu", "--threads", "1", "--workers", "1"]
    out = tmp_path / "model.pt"
    code = cli.main(["compress", *model, "--calib", str(photo_folder), "--eval", str(photo_folder),
                     "--num-images", "32", "--wbits", "4", "--abits", "8", "--act-images", "16", "--reconstruct",
                     "--reconstruct-images", "16", "--prune", "0.3", "--out", str(out)])
    assert code == 0 and out.exists() and "| + activation quantization |" in capsys.readouterr().out
    code = cli.main(["evaluate", str(out), "--trust-pickle", "--data", str(photo_folder), "--device", "cpu",
                     "--quiet"])
    assert code == 0 and "| model |" in capsys.readouterr().out


# --------------------------------------------------------------------------- threads
def test_default_threads_honour_omp_num_threads_and_the_affinity_mask(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert runtime.default_threads() == 4  # an idle machine: every core of the mask
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (5.6, 0.0, 0.0))
    assert runtime.default_threads() == 2  # 6 of 8 cores busy elsewhere
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (20.0, 0.0, 0.0))
    assert runtime.default_threads() == 1
    # The load average lags a minute; threads of other processes running right now count too.
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    monkeypatch.setattr(runtime, "_running_now", lambda: (8, 1))  # 7 running elsewhere, 1 of ours
    assert runtime.default_threads() == 1
    monkeypatch.setattr(runtime, "_running_now", lambda: (4, 1))
    assert runtime.default_threads() == 4  # 3 busy of 8: the 4 cores of the mask are free
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(runtime, "_running_now", lambda: (3, 2))  # two renorm commands started together
    assert runtime.default_threads() == 1
    monkeypatch.setattr(runtime, "_running_now", lambda: None)  # no /proc: the load average alone
    assert runtime.default_threads() == 2


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux's /proc")
def test_a_process_spinning_now_counts_as_busy():
    assert runtime._running_now()[1] >= 1  # this thread is running while it reads
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert runtime.running_elsewhere() >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_auto_threads_are_chosen_again_at_every_stage_and_restored_after(monkeypatch):
    """Config(threads="auto") (the CLI without --threads): a process started during a long stage is seen
    at the next one. Each stage runs with the count chosen at its start, which its report records."""
    from renorm import api

    answers, chosen, seen = iter([1, 2] * 10), [], {}

    def choose():
        chosen.append(next(answers))
        return chosen[-1]

    def spying(name, function):
        def wrapper(*args, **kwargs):
            seen[name] = torch.get_num_threads()
            return function(*args, **kwargs)
        monkeypatch.setattr(api, name, wrapper)

    monkeypatch.setattr(api, "default_threads", choose)
    spying("quantize_weights", api.quantize_weights)
    spying("renormalize_with_summary", api.renormalize_with_summary)
    torch.manual_seed(0)
    images = torch.randn(24, 3, 12, 12)
    before = torch.get_num_threads()
    report = api.compress(perturbed(SmallNet(classes=2)), images, api.Config(wbits=4, abits=8, num_images=24,
                          act_images=8, threads="auto"), eval_data=images).report
    stages = report["stages"]
    assert len(stages) == len(chosen) >= 5 and [record["threads"] for record in stages.values()] == chosen
    assert seen == {"quantize_weights": stages["quantize"]["threads"],
                    "renormalize_with_summary": stages["renormalize"]["threads"]}
    assert torch.get_num_threads() == before
    # a fixed count is set once and not recorded per stage
    report = api.compress(perturbed(SmallNet(classes=2)), images, api.Config(wbits=4, num_images=24, threads=1)).report
    assert all("threads" not in record for record in report["stages"].values()) and len(chosen) == len(stages)
    for wrong in (0, "many", 1.5, True):
        with pytest.raises(RenormError, match="threads"):
            api.Config(threads=wrong)


def test_the_cli_chooses_threads_at_every_stage_unless_threads_is_given(tmp_path, photo_folder):
    from renorm import cli
    import json

    torch.manual_seed(0)
    torch.save(perturbed(SmallNet(classes=2)), tmp_path / "small.pt")
    base = ["compress", str(tmp_path / "small.pt"), "--trust-pickle", "--resize", "12", "--crop", "12", "--quiet",
            "--calib", str(photo_folder), "--num-images", "16", "--workers", "0"]
    assert cli.main([*base, "--report", str(tmp_path / "auto.json")]) == 0
    assert cli.main([*base, "--threads", "1", "--report", str(tmp_path / "one.json")]) == 0
    auto, one = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("auto", "one"))
    assert auto["config"]["threads"] == "auto" and all(r["threads"] >= 1 for r in auto["stages"].values())
    assert one["config"]["threads"] == 1 and one["runtime"]["threads"] == 1
    assert all("threads" not in record for record in one["stages"].values())


def test_threads_are_set_for_the_block_and_restored():
    before = torch.get_num_threads()
    with runtime.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RenormError, match="--threads"):
        with runtime.threads(0):
            pass


def test_under_torchrun_cuda_takes_the_local_rank_and_cuda_n_is_used_as_given(monkeypatch):
    """README: with --device cuda (or auto) each process takes cuda:LOCAL_RANK; an explicit cuda:N is used as given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.resolve_device("cuda") == runtime.resolve_device("auto") == torch.device("cuda:1")
    assert runtime.resolve_device("cuda:0") == torch.device("cuda:0")
