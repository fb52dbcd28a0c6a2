"""Shared fixtures: small real networks, image folders, and torch thread settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

torch.set_num_threads(2)


class SmallNet(nn.Module):
    """conv-bn-relu x2, pool, linear-bn1d-relu, dropout, linear: every BatchNorm flavour we use."""

    def __init__(self, classes: int = 10, affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, affine=affine)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16, affine=affine)
        self.fc1 = nn.Linear(16, 12)
        self.bn3 = nn.BatchNorm1d(12, affine=affine)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean((2, 3))
        x = torch.relu(self.bn3(self.fc1(x)))
        return self.fc2(self.drop(x))


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial (wrong) statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return perturbed(SmallNet())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(96, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.3


def write_image(path, size=(40, 30), mode="RGB", seed=0) -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the size and outcome of the bad-input matrix (tests/test_bad_inputs.py) after every run."""
    reports = [report for key in ("passed", "failed") for report in terminalreporter.stats.get(key, [])
               if "test_bad_inputs.py::test_bad_input[" in report.nodeid and report.when == "call"]
    if reports:
        passed = sum(report.passed for report in reports)
        terminalreporter.write_line(f"bad-input matrix: {len(reports)} cases, {passed} passed (exit 2 or RenormError, "
                                    "one line, nothing left behind, inputs unchanged)")
