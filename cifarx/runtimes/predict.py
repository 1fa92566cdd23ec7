"""Torch-free inference from an exported file: onnxruntime, numpy and Pillow only (the path applications copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarx.errors import CifarxError
from cifarx.data.images import decode_image
from cifarx.runtimes.onnxfile import create_session, model_info
from cifarx.runtimes.measuring import input_dtype, softmax


def load_images(paths: list[str | Path], size: int = 32) -> np.ndarray:
    """Image files -> float32 [N,3,size,size] RGB in [0,1], decoded as training decodes them (`cifarx.data.images`)."""
    from PIL import Image, UnidentifiedImageError

    batch = np.empty((len(paths), 3, size, size), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            pixels = decode_image(path, size)
        except FileNotFoundError:
            raise CifarxError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise CifarxError(f"cannot read image {path}: {type(error).__name__}") from None
        batch[i] = pixels.astype(np.float32) / 255.0
    return batch


def image_files(paths: list[str | Path]) -> list[Path]:
    """The paths given, each folder replaced by the image files under it (sorted; any format Pillow reads)."""
    from PIL import Image

    readable = set(Image.registered_extensions())
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in readable and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise CifarxError(f"no image files under {path}")
        files += found
    return files


def predict(model_path: str | Path, image_paths: list[str | Path], top_k: int = 3, provider: str = "cpu") -> list[dict]:
    """Top-k (class name, probability) per image file (folders: every image under them), preprocessing as the
    model's metadata says."""
    if top_k < 1:
        raise CifarxError(f"--top-k must be at least 1, got {top_k}")
    session = create_session(model_path, provider)
    info = model_info(session)
    size = int(info["metadata"].get("input_size", 32))
    image_paths = image_files(image_paths)
    images = load_images(image_paths, size)
    images = images.astype(input_dtype(info))
    logits = np.concatenate([  # in batches: a folder may hold thousands of images
        session.run([info["output_names"][0]], {info["input_name"]: images[start : start + 256]})[0]
        for start in range(0, len(images), 256)
    ]).astype(np.float64)
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():  # damaged weights or float16 overflow: refuse rather than print "nan%"
        raise CifarxError(f"{model_path} gave non-finite outputs for {image_paths[int(np.argmin(finite))]}")
    probabilities = softmax(logits)
    results = []
    for path, row in zip(image_paths, probabilities):
        best = np.argsort(-row)[:top_k]
        results.append({"image": str(path), "top": [(info["class_names"][i], float(row[i])) for i in best]})
    return results
