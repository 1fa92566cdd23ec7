"""A runtime other than ONNX Runtime, converted, loaded and measured in a fresh child interpreter.

A converter or runtime that crashes (OpenCV 5.0 segfaulted on `fast.onnx`'s GELU), hangs or refuses a file gives
`{"failed": why}` with its own one-line reason, and cifarx goes on with the next row. Requests and answers cross
the pipe as .npz (numbers and a JSON dict, never pickles).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from cifarx.errors import CifarxError
from cifarx.runtimes.measuring import batched_outputs, run_latency
from cifarx.runtimes.table import RUNTIMES, require, version

CHILD_TIMEOUT_S = 3600  # a runtime that hangs (rather than crashes) is reported after this long


def load_adapter(spec: str):
    """The adapter a row names: "module" or "module:Object" (an object with the adapter's functions)."""
    import importlib

    module, _, name = spec.partition(":")
    adapter = importlib.import_module(module)
    return getattr(adapter, name) if name else adapter


def _convert_here(adapter, path: Path, out_dir: Path, calibration: np.ndarray | None) -> tuple[list[Path], float]:
    """The adapter's converter on `path` into `out_dir` (a quantiser: calibrated on `calibration`); a runtime that
    reads ONNX itself takes the file as it is."""
    if not hasattr(adapter, "convert"):
        return [path], 0.0
    start = time.perf_counter()
    given = () if calibration is None else (calibration,)
    artifacts = [Path(artifact) for artifact in adapter.convert(path, out_dir, *given)]
    return artifacts, time.perf_counter() - start


def _measure_here(adapter: str, runtime: str, path: str, images: np.ndarray | None, batch_sizes: list[int],
                  threads: int | None, warmup: int, repeats: int, dtype: str, out_dir: str,
                  calibration: np.ndarray | None = None) -> tuple[dict, dict]:
    """Convert (if the runtime needs it), load, then outputs on `images` and latency per batch size, here."""
    adapter = load_adapter(adapter)
    artifacts, convert_seconds = _convert_here(adapter, Path(path), Path(out_dir), calibration)
    fields = {"runtime": runtime, "version": version(runtime), "threads": threads,
              "artifacts": [artifact.name for artifact in artifacts],
              "artifact_bytes": sum(artifact.stat().st_size for artifact in artifacts)}
    if hasattr(adapter, "convert"):
        fields.update(convert_seconds=round(convert_seconds, 3), converter=adapter.CONVERTER,
                      converter_version=adapter.versions().get("converter"))
    if calibration is not None:
        fields["calibration_images"] = len(calibration)
    if images is None:  # conversion only (`cifarx convert`)
        return {}, fields
    run, fields["device"] = adapter.open_runtime(artifacts[0], threads)
    dtype = np.dtype(dtype).type
    logits, probabilities = batched_outputs(run, images, dtype)
    fields["latency"] = run_latency(run, images, batch_sizes, warmup, repeats, dtype)
    return {"logits": logits, "probabilities": probabilities}, fields


def _pack(arrays: dict[str, np.ndarray], fields: dict) -> bytes:
    """Arrays plus a JSON dict as one .npz, the child channel's format both ways (numbers only, never pickles)."""
    import io
    import json

    buffer = io.BytesIO()
    np.savez(buffer, fields=np.array(json.dumps(fields)), **arrays)
    return buffer.getvalue()


def _unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    import io
    import json

    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files if name != "fields"}, json.loads(str(archive["fields"]))


def one_line(error: BaseException) -> str:
    """An exception as the one line a failed row shows: its last non-empty line (a converter's own reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def serve_child() -> None:
    """The child's side of `run_in_child`: the request (.npz) on stdin, the result (.npz) on stdout."""
    import os
    import sys

    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the runtime prints goes to stderr, never into the answer
    arrays, request = _unpack(sys.stdin.buffer.read())
    try:
        result = _measure_here(images=arrays.get("images"), calibration=arrays.get("calibration"), **request)
    except Exception as error:  # the runtime's or converter's own error, as one line for the row
        result = ({}, {"failed": one_line(error)})
    answer.write(_pack(*result))
    answer.close()


def describe_exit(code: int | None, timeout: float = CHILD_TIMEOUT_S) -> str:
    """`killed by signal 11 (SIGSEGV)` for a negative exit code, `exited with code N` otherwise."""
    if code is None:
        return f"no answer within {timeout:g} s (killed)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code}"


def run_in_child(runtime: str, path: str | Path, images: np.ndarray | None, batch_sizes: list[int], *,
                 out_dir: str | Path, threads: int | None = None, warmup: int = 5, repeats: int = 30,
                 dtype=np.float32, timeout: float = CHILD_TIMEOUT_S, calibration: np.ndarray | None = None) -> dict:
    """`_measure_here` in a fresh child process, artifacts written into `out_dir` (the caller's, and the caller's to
    move or delete); `images=None` converts only; an int8 row's quantiser calibrates on `calibration` (uint8
    training images, required). A crash, a hang or an error gives `{"failed": why}`."""
    import os
    import subprocess
    import sys

    require(runtime)
    row = RUNTIMES[runtime]
    if row.adapter is None:
        raise CifarxError(f"{runtime} runs in the calling process, not in a child")
    if (row.precision == "int8") != (calibration is not None):
        raise CifarxError(f"{runtime} quantises on calibration images: give --data (its train/ images outside the "
                          "model's validation split)" if calibration is None else f"{runtime} takes no calibration")
    # A fresh interpreter, not multiprocessing: nothing of the parent's threads or sessions is copied, and the
    # caller's main script is not re-imported (multiprocessing's spawn would run an unguarded script again).
    search_path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)  # the same cifarx, and the adapter
    request = {"adapter": row.adapter, "runtime": runtime, "path": str(path), "batch_sizes": list(batch_sizes),
               "threads": threads, "warmup": warmup, "repeats": repeats, "dtype": np.dtype(dtype).name,
               "out_dir": str(out_dir)}
    child = subprocess.Popen([sys.executable, "-c", "from cifarx.runtimes.child import serve_child; serve_child()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": search_path}, start_new_session=True)
    try:
        arrays = {name: array for name, array in (("images", images), ("calibration", calibration)) if array is not None}
        answer, _ = child.communicate(_pack(arrays, request), timeout=timeout)
        code = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the converter's own children too
        child.communicate()
        answer, code = b"", None
    if code != 0:
        result = {"failed": describe_exit(code, timeout)}
    else:
        try:
            arrays, result = _unpack(answer)
        except (OSError, ValueError, KeyError):
            arrays, result = {}, {"failed": "gave an unreadable answer"}
        result.update(arrays)
    if "failed" in result:
        result.update({"runtime": runtime, "version": version(runtime)})
    return result
