"""What the cache dtype of `--freeze N --cached-features` costs: logits from float16/bfloat16/float32 prefix caches
against the whole float32 model, on held-out images, for the shipped Lite0 linear-probe head.

The head is read from `exported/efficientnet-lite0.onnx` (trained on the package's frozen backbone at its img_size),
the backbone from the PyPI package, so the comparison is of a trained classifier, not of a zero head. Images: the
first N of the run's own validation split (never trained on). Prints one JSON object.

    nice -n 19 python benchmarks/prefix_cache_dtype.py --data ~/cifar10-jpeg --images 200 --freeze 2
"""

from __future__ import annotations

import argparse
import json
import time

import onnx
import torch
from onnx import numpy_helper

from cifarx.data import datasets as datamod
from cifarx.data.split import ValidationSplit
from cifarx.models.transfer import WEIGHTS_PACKAGES, create_timm_classifier
from cifarx.training.config import CACHE_DTYPES
from cifarx.training.prefix_cache import FromPrefix, compute_prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--onnx", default="exported/efficientnet-lite0.onnx")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--freeze", type=int, default=2)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    proto = onnx.load(args.onnx)
    metadata = {p.key: p.value for p in proto.metadata_props}
    head = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer
            if i.name.startswith("model.backbone.classifier.")}
    split = json.loads(metadata["val_split"])
    model = create_timm_classifier(metadata["model_name"].removeprefix("timm/"), num_classes=len(head[
        "model.backbone.classifier.bias"]), img_size=int(metadata["resize_to"]), weights=WEIGHTS_PACKAGES[0].name,
        freeze=args.freeze).eval()
    model.get_classifier().weight.data.copy_(head["model.backbone.classifier.weight"])
    model.get_classifier().bias.data.copy_(head["model.backbone.classifier.bias"])
    full = datamod.load_split(args.data, "train")
    _, val_index = ValidationSplit(split["val_size"], split["seed"]).indices(full, args.data)
    images, labels = full.images[val_index[: args.images]], full.labels[val_index[: args.images]]
    start = time.perf_counter()
    with torch.no_grad():
        reference = torch.cat([model(datamod.to_float(images[i:i + 50])) for i in range(0, len(images), 50)])
        exact = compute_prefix(model, images, torch.device("cpu"), torch.float32, flip=False)
        result = {"images": len(images), "freeze": args.freeze, "img_size": model.resize_to,
                  "prefix_shape": list(exact.shape[1:]),
                  "float32_model_accuracy": (reference.argmax(1) == labels).float().mean().item()}
        for name, dtype in ((name, getattr(torch, name)) for name in CACHE_DTYPES):
            logits = FromPrefix(model).eval()(exact.to(dtype))
            result[name] = {"accuracy": (logits.argmax(1) == labels).float().mean().item(),
                            "top1_agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
                            "max_abs_logit_delta": (logits - reference).abs().max().item(),
                            "logit_scale": reference.abs().max().item()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
