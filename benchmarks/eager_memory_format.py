"""PyTorch eager inference of a trained run in contiguous (NCHW) and channels_last memory: images/s of each and their
ratio, measured in one process (why `cifarx combine` validates in channels_last).

    python benchmarks/eager_memory_format.py runs/bench-frontier-d/lite2-last3-160-crop-cutout12 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from runtimes import cpu_flags  # benchmarks/runtimes.py, beside this script

from cifarx.training.checkpoint import load_model


@torch.no_grad()
def images_per_second(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    model(images[:8])  # warm-up: allocator and kernel choice
    start = time.perf_counter()
    for _ in range(repeats):
        model(images)
    return repeats * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="as cifarx combine's validation batches")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.run)
    model.eval()
    images = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    contiguous = images_per_second(model, images, args.repeats)
    model.to(memory_format=torch.channels_last)
    channels_last = images_per_second(model, images.contiguous(memory_format=torch.channels_last), args.repeats)
    result = {**cpu_flags(), "threads": args.threads, "run": str(args.run), "batch": args.batch,
              "images_per_s_contiguous": round(contiguous, 1), "images_per_s_channels_last": round(channels_last, 1),
              "channels_last_speedup": round(channels_last / contiguous, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
