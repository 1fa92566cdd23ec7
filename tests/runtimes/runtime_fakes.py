"""Fake runtime adapters, run by the child process like real ones: each misbehaves the way a real runtime has."""

import os
import signal
import time


class Segfault:
    """Dies while loading the file, the way OpenCV 5.0 did on fast.onnx's GELU."""

    @staticmethod
    def open_runtime(path, threads):
        os.kill(os.getpid(), signal.SIGSEGV)


class Hang:
    """Never answers."""

    @staticmethod
    def open_runtime(path, threads):
        time.sleep(3600)


class RefusingConverter:
    """A converter that stops on an operator it does not know, leaving a half-written file behind."""

    CONVERTER = "fake-converter"

    @staticmethod
    def versions():
        return {"converter": "0.0"}

    @staticmethod
    def convert(onnx_path, out_dir, *calibration):  # an int8 row's quantiser also gets the calibration images
        (out_dir / "model.half").write_bytes(b"partial")
        raise RuntimeError("fake-converter: loading the graph\nunsupported operator: Erf")

    @staticmethod
    def open_runtime(path, threads):
        raise AssertionError("never reached")
