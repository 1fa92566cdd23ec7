"""How often a two-rank gloo training job ends badly: tests/test_distributed.py's torchrun run, repeated.

The job trains simple-cnn-plain for 3 epochs on a small synthetic image folder (80 training images), as the test
does; `--busy N` starts N processes that spin on the CPU beside it, which is how a loaded CI machine made a rank
abort at exit ("terminate called without an active exception", docs/distributed.md). Prints each run's exit code
and time and, for a failed run, the tail of its stderr; ends with the count of failures.

    python benchmarks/torchrun_exit.py --runs 120 --busy 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import make_image_folder  # noqa: E402  the tests' synthetic images, not CIFAR-10's
from tests.test_distributed import OPTIONS  # noqa: E402  the test's own settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--busy", type=int, default=3, help="CPU-spinning processes beside the job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = make_image_folder(root / "data", "train", per_class=24)
        env = dict(os.environ, OMP_NUM_THREADS="1", CIFARX_CACHE=str(root / "cache"))
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        failures = 0
        try:
            for run in range(args.runs):
                start = time.perf_counter()
                job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                      "2", "-m", "cifarx", "train", "--data", str(data), "--out", str(root / f"run{run}"),
                                      *OPTIONS], env=env, capture_output=True, text=True, timeout=600)
                failures += job.returncode != 0
                print(f"run {run}: exit code {job.returncode}, {time.perf_counter() - start:.1f} s", flush=True)
                if job.returncode:
                    print(job.stderr[-3000:], flush=True)
        finally:
            for process in busy:
                process.kill()
    print(f"{failures} of {args.runs} runs failed ({args.busy} busy processes beside them)")


if __name__ == "__main__":
    main()
