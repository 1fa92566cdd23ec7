"""Training throughput: cifarx's tensor data path against a plain DataLoader + torchvision transforms pipeline.

Same network, batch size, optimiser and augmentation (random translate by padding+crop, horizontal flip) in the
same run, on the same device. Reports images/s of the training step alone (one batch reused; in float32 and with
the forward pass autocast to bfloat16, as `cifarx train --precision bfloat16`), and of whole
training steps fed by each data path, with the time each path spends waiting for data.

    python benchmarks/train_speed.py --data ~/cifar10-jpeg --device cpu --steps 20
    python benchmarks/train_speed.py --data ~/cifar10-jpeg --device cuda --steps 200   # the seed's GPU question
    python benchmarks/train_speed.py --data ~/cifar10-jpeg --batch-size 512 --steps 12  # images/s against the batch
    python benchmarks/train_speed.py --data ~/cifar10-jpeg --model timm/efficientnet_lite0 --model-arg img_size=128 \\
        --model-arg pretrained=false --batch-size 64 --steps 6     # is bfloat16 faster for this network here?
    python benchmarks/train_speed.py --data ~/cifar10-jpeg --model timm/efficientnet_lite0 --model-arg img_size=128 \
        --model-arg pretrained=false --batch-size 64 --steps 6 --set channels_last=false   # against the default (true)
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from cifarx.data import datasets as datamod
from cifarx.training.batches import split_train_val, training_batches
from cifarx.training.config import make_train_config
from cifarx.training.optimiser import build_optimizer
from cifarx.process import keep_freed_memory, machine
from cifarx.models.registry import create_model


def timed_steps(model, optimizer, batches, steps, device, channels_last, label_smoothing, dtype=torch.float32):
    """Run `steps` training steps from an iterator of batches, the forward pass autocast to `dtype` as `cifarx train
    --precision` does; returns (seconds total, seconds waiting for data,
    page faults per step, kernel CPU seconds per step) of this process."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    waiting, start = 0.0, time.perf_counter()
    iterator = iter(batches)
    for _ in range(steps):
        fetch = time.perf_counter()
        images, labels = next(iterator)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sync()
        waiting += time.perf_counter() - fetch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    seconds, usage = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return (seconds, waiting, (usage.ru_minflt - usage_before.ru_minflt) / steps,
            (usage.ru_stime - usage_before.ru_stime) / steps)


def torchvision_batches(train_set, config, workers):
    """The way the seed reports train: per-image torchvision transforms in DataLoader worker processes."""
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.RandomCrop(32, padding=config.crop_padding, padding_mode=config.translate_mode),
        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
    ])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_set)

        def __getitem__(self, i):
            return transform(train_set.images[i]), train_set.labels[i]

    loader = torch.utils.data.DataLoader(Images(), batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    while True:
        yield from loader


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="another network under the preset's recipe, e.g. timm/efficientnet_lite0")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="for the model builder, the value as JSON (img_size=128, pretrained=false)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="any other training setting, as `cifarx train --set` (e.g. channels_last=false)")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch (a CPU's images/s barely depends on it)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 3 warm-up steps)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision baseline")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (measures what cifarx.process.keep_freed_memory saves)")
    args = parser.parse_args()

    batch = {"batch_size": args.batch_size} if args.batch_size else {}
    model_args = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.model_arg)}
    settings = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.settings)}
    config = make_train_config(args.preset, settings={**settings, **batch}, model_args=model_args, model=args.model, data=args.data,
                               device=args.device, val_size=5000)
    kept = False if args.default_malloc else keep_freed_memory()  # as `cifarx train` does; DataLoader workers inherit it
    device = torch.device(args.device)
    train_set, _ = split_train_val(config)
    model = create_model(config.model, **config.model_kwargs).to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if hasattr(model, "init_whitening"):
        model.init_whitening(datamod.to_float(train_set.images[:5000]).to(device))
    optimizer = build_optimizer(model, config)
    smoothing = config.label_smoothing

    def measure(batches, dtype=torch.float32):
        timed_steps(model, optimizer, batches, 3, device, config.channels_last, smoothing, dtype)  # warm-up
        return timed_steps(model, optimizer, batches, args.steps, device, config.channels_last, smoothing, dtype)

    fixed = next(training_batches(train_set, config, 0, device, train_set.images.to(device)))
    step_only, _, step_faults, step_kernel_seconds = measure(iter(lambda: fixed, None))
    step_only_bf16, _, _, _ = measure(iter(lambda: fixed, None), torch.bfloat16)  # --precision bfloat16
    ours, ours_wait, _, _ = measure(training_batches(train_set, config, 0, device, train_set.images.to(device)))
    baseline, baseline_wait, _, _ = measure(torchvision_batches(train_set, config, args.workers))
    images = args.steps * config.batch_size
    result = {
        **machine(), "device": args.device, "model": config.model, "batch_size": config.batch_size,
        "keep_freed_memory": kept, "channels_last": config.channels_last,
        "steps": args.steps,
        "step_only_images_per_s": round(images / step_only, 1),
        "step_only_bfloat16_images_per_s": round(images / step_only_bf16, 1),
        "bfloat16_speedup": round(step_only / step_only_bf16, 2),
        "step_only_page_faults_per_step": round(step_faults), "step_only_kernel_seconds_per_step": round(step_kernel_seconds, 3),
        "cifarx_images_per_s": round(images / ours, 1), "cifarx_data_fraction": round(ours_wait / ours, 4),
        "torchvision_images_per_s": round(images / baseline, 1), "torchvision_data_fraction": round(baseline_wait / baseline, 4),
        "speedup_vs_torchvision": round(baseline / ours, 2),
        "epoch_seconds_cifarx": round(len(train_set) / (images / ours), 1),
        "epoch_seconds_torchvision": round(len(train_set) / (images / baseline), 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        from cifarx.io import atomic_write_json

        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
