"""Torch-free inference from an exported file: onnxruntime, numpy and Pillow only (the path applications copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarx.errors import CifarxError
from cifarx.onnxfile import create_session, model_info
from cifarx.runtimes import softmax


def load_images(paths: list[str | Path], size: int = 32) -> np.ndarray:
    """Image files -> float32 [N,3,size,size] RGB in [0,1] (resized with bilinear filtering if needed)."""
    from PIL import Image, UnidentifiedImageError

    batch = np.empty((len(paths), 3, size, size), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except FileNotFoundError:
            raise CifarxError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise CifarxError(f"cannot read image {path}: {type(error).__name__}") from None
        batch[i] = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return batch


def predict(model_path: str | Path, image_paths: list[str | Path], top_k: int = 3, provider: str = "cpu") -> list[dict]:
    """Top-k (class name, probability) per image, preprocessing as the model's metadata says."""
    if top_k < 1:
        raise CifarxError(f"--top-k must be at least 1, got {top_k}")
    session = create_session(model_path, provider)
    info = model_info(session)
    size = int(info["metadata"].get("input_size", 32))
    images = load_images(image_paths, size)
    if info["input_dtype"] == "float16":
        images = images.astype(np.float16)
    logits = session.run([info["output_names"][0]], {info["input_name"]: images})[0].astype(np.float64)
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():  # damaged weights or float16 overflow: refuse rather than print "nan%"
        raise CifarxError(f"{model_path} gave non-finite outputs for {image_paths[int(np.argmin(finite))]}")
    probabilities = softmax(logits)
    results = []
    for path, row in zip(image_paths, probabilities):
        best = np.argsort(-row)[:top_k]
        results.append({"image": str(path), "top": [(info["class_names"][i], float(row[i])) for i in best]})
    return results
