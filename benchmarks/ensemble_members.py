"""Each member of an `ensemble` run alone and together, on the run's own validation split: how much the mean of
the members adds, and how often two members disagree (docs/experiments/fast-flagship.md).

    python benchmarks/ensemble_members.py runs/fast-ensemble-seed1 --threads 2
    python benchmarks/ensemble_members.py runs/lite-pair --data DIR   # made by `cifarx combine`

Reads RUN/best.pt (the model, and the data folder and split it was validated on; --data if the images moved); no TTA.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from cifarx.data import datasets as datamod
from cifarx.data.split import ValidationSplit
from cifarx.training.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", help="the image folder (default: the one the run recorded)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, payload = load_model(args.run / "best.pt")
    config = payload["config"]
    data = args.data or config["data"]
    full = datamod.load_split(data, "train", config.get("data_root"))
    val_set = ValidationSplit.of_run(config).held_out(full, data)
    images = datamod.to_float(val_set.images)
    with torch.no_grad():
        logits = torch.cat([model.eval()(batch, members=True) for batch in images.split(200)], 1)
    predictions, labels = logits.argmax(-1), val_set.labels
    result = {"run": str(args.run), "val_images": len(labels),
              "members": [round((p == labels).float().mean().item(), 4) for p in predictions],
              "ensemble": round((logits.mean(0).argmax(-1) == labels).float().mean().item(), 4),
              "disagreement": {f"{a}/{b}": round((predictions[a] != predictions[b]).float().mean().item(), 4)
                               for a, b in itertools.combinations(range(len(predictions)), 2)}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
