"""Where a cached EfficientNet step's time goes: each depthwise convolution's forward, input gradient and weight
gradient, timed apart, in channels_last float32 (what `cifarx train` runs), batch 64.

The shapes are Lite0's trained stages at 160 px with --freeze 3 (channels, side, kernel, stride). With
ONEDNN_VERBOSE=1 in the environment oneDNN prints which kernel each pass ran; the weight gradient is the one that is
not a depthwise kernel.

    python benchmarks/depthwise_backward.py --threads 2
    ONEDNN_VERBOSE=1 python benchmarks/depthwise_backward.py --threads 2 --repeats 1 | grep backward_weights
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from runtimes import cpu_flags  # benchmarks/runtimes.py, beside this script

LITE0_LAST3_160 = [(480, 10, 5, 1), (672, 10, 5, 1), (672, 10, 5, 2), (1152, 5, 5, 1), (1152, 5, 3, 1)]


def milliseconds(call, repeats: int) -> float:
    call()  # warm-up: oneDNN builds its kernel on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return round((time.perf_counter() - start) / repeats * 1000, 2)


def time_layer(channels: int, side: int, kernel: int, stride: int, batch: int, repeats: int) -> dict:
    layout = torch.channels_last
    inputs = torch.randn(batch, channels, side, side).contiguous(memory_format=layout)
    weight = torch.randn(channels, 1, kernel, kernel).contiguous(memory_format=layout)
    geometry = dict(stride=(stride, stride), padding=(kernel // 2, kernel // 2), dilation=(1, 1), groups=channels)
    outputs = torch.nn.functional.conv2d(inputs, weight, **geometry)
    grad = torch.randn_like(outputs).contiguous(memory_format=layout)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            grad, inputs, weight, None, geometry["stride"], geometry["padding"], geometry["dilation"], False, (0, 0),
            channels, mask)

    return {"channels": channels, "side": side, "kernel": kernel, "stride": stride,
            "forward_ms": milliseconds(lambda: torch.nn.functional.conv2d(inputs, weight, **geometry), repeats),
            "input_grad_ms": milliseconds(backward((True, False, False)), repeats),
            "weight_grad_ms": milliseconds(backward((False, True, False)), repeats),
            "both_grads_ms": milliseconds(backward((True, True, False)), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [time_layer(*shape, args.batch, args.repeats) for shape in LITE0_LAST3_160]
    print(json.dumps({"batch": args.batch, "threads": args.threads, "torch": torch.__version__, **cpu_flags(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
