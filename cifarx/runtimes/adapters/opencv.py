"""OpenCV DNN: reads the ONNX file itself (exports are written in a form its importer runs right, `portable.py`)."""

from __future__ import annotations

from pathlib import Path


def open_runtime(path: Path, threads: int | None):
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    if threads:
        cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromONNX(str(path))  # engine auto: the new graph engine, the classic one as its fallback
    names = list(net.getUnconnectedOutLayersNames())  # the new engine refuses a forward() that asks for fewer outputs

    def run(batch):
        net.setInput(batch)
        return net.forward(names)

    return run, f"CPU (OpenCV DNN, {cv2.getNumThreads()} threads)"
