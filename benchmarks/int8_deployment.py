"""The fastest faithful deployment per model on this CPU: fp32 and int8 on every runtime that has an int8 path.

    python benchmarks/int8_deployment.py --models exported/fast.onnx,exported/fast-int8.onnx --data DIR --threads 2

For each model: ONNX Runtime's QDQ int8 file (`cifarx quantize`, 512 calibration images, ends kept float32), then
one compare run of the float file on ONNX Runtime, OpenVINO and OpenVINO int8 (NNCF, 300 calibration images), and
of the QDQ file on ONNX Runtime and OpenVINO. Models with a validation split are scored on all of it; a model
trained on every image (`fast`: val_size 0) is timed and compared on training images, without accuracy.
Throughput is a ratio to ONNX Runtime fp32 of the same model and of the first model, measured in this one run.
Writes the JSON (with the CPU and its ISA flags) and prints the markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cifarx.data import datasets as datamod
from cifarx.deploy.quantize import quantize_onnx
from cifarx.io import atomic_write_json
from cifarx.measure.compare import compare_runtimes
from cifarx.process import cpu_description
from cifarx.runtimes.onnxfile import create_session, model_info, recorded_val_split

FLOAT_RUNTIMES = ["onnxruntime", "openvino", "openvino-int8"]
QDQ_RUNTIMES = ["onnxruntime", "openvino"]  # the runtimes that run ONNX Runtime's QDQ int8 files


def deployment(model: Path, data: str, batch_sizes: list[int], threads: int, repeats: int, images: int | None,
               folder: Path) -> list[dict]:
    recorded = recorded_val_split(model_info(create_session(model)))
    scored = bool(recorded["val_size"])
    measure = (dict(data=data, split="val", image_count=images) if scored else
               dict(images=datamod.load_split(data, "train").images[:images or 1000].numpy(), data=data))
    qdq = folder / f"{model.stem}.qdq.onnx"
    quantize_onnx(model, qdq, data=data, calibration_count=512)
    common = dict(batch_sizes=batch_sizes, threads=threads, warmup=3, repeats=repeats, **measure)
    rows = compare_runtimes([model], FLOAT_RUNTIMES, **common)["rows"]
    rows += [{**row, "quantiser": "onnxruntime.quantization (QDQ)"}
             for row in compare_runtimes([qdq], QDQ_RUNTIMES, **common)["rows"]]
    for row in rows:
        row["model"] = model.name
        if row["runtime"] == "openvino-int8":
            row["quantiser"] = "nncf.quantize"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="exported/fast.onnx,exported/fast-int8.onnx")
    parser.add_argument("--data", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--images", type=int, default=0, help="validation images scored per model (a fixed sample; "
                        "0 = the whole split)")
    parser.add_argument("--out", default="docs/results/int8-deployment.json")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models.split(","):
            rows += deployment(Path(model), args.data, batch_sizes, args.threads, args.repeats, args.images or None,
                               Path(folder))
    big = str(max(batch_sizes))
    baseline = {}  # ONNX Runtime fp32 of each model, and of the first model (the reference of every ratio)
    for row in rows:
        if row["status"] == "ok" and row["runtime"] == "onnxruntime" and row["precision"] == "float32":
            baseline[row["model"]] = row["latency"][big]["images_per_s"]
    first = next(iter(baseline.values()))
    for row in rows:
        if row["status"] == "ok":
            speed = row["latency"][big]["images_per_s"]
            row["ratio_to_own_fp32"] = round(speed / baseline[row["model"]], 2)
            row["ratio_to_first_fp32"] = round(speed / first, 2)
    command = ["DIR" if previous == "--data" else word for previous, word in zip(["", *sys.argv], sys.argv)]
    result = {"command": " ".join(["python", *command]),  # the data folder is this machine's: DIR "environment": cpu_description(), "threads": args.threads,
              "batch_sizes": batch_sizes, "rows": rows}
    atomic_write_json(args.out, result)
    cpu = result["environment"]
    print(f"{cpu['cpu']} ({', '.join(cpu['isa_flags'])}), {args.threads} threads\n")
    print(f"| model | runtime | precision | accuracy | top-1 agreement with ORT on the same file | b1 p50 ms | b{big} images/s | "
          f"x own ORT fp32 | x first ORT fp32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["status"] != "ok":
            print(f"| {row['model']} | {row['runtime']} | {row['precision']} | {row['status']} |||||")
            continue
        accuracy = f"{row['accuracy']:.2%}" if "accuracy" in row else "(no validation split)"
        print(f"| {row['model']} | {row['runtime']} | {row['precision']} | {accuracy} | "
              f"{row['agreement']['top1_agreement']:.2%} | {row['latency'][str(batch_sizes[0])]['p50_ms']:.2f} | "
              f"{row['latency'][big]['images_per_s']:.0f} | {row['ratio_to_own_fp32']:.2f}x | {row['ratio_to_first_fp32']:.2f}x |")
    print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
    main()
