"""Train a reference model (torchvision resnet18 / mobilenet_v2, 10 classes) on Fashion-MNIST.

    python scripts/train_reference.py resnet18        # ~50 min on 2 CPU cores
    python scripts/train_reference.py mobilenet_v2    # ~45 min on 2 CPU cores

Input: 28x28 images zero-padded to 32x32 (the `fashion-mnist` preset), grey replicated to
RGB; torchvision's own architecture and stem, unchanged but for num_classes=10. Seeded;
needs the full data set (Debian package dataset-fashion-mnist). Writes an fp16 state_dict
to src/renorm/weights/fmnist_<arch>.pt and prints the FP32 test accuracy of that file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from renorm.data import PRESETS, fashion_mnist_arrays, fashion_mnist_available  # noqa: E402
from renorm.models import WEIGHTS_DIR, reference_architecture  # noqa: E402


def preprocess(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split through the preset transform, kept as one grey channel."""
    from PIL import Image

    images, labels, _ = fashion_mnist_arrays(split)
    transform = PRESETS["fashion-mnist"].transform()
    x = torch.stack([transform(Image.fromarray(a))[:1] for a in images])
    return x, torch.from_numpy(labels)


def augment(x: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel padded image and random horizontal flip."""
    n, size = len(x), x.shape[-1]
    padded = F.pad(x, (4, 4, 4, 4), value=background)
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(size)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(size)[None]).to(x.device)
    out = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), 500):
        batch = x[start:start + 500].to(device).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        correct += (model(batch).argmax(1).cpu() == y[start:start + 500]).sum().item()
    return 100.0 * correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=["resnet18", "mobilenet_v2"])
    parser.add_argument("--epochs", type=int, default=None, help="default: 18 for resnet18, 15 for mobilenet_v2")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not fashion_mnist_available():
        sys.exit("train_reference.py needs the full Fashion-MNIST: apt-get install dataset-fashion-mnist")
    args.epochs = args.epochs or {"resnet18": 18, "mobilenet_v2": 15}[args.arch]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name = f"fmnist-{args.arch}"
    out = args.out or WEIGHTS_DIR / f"fmnist_{args.arch}.pt"

    x_train, y_train = preprocess("train")
    x_test, y_test = preprocess("test")
    background = float(x_train.min())  # a black pixel after normalization
    model = reference_architecture(name).to(args.device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch // 2
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            batch = augment(x_train[index].to(args.device), generator, background)
            batch = batch.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(batch), y_train[index].to(args.device), label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        test = accuracy(model, x_test, y_test, args.device)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {running / steps_per_epoch:.4f}  test top1 {test:.2f}%  "
              f"{(time.time() - start) / 60:.1f} min", flush=True)
    minutes = (time.time() - start) / 60

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.cpu().state_dict().items()}
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    shipped = reference_architecture(name)
    shipped.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    fp16_top1 = accuracy(shipped.to(memory_format=torch.channels_last), x_test, y_test, "cpu")
    print(json.dumps({"model": name, "checkpoint": str(out), "fp32_top1_trained": test,
                      "top1_of_fp16_checkpoint": fp16_top1, "train_minutes": round(minutes, 1),
                      "device": args.device, "threads": args.threads, "epochs": args.epochs,
                      "seed": args.seed, "size_mb": round(out.stat().st_size / 2**20, 2)}))


if __name__ == "__main__":
    main()
