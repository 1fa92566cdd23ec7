"""CPU time per image of a --freeze N training step, with and without the cached prefix, and of one prefix pass.

Lite0 or Lite2 (--model; the packages' weights) at --img-size, batch 32, one thread, process CPU time (robust to other
jobs sharing the cores, though not to their cache pressure; with --threads 2 it sums both cores'). Prints one line.
--channels-last, --precision bfloat16 (autocast) and --freeze-depthwise (`cifarx train --freeze-depthwise`) price the
levers of the cached step.

    nice -n 19 python benchmarks/prefix_step_cost.py --img-size 160 --freeze 2
    nice -n 19 python benchmarks/prefix_step_cost.py --model lite2 --img-size 160 --freeze 3
    python benchmarks/prefix_step_cost.py --freeze 3 --batch 64 --threads 2 --channels-last [--freeze-depthwise]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from runtimes import cpu_flags  # benchmarks/runtimes.py, beside this script

from cifarx.models.transfer import WEIGHTS_PACKAGES, create_timm_classifier
from cifarx.training.prefix_cache import FromPrefix


def cpu_ms_per_image(step, batch: int, repeats: int = 3) -> float:
    step()  # warm-up: allocator and kernel choice
    start = time.process_time()
    for _ in range(repeats):
        step()
    return round((time.process_time() - start) / repeats / batch * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    packages = {package.extra: package for package in WEIGHTS_PACKAGES}
    parser.add_argument("--model", choices=sorted(packages), default="lite0")
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--freeze", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--freeze-depthwise", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    package = packages[args.model]
    model = create_timm_classifier(package.models[0], num_classes=10, img_size=args.img_size,
                                   weights=package.name, freeze=args.freeze,
                                   freeze_depthwise=args.freeze_depthwise).train()
    images, labels = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)
    with torch.no_grad():
        activations = model.forward_prefix(images).contiguous(memory_format=layout)

    def step(net, inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
            loss = torch.nn.functional.cross_entropy(net(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    print(json.dumps({
        "model": args.model, "img_size": args.img_size, "freeze": args.freeze, "batch": args.batch,
        "threads": args.threads, "channels_last": args.channels_last, "precision": args.precision,
        "freeze_depthwise": args.freeze_depthwise, **cpu_flags(),
        "whole_model_step_ms": cpu_ms_per_image(lambda: step(model, images), args.batch),
        "cached_prefix_step_ms": cpu_ms_per_image(lambda: step(FromPrefix(model), activations), args.batch),
        "prefix_pass_ms": cpu_ms_per_image(lambda: torch.no_grad()(model.forward_prefix)(images), args.batch),
    }))


if __name__ == "__main__":
    main()
