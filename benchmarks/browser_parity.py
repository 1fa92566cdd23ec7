"""Build a report of exported models with sample images, open it in headless Chromium, and compare the browser's
predictions (onnxruntime-web, WebAssembly, 1 thread) with ONNX Runtime Python's on the same images, with each
side's per-image latency.

    python benchmarks/browser_parity.py exported --samples /tmp/samples --site /tmp/site \
        [--evals /tmp/evals/*.json] --screenshot docs/report-overview.png --json benchmarks/results/browser_parity.json

Python's latency: ONNX Runtime CPU, 1 intra-op thread (as the browser's single WebAssembly thread), batch 1, p50
of 50 timed runs after 5 warm-ups. The browser's: the p50 over the samples of one timed `session.run` each, after an
untimed warm-up run per model.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from cifarx.report.browser import open_report
from cifarx.runtimes.measuring import measure_latency
from cifarx.io import atomic_write_json
from cifarx.runtimes.onnxfile import create_session, model_info
from cifarx.runtimes.predict import load_images, predict
from cifarx.report.site import build_report, find_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help=".onnx files or folders of them")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--samples-per-class", type=int)
    parser.add_argument("--evals", nargs="*", default=[], help="`cifarx eval --json` results for the table")
    parser.add_argument("--site", required=True, help="folder the report is built in")
    parser.add_argument("--screenshot", help="PNG of the report's overview section")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    built = build_report(args.models, args.site, evals=args.evals, samples=args.samples, samples_per_class=args.samples_per_class)
    seen = open_report(args.site, screenshot=args.screenshot)
    samples = find_samples(args.samples, args.samples_per_class)
    images = [path for _, path in samples]
    pixels = (load_images(images) * 255).round().astype(np.uint8)
    rows = []
    for name in seen["table_rows"]:
        browser = {r["image"]: r for r in seen["results"] if r["model"] == name}
        if not browser:
            continue  # a file the report marked as not a cifarx export
        model_file = Path(args.site) / "models" / f"{name}.onnx"
        python = predict(model_file, images, top_k=1)
        agree = sum(browser[label]["predicted"] == result["top"][0][0] for (label, _), result in zip(samples, python))
        delta = max(abs(browser[label]["probability"] - result["top"][0][1]) for (label, _), result in zip(samples, python))
        session = create_session(model_file, "cpu", threads=1)
        python_ms = measure_latency(session, model_info(session), pixels, [1], "cpu", warmup=5, repeats=50)["1"]["p50_ms"]
        rows.append({"model": name, "images": len(samples), "agree": agree, "max_abs_top1_probability_delta": delta,
                     "browser_p50_ms": statistics.median(r["ms"] for r in browser.values()),
                     "python_p50_ms": python_ms})
    print("| model | browser = Python (top-1) | max abs delta, top-1 probability | browser ms/image (p50) | Python ms/image (p50) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['agree']}/{r['images']} | {r['max_abs_top1_probability_delta']:.1e} | "
              f"{r['browser_p50_ms']:.1f} | {r['python_p50_ms']:.2f} |")
    print(seen["status"])
    if args.json:
        atomic_write_json(args.json, {"report": built, "status": seen["status"], "rows": rows})


if __name__ == "__main__":
    main()
