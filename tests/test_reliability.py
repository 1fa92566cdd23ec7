"""Bad input, faults and untrusted files end cleanly: one line on stderr, a non-zero exit, nothing half-written.

Each test here is a row of docs/reliability.md. Faults are real where a test can make them real: `kill -9` of a
`cifarx` process, a file-size limit (RLIMIT_FSIZE) that makes writes fail the way a full disk does.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarx.training.checkpoint import read_checkpoint
from cifarx.training.config import make_train_config
from cifarx.errors import CifarxError, TrainingInterrupted
from cifarx.training.runfolder import SilentReporter
from cifarx.training.run import train
from tests.conftest import assert_one_line_error, make_image_folder, run

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers


def temporary_files(folder: Path) -> list[Path]:
    """What cifarx.io leaves while writing: hidden `.NAME.*.tmp` files beside the target."""
    return list(folder.rglob(".*.tmp"))


def cifarx_process(*args, **popen) -> subprocess.Popen:
    """`python -m cifarx ARGS` as a real process (its own signals, file-size limit, exit code)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "cifarx", *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def wait_until(condition, process: subprocess.Popen, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended (code {process.returncode}) before the moment to kill it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def file_size_limit(nbytes: int):
    """preexec_fn: writes past `nbytes` fail with EFBIG, the way writes on a full disk fail with ENOSPC."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # otherwise the kernel kills the process instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def onnx_model(input_shape, nodes, initializers=(), output_shape=None, class_names=("a", "b", "c")):
    """A small ONNX model around `nodes` from input 'input' to output 'logits', with cifarx-style metadata."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_shape or input_shape)],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    model.metadata_props.add(key="class_names", value=json.dumps(list(class_names)))
    return model


def external_tensor(name: str, location: str, shape=(1, 3, 1, 1)):
    """An initializer whose data lives in the file `location`, relative to the model's folder."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape), data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value=str(4 * int(np.prod(shape))))
    return tensor


class InterruptAt(SilentReporter):
    """Ctrl-C (SIGINT to this process) after `steps` training steps: leaves a mid-epoch last.pt."""

    def __init__(self, steps: int):
        self.remaining = steps

    def advance(self, loss):
        self.remaining -= 1
        if self.remaining == 0:
            os.kill(os.getpid(), signal.SIGINT)


def tiny_config(folder, out, **overrides):
    values = dict(model="simple-cnn", data=str(folder), epochs=3, batch_size=16, val_size=16, out=str(out), lr=3e-3)
    values.update(overrides)
    return make_train_config(**values)


# ---------------------------------------------------------------------------------------------- 1. bad input


@pytest.fixture
def bad_files(tmp_path, trained_run) -> dict:
    """Broken and mismatched inputs beside a good model: each file named for what is wrong with it."""
    import onnx
    from onnx import helper

    random_bytes = np.random.default_rng(0).bytes(4096)
    good_onnx, good_pt = trained_run["onnx"].read_bytes(), (trained_run["run"] / "best.pt").read_bytes()
    files = {
        "empty.pt": b"", "random.pt": random_bytes, "truncated.pt": good_pt[: len(good_pt) // 2],
        "empty.onnx": b"", "random.onnx": random_bytes, "truncated.onnx": good_onnx[: len(good_onnx) // 2],
        "afile": b"a regular file, so nothing can be created under it (not even by root)",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    grey = onnx_model(["N", 1, 28, 28], [helper.make_node("Identity", ["input"], ["logits"])])
    onnx.save(grey, str(tmp_path / "grey28.onnx"))
    relabelled = onnx.load(str(trained_run["onnx"]))
    for prop in relabelled.metadata_props:
        if prop.key == "class_names":
            prop.value = '["airplane", "automobile", "bird"]'  # the model outputs 4 classes
    onnx.save(relabelled, str(tmp_path / "three_names.onnx"))
    del relabelled.metadata_props[:]
    onnx.save(relabelled, str(tmp_path / "no_metadata.onnx"))
    for split in ("train", "test"):
        (tmp_path / "no_images" / split / "cat").mkdir(parents=True)
        (tmp_path / "no_images" / split / "cat" / "notes.txt").write_text("not an image")
    make_image_folder(tmp_path / "other_classes", "test", classes=["whale", "cat"], per_class=2)
    os.mkfifo(tmp_path / "fifo")  # targets that are not regular files: the atomic replace must never swap them
    os.mkfifo(tmp_path / "fifo.onnx")
    os.mknod(tmp_path / "null.onnx", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    crafted_onnx_files(tmp_path, trained_run["onnx"])
    crafted_checkpoints(tmp_path, trained_run["run"])
    make_image_folder(tmp_path / "train_only", "train", per_class=8)
    make_image_folder(tmp_path / "tiny_data", "train", per_class=3)  # 12 images: less than the model's val_size 16
    trained_on_all = onnx.load(str(trained_run["onnx"]))
    for prop in trained_on_all.metadata_props:
        if prop.key == "val_split":
            prop.value = json.dumps({**json.loads(prop.value), "val_size": 0})  # as `--val-size 0` records it
    onnx.save(trained_on_all, str(tmp_path / "trained_on_all.onnx"))
    shutil.copytree(trained_run["run"], tmp_path / "finished_run")
    return {"tmp": tmp_path, "data": trained_run["data"], "run": trained_run["run"], "onnx": trained_run["onnx"],
            "image": trained_run["data"] / "test" / "cat" / "0000.png"}


def crafted_onnx_files(folder: Path, good: Path) -> None:
    """The good export with one metadata value or its batch dimension changed, and a model that is already int8."""
    import onnx
    from onnx import helper, numpy_helper

    metadata = {"names_null": ("class_names", "null"), "names_number": ("class_names", "4"),
                "names_dict": ("class_names", '{"a": 1}'), "size_text": ("input_size", "big"),
                "size_64": ("input_size", "64"), "size_huge": ("input_size", "100000"),
                "split_text": ("val_split", '"the usual"'), "split_size_text": ("val_split", '{"val_size": "many"}')}
    for name, (key, value) in metadata.items():
        model = onnx.load(str(good))
        (prop,) = [p for p in model.metadata_props if p.key == key]
        prop.value = value
        onnx.save(model, str(folder / f"{name}.onnx"))
    model = onnx.load(str(good))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a fixed batch of 1 instead of N
    onnx.save(model, str(folder / "batch1.onnx"))
    scale, zero = numpy_helper.from_array(np.float32(1 / 255), "s"), numpy_helper.from_array(np.uint8(0), "z")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    int8 = onnx_model(["N", 3, 32, 32], [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                                         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                                         helper.make_node("ReduceMean", ["d", "axes"], ["logits"], keepdims=0)],
                      [scale, zero, axes], output_shape=["N", 3])
    onnx.save(int8, str(folder / "int8.onnx"))


def crafted_checkpoints(folder: Path, run_dir: Path) -> None:
    """The good checkpoints with their structure changed the way a hand-edited or hostile file would be."""
    best = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save({k: v for k, v in best.items() if k != "model"}, folder / "no_model.pt")
    torch.save({**best, "model": {**best["model"], "name": "fast"}}, folder / "other_model.pt")
    torch.save({**best, "class_names": best["class_names"][:3]}, folder / "three_names.pt")
    last = torch.load(run_dir / "last.pt", weights_only=True)
    last["train_state"]["run"]["tomorrow"] = 1  # a run-state field this cifarx does not know
    (folder / "odd_run").mkdir()
    torch.save(last, folder / "odd_run" / "last.pt")


TRAIN = ["train", "--data", "{data}", "--epochs", "1", "--batch-size", "16", "--val-size", "16"]


def quantize_args(model: str) -> list[str]:
    return ["quantize", model, "--data", "{data}", "--calibration-images", "8", "--no-compare", "-o", "{tmp}/out/q.onnx"]

BAD_INPUT = {
    # export: the checkpoint, the output
    "export: missing checkpoint": (["export", "{tmp}/missing.pt", "-o", "{tmp}/out/x.onnx"], ["checkpoint not found"]),
    "export: empty checkpoint": (["export", "{tmp}/empty.pt", "-o", "{tmp}/out/x.onnx"], ["not a readable cifarx checkpoint"]),
    "export: random-bytes checkpoint": (["export", "{tmp}/random.pt", "-o", "{tmp}/out/x.onnx"], ["not a readable cifarx checkpoint"]),
    "export: truncated checkpoint": (["export", "{tmp}/truncated.pt", "-o", "{tmp}/out/x.onnx"], ["not a readable cifarx checkpoint"]),
    "export: ONNX file given as checkpoint": (["export", "{onnx}", "-o", "{tmp}/out/x.onnx"], ["not a readable cifarx checkpoint"]),
    "export: run folder without checkpoints": (["export", "{tmp}/no_images", "-o", "{tmp}/out/x.onnx"], ["no checkpoint"]),
    "export: output is not .onnx": (["export", "{run}", "-o", "{tmp}/out/x.txt"], [".onnx"]),
    "export: unwritable output folder": (["export", "{run}", "-o", "{tmp}/afile/sub/x.onnx", "--parity-images", "4"], ["cannot write to", "afile"]),
    "export: parity data without images": (["export", "{run}", "-o", "{tmp}/out/x.onnx", "--data", "{tmp}/no_images"], ["no images"]),
    # eval: the model file, the data, the options, the outputs
    "eval: missing model": (["eval", "{tmp}/missing.onnx"], ["model file not found"]),
    "eval: empty model": (["eval", "{tmp}/empty.onnx"], ["model file is empty"]),
    "eval: random-bytes model": (["eval", "{tmp}/random.onnx"], ["not a readable ONNX file"]),
    "eval: truncated model": (["eval", "{tmp}/truncated.onnx"], ["not a readable ONNX file"]),
    "eval: checkpoint given as model": (["eval", "{run}/best.pt"], ["not a readable ONNX file"]),
    "eval: input not [N,3,32,32]": (["eval", "{tmp}/grey28.onnx"], ["must be [N,3,32,32]"]),
    "eval: metadata classes != outputs": (["eval", "{tmp}/three_names.onnx"], ["3 classes", "outputs 4"]),
    "eval: not a cifarx export": (["eval", "{tmp}/no_metadata.onnx"], ["no class_names"]),
    "eval: data classes the model lacks": (["eval", "{onnx}", "--data", "{tmp}/other_classes"], ["class mismatch", "whale"]),
    "eval: data folder without images": (["eval", "{onnx}", "--data", "{tmp}/no_images"], ["no images"]),
    "eval: missing data folder": (["eval", "{onnx}", "--data", "{tmp}/missing"], ["data folder not found"]),
    "eval: unknown provider": (["eval", "{onnx}", "--provider", "tpu"], ["--provider", "tpu"]),
    "eval: zero batch size": (["eval", "{onnx}", "--batch-sizes", "0"], ["--batch-sizes"]),
    "eval: negative batch size": (["eval", "{onnx}", "--batch-sizes", "-8"], ["--batch-sizes"]),
    "eval: non-number batch size": (["eval", "{onnx}", "--batch-sizes", "1,x"], ["--batch-sizes"]),
    "eval: --split val of a model trained on every image": (["eval", "{tmp}/trained_on_all.onnx", "--data", "{data}",
                                                             "--split", "val"], ["no validation split", "--split test"]),
    "eval: unwritable --json": (["eval", "{onnx}", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1",
                                 "--json", "{tmp}/afile/sub/e.json"], ["cannot write to", "afile"]),
    "eval: unwritable --plots": (["eval", "{onnx}", "--data", "{data}", "--repeats", "1", "--warmup", "0",
                                  "--batch-sizes", "1", "--plots", "{tmp}/afile/sub"], ["cannot write to", "afile"]),
    # predict: the model file, the images, the options
    "predict: missing model": (["predict", "{tmp}/missing.onnx", "{image}"], ["model file not found"]),
    "predict: empty model": (["predict", "{tmp}/empty.onnx", "{image}"], ["model file is empty"]),
    "predict: random-bytes model": (["predict", "{tmp}/random.onnx", "{image}"], ["not a readable ONNX file"]),
    "predict: truncated model": (["predict", "{tmp}/truncated.onnx", "{image}"], ["not a readable ONNX file"]),
    "predict: input not [N,3,32,32]": (["predict", "{tmp}/grey28.onnx", "{image}"], ["must be [N,3,32,32]"]),
    "predict: metadata classes != outputs": (["predict", "{tmp}/three_names.onnx", "{image}"], ["3 classes"]),
    "predict: missing image": (["predict", "{onnx}", "{tmp}/missing.png"], ["image not found"]),
    "predict: random bytes as image": (["predict", "{onnx}", "{tmp}/random.onnx"], ["cannot read image"]),
    "predict: folder without images": (["predict", "{onnx}", "{tmp}/no_images"], ["no image files under", "no_images"]),
    "predict: unknown provider": (["predict", "{onnx}", "{image}", "--provider", "tpu"], ["--provider", "tpu"]),
    "predict: zero top-k": (["predict", "{onnx}", "{image}", "--top-k", "0"], ["--top-k"]),
    # quantize: the model file, the calibration data, the outputs
    "quantize: missing model": ([*quantize_args("{tmp}/missing.onnx")], ["model file not found"]),
    "quantize: empty model": ([*quantize_args("{tmp}/empty.onnx")], ["model file is empty"]),
    "quantize: random-bytes model": ([*quantize_args("{tmp}/random.onnx")], ["not a readable ONNX file"]),
    "quantize: truncated model": ([*quantize_args("{tmp}/truncated.onnx")], ["not a readable ONNX file"]),
    "quantize: input not [N,3,32,32]": ([*quantize_args("{tmp}/grey28.onnx")], ["must be [N,3,32,32]"]),
    "quantize: data folder without images": ([*quantize_args("{onnx}"), "--data", "{tmp}/no_images"], ["no images"]),
    "quantize: output is not .onnx": ([*quantize_args("{onnx}"), "-o", "{tmp}/out/q.txt"], [".onnx"]),
    "quantize: output replaces its source": ([*quantize_args("{onnx}"), "-o", "{onnx}"], ["must not replace"]),
    "quantize: unwritable output folder": ([*quantize_args("{onnx}"), "-o", "{tmp}/afile/sub/q.onnx"], ["cannot write to", "afile"]),
    "quantize: --split test without a test folder": (["quantize", "{onnx}", "--data", "{tmp}/train_only", "--split", "test",
                                                      "--calibration-images", "8", "-o", "{tmp}/out/q.onnx"],
                                                     ["no test/ folder"]),
    "quantize: data too small for the model's validation split": (["quantize", "{onnx}", "--data", "{tmp}/tiny_data",
                                                                  "--calibration-images", "8", "-o", "{tmp}/out/q.onnx"],
                                                                 ["12 training images", "validation split of 16"]),
    "quantize: unwritable --json": ([*quantize_args("{onnx}"), "--json", "{tmp}/afile/sub/q.json"], ["cannot write to", "afile"]),
    # train: the recipe, the numbers, the data, the output
    "train: unknown model": ([*TRAIN, "--model", "no-such-model", "--out", "{tmp}/r"],
                             ["unknown model", "no-such-model", "simple-cnn", "vae-ssl", "timm/<name>"]),
    "train: unknown preset": ([*TRAIN, "--preset", "no-such-preset", "--out", "{tmp}/r"], ["unknown preset"]),
    "train: zero epochs": ([*TRAIN, "--epochs", "0", "--out", "{tmp}/r"], ["--epochs must be positive"]),
    "train: negative epochs": ([*TRAIN, "--epochs", "-2", "--out", "{tmp}/r"], ["--epochs must be positive"]),
    "train: zero batch size": ([*TRAIN, "--batch-size", "0", "--out", "{tmp}/r"], ["--batch-size must be positive"]),
    "train: negative batch size": ([*TRAIN, "--batch-size", "-16", "--out", "{tmp}/r"], ["--batch-size must be positive"]),
    "train: batch size over the data": ([*TRAIN, "--batch-size", "4096", "--out", "{tmp}/r"], ["batch size 4096"]),
    "train: zero lr": ([*TRAIN, "--lr", "0", "--out", "{tmp}/r"], ["--lr must be positive"]),
    "train: negative lr": ([*TRAIN, "--lr", "-0.1", "--out", "{tmp}/r"], ["--lr must be positive"]),
    "train: NaN lr": ([*TRAIN, "--lr", "nan", "--out", "{tmp}/r"], ["--lr must be positive"]),
    "train: infinite lr": ([*TRAIN, "--lr", "inf", "--out", "{tmp}/r"], ["--lr must be positive"]),
    "train: non-number epochs": ([*TRAIN, "--epochs", "ten", "--out", "{tmp}/r"], ["--epochs"]),
    "train: wrong type through --set": ([*TRAIN, "--set", "patience=ten", "--out", "{tmp}/r"], ["patience must be int"]),
    "train: unknown setting": ([*TRAIN, "--set", "epoch=3", "--out", "{tmp}/r"], ["unknown setting"]),
    "train: negative threads": ([*TRAIN, "--threads", "-2", "--out", "{tmp}/r"], ["--threads must be >= 0"]),
    "train: negative train size": ([*TRAIN, "--train-size", "-3", "--out", "{tmp}/r"], ["--train-size"]),
    "train: validation split too big": ([*TRAIN, "--val-size", "5000", "--out", "{tmp}/r"], ["too few for a validation split of 5000"]),
    "train: unknown device": ([*TRAIN, "--device", "tpu", "--out", "{tmp}/r"], ["unknown device"]),
    "train: bad model argument": ([*TRAIN, "--model-arg", "wings=2", "--out", "{tmp}/r"], ["bad arguments for model"]),
    "train: data folder without images": ([*TRAIN, "--data", "{tmp}/no_images", "--out", "{tmp}/r"], ["no images"]),
    "train: missing data folder": ([*TRAIN, "--data", "{tmp}/missing", "--out", "{tmp}/r"], ["data folder not found"]),
    "train: output under a file": ([*TRAIN, "--out", "{tmp}/afile/sub"], ["cannot write to", "afile"]),
    "train: output is a file": ([*TRAIN, "--out", "{tmp}/afile"], ["cannot write to", "afile"]),
    "train: into a folder holding a run": ([*TRAIN, "--out", "{tmp}/finished_run"], ["already holds a run", "--resume"]),
    "train: resume with a setting that cannot change": (["train", "--resume", "{tmp}/finished_run", "--lr", "0.1"],
                                                        ["--lr cannot change", "--epochs"]),
    "train: resume with fewer epochs than trained": (["train", "--resume", "{tmp}/finished_run", "--epochs", "1"],
                                                     ["trained 2 epochs already"]),
    "train: resume nothing": (["train", "--resume", "{tmp}/r"], ["nothing to resume"]),
    "train: resume random bytes": (["train", "--resume", "{tmp}/random.pt"], ["not a readable cifarx checkpoint"]),
    "train: resume an inference checkpoint": (["train", "--resume", "{run}/best.pt"], ["no training state"]),
    # outputs that are not regular files
    "eval: --json onto a FIFO": (["eval", "{onnx}", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1",
                                  "--json", "{tmp}/fifo"], ["not a regular file", "fifo"]),
    "eval: --json onto a folder": (["eval", "{onnx}", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1",
                                    "--json", "{tmp}/no_images"], ["not a regular file", "no_images"]),
    "export: output onto a character device": (["export", "{run}", "-o", "{tmp}/null.onnx", "--parity-images", "4"],
                                               ["not a regular file", "null.onnx"]),
    "quantize: output onto a FIFO": ([*quantize_args("{onnx}"), "-o", "{tmp}/fifo.onnx"], ["not a regular file"]),
    # numbers that are not finite or out of range, checked before the run folder is made
    "train: NaN weight decay": ([*TRAIN, "--weight-decay", "nan", "--out", "{tmp}/r"], ["--weight-decay", "nan"]),
    "train: infinite warm-up": ([*TRAIN, "--warmup-epochs", "inf", "--out", "{tmp}/r"], ["--warmup-epochs", "inf"]),
    "train: crop padding over the image": ([*TRAIN, "--set", "crop_padding=100", "--out", "{tmp}/r"], ["--crop-padding", "100"]),
    "train: unknown translate mode": ([*TRAIN, "--set", "translate_mode=bogus", "--out", "{tmp}/r"], ["translate_mode", "bogus"]),
    "train: negative momentum": ([*TRAIN, "--set", "momentum=-1", "--out", "{tmp}/r"], ["--momentum", "-1"]),
    "train: malformed cuda device": ([*TRAIN, "--device", "cuda:abc", "--out", "{tmp}/r"], ["unknown device", "cuda:abc"]),
    "train: ViT image smaller than its patch grid": ([*TRAIN, "--model", "timm/vit_tiny_patch16_224", "--img-size", "8",
                                                      "--out", "{tmp}/r"], ["timm/vit_tiny_patch16_224", "--img-size 8"]),
    "train: empty file as --weights": ([*TRAIN, "--model", "timm/resnet18", "--img-size", "32", "--weights",
                                        "{tmp}/empty.pt", "--out", "{tmp}/r"], ["--weights", "empty.pt"]),
    "train: cifarx checkpoint as --weights": ([*TRAIN, "--model", "timm/resnet18", "--img-size", "32", "--weights",
                                               "{run}/best.pt", "--out", "{tmp}/r"], ["--weights", "best.pt"]),
    "train: --nproc 2 with an odd batch size": ([*TRAIN, "--nproc", "2", "--batch-size", "33", "--out", "{tmp}/r"],
                                                ["--batch-size 33", "2"]),
    "eval: validation split of 0 images": (["eval", "{onnx}", "--data", "{data}", "--split", "val", "--val-size", "0"],
                                           ["--val-size"]),
    "eval: batch size beyond memory": (["eval", "{onnx}", "--batch-sizes", "1000000000"], ["--batch-sizes", "memory"]),
    # export checks before it writes
    "export: class names do not match the outputs": (["export", "{tmp}/three_names.pt", "-o", "{tmp}/out/x.onnx"],
                                                     ["3 class names", "4 outputs"]),
    "export: opset 0": (["export", "{run}", "-o", "{tmp}/out/x.onnx", "--opset", "0"], ["--opset"]),
    "export: opset 7": (["export", "{run}", "-o", "{tmp}/out/x.onnx", "--opset", "7"], ["--opset"]),
    "export: opset 99": (["export", "{run}", "-o", "{tmp}/out/x.onnx", "--opset", "99"], ["--opset"]),
    "export: --card with a missing --val-run": (["export", "{run}", "-o", "{tmp}/out/x.onnx", "--parity-images", "4",
                                                 "--card", "--val-run", "{tmp}/missing"], ["missing"]),
    # crafted checkpoints
    "export: checkpoint without its model": (["export", "{tmp}/no_model.pt", "-o", "{tmp}/out/x.onnx"], ["no_model.pt", "model"]),
    "export: model name that does not fit the weights": (["export", "{tmp}/other_model.pt", "-o", "{tmp}/out/x.onnx"],
                                                         ["other_model.pt", "do not fit", "fast"]),
    "train: resume with an unknown run-state field": (["train", "--resume", "{tmp}/odd_run"], ["tomorrow"]),
    # crafted ONNX metadata
    "predict: class_names null": (["predict", "{tmp}/names_null.onnx", "{image}"], ["class_names"]),
    "predict: class_names a number": (["predict", "{tmp}/names_number.onnx", "{image}"], ["class_names"]),
    "predict: class_names a dict": (["predict", "{tmp}/names_dict.onnx", "{image}"], ["class_names"]),
    "predict: input_size not a number": (["predict", "{tmp}/size_text.onnx", "{image}"], ["input_size", "big"]),
    "predict: input_size 64": (["predict", "{tmp}/size_64.onnx", "{image}"], ["input_size", "64"]),
    "predict: input_size 100000": (["predict", "{tmp}/size_huge.onnx", "{image}"], ["input_size", "100000"]),
    "eval: val_split not a dict": (["eval", "{tmp}/split_text.onnx", "--data", "{data}", "--split", "val"], ["val_split"]),
    "eval: val_split size not a number": (["eval", "{tmp}/split_size_text.onnx", "--data", "{data}", "--split", "val"],
                                          ["val_split", "many"]),
    "eval: fixed batch dimension": (["eval", "{tmp}/batch1.onnx"], ["batch", "1"]),
    "quantize: a model that is already int8": ([*quantize_args("{tmp}/int8.onnx")], ["already", "QuantizeLinear"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_files):
    args, fragments = BAD_INPUT[case]
    tmp = bad_files["tmp"]
    before = {p for p in tmp.rglob("*")}
    result = run(*[a.format(**bad_files) for a in args])
    assert_one_line_error(result, *fragments)
    assert {p for p in tmp.rglob("*")} == before  # no output file, no run folder, no temporary left behind


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_model_onnx_runtime_cannot_load_is_one_line_and_nothing_else(trained_run, tmp_path, capfd, command):
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["input", "w"], ["logits"], auto_pad="SIDEWAYS")  # parses; ORT cannot build it
    path = tmp_path / "odd.onnx"
    onnx.save(onnx_model(["N", 3, 32, 32], [conv], [weight], output_shape=["N", 4, 32, 32]), str(path))
    capfd.readouterr()
    extra = [trained_run["data"] / "test" / "cat" / "0000.png"] if command == "predict" else []
    result = run(command, path, *extra)
    assert_one_line_error(result, "ONNX Runtime could not load", "AutoPad")
    assert result.stdout == "" and capfd.readouterr() == ("", "")  # no banner or log lines of ONNX Runtime's own


def test_model_giving_nan_is_refused_by_predict_not_printed_as_nan_percent(trained_run, tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("Neg", ["input"], ["negative"]),
             helper.make_node("ReduceMean", ["negative", "axes"], ["mean"], keepdims=0),
             helper.make_node("Log", ["mean"], ["logits"])]  # log of a negative number: NaN
    path = tmp_path / "nan.onnx"
    onnx.save(onnx_model(["N", 3, 32, 32], nodes, [axes], output_shape=["N", 3]), str(path))
    image = trained_run["data"] / "test" / "cat" / "0000.png"
    assert_one_line_error(run("predict", path, image), "non-finite outputs", "0000.png")


def test_unknown_provider_is_refused_by_the_library_too(trained_run):
    from cifarx.measure.evaluate import evaluate_onnx
    from cifarx.runtimes.predict import predict

    image = trained_run["data"] / "test" / "cat" / "0000.png"
    with pytest.raises(CifarxError, match="unknown provider 'tpu'"):
        predict(trained_run["onnx"], [image], provider="tpu")
    with pytest.raises(CifarxError, match="unknown provider 'tpu'"):
        evaluate_onnx(trained_run["onnx"], data=None, provider="tpu")


def test_corrupt_image_is_skipped_with_one_warning_line_naming_it(image_folder, tmp_path):
    broken = image_folder / "train" / "cat" / ("a-long-file-name-so-that-a-terminal-would-wrap-the-line-" * 2 + ".png")
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image decoder could use")
    result = run(*[a.format(data=image_folder) for a in TRAIN], "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    mentions = [line for line in result.stderr.splitlines() if broken.name[:20] in line]
    assert len(mentions) == 1, result.stderr  # one line, however long the path
    assert mentions[0].startswith("warning: skipping unreadable image") and str(broken) in mentions[0]
    assert len(read_checkpoint(tmp_path / "run" / "last.pt")["class_names"]) == 4  # trained on the readable rest


def test_resume_refuses_data_whose_classes_changed(image_folder, tmp_path):
    train(tiny_config(image_folder, tmp_path / "run", epochs=1))
    make_image_folder(image_folder, "train", classes=["dog"], per_class=4)  # a fifth class appears
    result = run("train", "--resume", tmp_path / "run")
    assert_one_line_error(result, "cannot resume", "dog")


# ---------------------------------------------------------------------------------------------- 2. faults


KILL_RUN = dict(model="simple-cnn", epochs=4, batch_size=16, val_size=16, lr=3e-3, threads=1,
                augment=["crop", "flip", "cutout"])


def metric_rows(run_dir: Path) -> list[list[str]]:
    """metrics.csv without its timing columns (the only ones a rerun may change)."""
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, name in enumerate(header) if "seconds" not in name]
    return [[row.split(",")[i] for i in keep] for row in rows]


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / "data", "train", per_class=32)  # 7 steps an epoch
    threads = torch.get_num_threads()
    try:  # the uninterrupted reference, in this process with the same single thread as the subprocesses
        train(make_train_config(data=str(data), out=str(tmp_path / "ref"), **KILL_RUN))
    finally:
        torch.set_num_threads(threads)

    cut = tmp_path / "cut"
    options = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}" for k, v in KILL_RUN.items()]
    victim = cifarx_process("train", "--data", data, "--out", cut, *options)
    # After the second epoch's checkpoint, then a moment into the third epoch: the kill loses a partial epoch.
    wait_until(lambda: (cut / "metrics.csv").is_file() and len(metric_rows(cut)) >= 3, victim)
    time.sleep(0.2)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert not (cut / "summary.json").exists()

    resumed = cifarx_process("train", "--resume", cut)
    _, stderr = resumed.communicate(timeout=900)  # generous: these processes run at nice 19 on a shared machine
    assert resumed.returncode == 0, stderr
    assert metric_rows(cut) == metric_rows(tmp_path / "ref") and len(metric_rows(cut)) == 5
    for name, key in (("last.pt", lambda p: p["train_state"]["model"]), ("best.pt", lambda p: p["state_dict"])):
        ours, theirs = key(read_checkpoint(cut / name)), key(read_checkpoint(tmp_path / "ref" / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.slow
def test_resume_rewrites_metrics_a_kill_left_one_epoch_behind(image_folder, tmp_path):
    # A kill after the last epoch's last.pt but before metrics.csv: the checkpoint knows the whole history.
    run_dir = tmp_path / "run"
    train(tiny_config(image_folder, run_dir, epochs=2))
    complete = (run_dir / "metrics.csv").read_text()
    (run_dir / "metrics.csv").write_text("\n".join(complete.splitlines()[:-1]) + "\n")
    (run_dir / "summary.json").unlink()
    summary = train(resume=run_dir)
    assert (run_dir / "metrics.csv").read_text() == complete and summary["epochs_run"] == 2
    assert (run_dir / "summary.json").is_file()


def test_a_run_folder_in_use_is_refused_to_a_second_writer_in_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", "train", per_class=32)
    run_dir = tmp_path / "run"
    first = cifarx_process("train", "--data", data, "--out", run_dir, "--epochs", 1000, "--batch-size", 16,
                           "--val-size", 16, "--threads", 1)
    try:
        wait_until(lambda: (run_dir / "last.pt").is_file(), first)  # the first run is writing its checkpoints
        resumed = run("train", "--resume", run_dir)  # would load last.pt and write over the running run's files
        assert_one_line_error(resumed, "in use by another cifarx train")
        again = run("train", "--data", data, "--out", run_dir, "--epochs", 1, "--batch-size", 16, "--val-size", 16)
        assert_one_line_error(again, str(run_dir))  # already holds a run (or, sooner, is in use)
        assert first.poll() is None  # the first run goes on, its folder its own
    finally:
        first.kill()
        first.wait(timeout=30)
    assert read_checkpoint(run_dir / "last.pt")["config"]["epochs"] == 1000


@pytest.mark.slow
def test_kill_9_while_export_writes_leaves_the_old_file(trained_run, tmp_path):
    target = tmp_path / "model.onnx"
    old = trained_run["onnx"].read_bytes()
    target.write_bytes(old)
    export = cifarx_process("export", trained_run["run"], "-o", target, "--parity-images", "16")
    # Killed once the new file is being written (or checked for parity): what a naive writer leaves half-done.
    wait_until(lambda: any(p.stat().st_size for p in tmp_path.glob(".model.onnx.*.tmp")), export)
    export.send_signal(signal.SIGKILL)
    assert export.wait(timeout=30) == -signal.SIGKILL
    assert target.read_bytes() == old  # the file other programs read is never half of a new one

    from cifarx.runtimes.onnxfile import create_session, model_info

    assert model_info(create_session(target))["class_names"][0] == "airplane"


@pytest.mark.slow
def test_kill_9_during_a_first_export_leaves_no_onnx_file(trained_run, tmp_path):
    target = tmp_path / "model.onnx"
    export = cifarx_process("export", trained_run["run"], "-o", target, "--parity-images", "16")
    wait_until(lambda: list(tmp_path.glob(".model.onnx.*.tmp")), export)
    export.send_signal(signal.SIGKILL)
    export.wait(timeout=30)
    assert not target.exists() and not list(tmp_path.glob("*.onnx"))  # only the hidden temporary can remain


def test_full_disk_during_export_is_one_line_and_leaves_no_file(trained_run, tmp_path, monkeypatch):
    import onnx

    def save_part_then_fail(model, path, *args, **kwargs):
        Path(path).write_bytes(model.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save", save_part_then_fail)
    result = run("export", trained_run["run"], "-o", tmp_path / "m.onnx", "--parity-images", "4")
    assert_one_line_error(result, "could not write", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_training_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(image_folder, run_dir), reporter=InterruptAt(8))  # a checkpoint in epoch 2
    last, best = (run_dir / "last.pt").read_bytes(), (run_dir / "best.pt").read_bytes()

    # The next checkpoint (> 1 MB) cannot be written: the write fails as on a full disk.
    resumed = cifarx_process("train", "--resume", run_dir, preexec_fn=file_size_limit(200_000))
    _, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write") and "File too large" in lines[0], stderr
    assert (run_dir / "last.pt").read_bytes() == last and (run_dir / "best.pt").read_bytes() == best
    assert read_checkpoint(run_dir / "last.pt")["train_state"]["run"]["epoch"] == 1  # loadable, resumable
    assert temporary_files(run_dir) == []


def test_full_disk_for_the_image_cache_costs_only_a_warning(image_folder):
    code = f"from cifarx.data.datasets import load_split; print(len(load_split({str(image_folder)!r}, 'train')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900,
                          preexec_fn=file_size_limit(100_000))  # the 96-image cache is ~300 kB
    assert done.returncode == 0 and done.stdout.strip() == "96", done.stderr
    assert "could not write image cache" in done.stderr and "File too large" in done.stderr


# ---------------------------------------------------------------------------------------------- 3. untrusted files


class RunsCodeWhenUnpickled:
    """Unpickling this calls open(marker, 'w'): any code could stand there."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": "cifarx-checkpoint", "version": 1, "state_dict": RunsCodeWhenUnpickled(marker),
                "train_state": RunsCodeWhenUnpickled(marker)}, path)
    return path


@pytest.mark.parametrize("command", [["export", "{ckpt}", "-o", "{tmp}/x.onnx"], ["train", "--resume", "{ckpt}"]])
def test_crafted_pickle_checkpoint_is_refused_without_running_it(tmp_path, command):
    crafted = crafted_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    result = run(*[a.format(ckpt=crafted, tmp=tmp_path) for a in command])
    assert_one_line_error(result, "refusing to load", "could run code")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x.onnx").exists()
    torch.load(crafted, weights_only=False)  # the control: loaded the unsafe way, the same file does run its code
    assert (tmp_path / "pwned").exists()


def test_poisoned_image_cache_is_rebuilt_without_running_it(image_folder, tmp_path):
    from cifarx.data import datasets as data
    from cifarx.data.datasets import default_cache_dir

    first = data.load_split(str(image_folder), "train")
    (cache,) = default_cache_dir().glob("images-*.pt")
    crafted_checkpoint(cache, tmp_path / "pwned")
    with pytest.warns(UserWarning, match="ignoring unreadable image cache"):
        again = data.load_split(str(image_folder), "train")
    assert not (tmp_path / "pwned").exists() and torch.equal(again.images, first.images)


def test_damaged_checkpoint_is_refused_not_loaded(trained_run, tmp_path):
    damaged = tmp_path / "best.pt"
    raw = bytearray((trained_run["run"] / "best.pt").read_bytes())
    with zipfile.ZipFile(trained_run["run"] / "best.pt") as archive:
        weights = max(archive.infolist(), key=lambda info: info.file_size)
    name_length, extra_length = struct.unpack("<HH", raw[weights.header_offset + 26 : weights.header_offset + 30])
    raw[weights.header_offset + 30 + name_length + extra_length + weights.file_size // 2] ^= 0x10  # one bit of a weight
    damaged.write_bytes(raw)
    torch.load(damaged, weights_only=True)  # torch alone would load the wrong weight without a word
    result = run("export", damaged, "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "damaged", "checksum")
    assert not (tmp_path / "x.onnx").exists()


def external_data_models(folder: Path) -> dict[str, Path]:
    """Models whose weights sit in external files: inside their folder (fine) and outside it (refused)."""
    from onnx import helper

    (folder / "models").mkdir()
    weights = np.full((1, 3, 1, 1), 2.0, np.float32).tobytes()
    (folder / "secret.bin").write_bytes(weights)  # exists, so only the check stands between it and the model
    (folder / "models" / "w.bin").write_bytes(weights)
    multiply = helper.make_node("Mul", ["input", "w"], ["logits"])
    constant = helper.make_node("Constant", [], ["w"], value=external_tensor("w", "../secret.bin"))
    models = {
        "inside": onnx_model(["N", 3, 32, 32], [multiply], [external_tensor("w", "w.bin")]),
        "parent": onnx_model(["N", 3, 32, 32], [multiply], [external_tensor("w", "../secret.bin")]),
        "absolute": onnx_model(["N", 3, 32, 32], [multiply], [external_tensor("w", str(folder / "secret.bin"))]),
        "constant": onnx_model(["N", 3, 32, 32], [constant, multiply]),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = folder / "models" / f"{name}.onnx"
        paths[name].write_bytes(model.SerializeToString())
    return paths


@pytest.mark.parametrize("where", ["parent", "absolute", "constant"])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_onnx_external_data_outside_its_folder_is_refused(tmp_path, trained_run, where, command):
    path = external_data_models(tmp_path)[where]
    extra = [trained_run["data"] / "test" / "cat" / "0000.png"] if command == "predict" else []
    assert_one_line_error(run(command, path, *extra), "refusing", "outside its folder")


def test_onnx_external_data_inside_its_folder_is_accepted(tmp_path):
    from cifarx.runtimes.onnxfile import check_model_file

    path = external_data_models(tmp_path)["inside"]
    assert check_model_file(path) == path


def test_decompression_bomb_is_refused_by_predict(trained_run, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(40_000, 40_000))  # 1.6 gigapixels claimed in 100 bytes
    assert_one_line_error(run("predict", trained_run["onnx"], bomb), "cannot read image", "DecompressionBomb")


def test_decompression_bomb_in_a_data_folder_is_skipped_with_a_warning(image_folder):
    from PIL import Image

    from cifarx.data import datasets as data

    (image_folder / "train" / "cat" / "bomb.png").write_bytes(png_header(40_000, 40_000))
    with pytest.warns(UserWarning, match=r"bomb\.png.*DecompressionBomb"):
        image_set = data.load_split(str(image_folder), "train")
    assert len(image_set) == 96 and Image.MAX_IMAGE_PIXELS is not None


def cifarx_sources() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted((REPO / "cifarx").rglob("*.py"))]


def dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_no_shell_ever_sees_a_path_and_every_load_is_weights_only():
    shells = ("os.system", "os.popen", "os.exec", "os.spawn", "subprocess.getoutput", "subprocess.getstatusoutput",
              "commands.", "pty.spawn")
    problems = []
    for path, tree in cifarx_sources():
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                name = dotted_name(node.func)
                keywords = {k.arg: k.value for k in node.keywords}
                if name.startswith(shells):
                    problems.append(f"{where} calls {name}")
                if "shell" in keywords and not (isinstance(keywords["shell"], ast.Constant) and keywords["shell"].value is False):
                    problems.append(f"{where} passes shell=")
                if name.endswith("torch.load"):
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        problems.append(f"{where} calls torch.load without weights_only=True")
                if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "eval", "exec"):
                    problems.append(f"{where} calls {name}")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(dotted_name(t).endswith("MAX_IMAGE_PIXELS") for t in targets):
                    problems.append(f"{where} changes Pillow's decompression-bomb limit")
    assert problems == []


def test_every_row_of_docs_reliability_names_a_test_that_exists():
    import re

    page = (REPO / "docs" / "reliability.md").read_text()
    defined = {m for path in (REPO / "tests").rglob("test_*.py") for m in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith(("| Input", "| Fault", "| File"))]
    for row in rows:
        assert re.search(r"`(test_\w+|bad_input\[)", row), f"a row without a test: {row[:80]}"
    named = set(re.findall(r"`(test_\w+)`", page))
    assert named <= defined, f"named in docs/reliability.md but not in tests/: {sorted(named - defined)}"
    cases = set(re.findall(r"`bad_input\[(.+?)\]`", page))
    assert cases == set(BAD_INPUT), f"cases missing from the page: {sorted(set(BAD_INPUT) - cases)}; unknown: {sorted(cases - set(BAD_INPUT))}"
    ours = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text() + (REPO / "tests" / "test_properties.py").read_text(), re.M))
    assert ours - named - {"test_bad_input_is_one_line_exit_2_and_writes_nothing",
                           "test_every_row_of_docs_reliability_names_a_test_that_exists"} == set(), "tests missing from the page"


# ---------------------------------------------------------------------------------------------- one of each


@pytest.mark.parametrize("kind", ["character device", "fifo", "folder"])
@pytest.mark.parametrize("writer", ["text", "json", "torch", "png"])
def test_every_atomic_writer_refuses_a_target_that_is_not_a_regular_file(tmp_path, kind, writer):
    from cifarx import io

    target = tmp_path / "target"
    {"character device": lambda: os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3)),
     "fifo": lambda: os.mkfifo(target), "folder": target.mkdir}[kind]()
    kind_before = stat.S_IFMT(target.lstat().st_mode)

    def write():
        if writer == "png":
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            io.atomic_savefig(plt.figure(), target)
        else:
            {"text": lambda: io.atomic_write_text(target, "x"), "json": lambda: io.atomic_write_json(target, {}),
             "torch": lambda: io.atomic_torch_save({}, target)}[writer]()

    with pytest.raises(CifarxError, match="not a regular file"):
        io.check_writable(target)
    with pytest.raises(CifarxError, match="not a regular file"):
        write()
    assert stat.S_IFMT(target.lstat().st_mode) == kind_before  # the device, FIFO or folder is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no temporary left


def test_read_only_file_system_is_named_as_such(tmp_path, monkeypatch):
    from cifarx import io

    real_statvfs = os.statvfs

    def read_only(path):
        result = real_statvfs(path)
        return os.statvfs_result((*result[:8], result.f_flag | os.ST_RDONLY, result.f_namemax))

    monkeypatch.setattr(os, "statvfs", read_only)
    with pytest.raises(CifarxError, match="read-only file system"):
        io.check_writable(tmp_path / "e.json")


def test_non_finite_loss_stops_the_run_with_one_line_naming_epoch_and_step(image_folder, tmp_path):
    result = run(*[a.format(data=image_folder) for a in TRAIN], "--optimizer", "sgd", "--lr", "1e30", "--out", tmp_path / "r")
    assert_one_line_error(result, "loss", "not finite", "epoch 1 step")
    assert not (tmp_path / "r" / "best.pt").exists()  # nothing trained on NaN weights is kept as a model


def checkpoint_with_nan_weight(run_dir: Path, path: Path) -> Path:
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    payload["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(payload, path)
    return path


def test_export_parity_treats_nan_as_a_failure(trained_run, tmp_path):
    crafted = checkpoint_with_nan_weight(trained_run["run"], tmp_path / "nan.pt")
    result = run("export", crafted, "-o", tmp_path / "x.onnx", "--data", trained_run["data"], "--parity-images", "8")
    assert_one_line_error(result, "parity check failed", "not finite")
    assert not (tmp_path / "x.onnx").exists()


def test_eval_treats_nan_outputs_as_a_failure_not_as_ten_percent(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("Neg", ["input"], ["negative"]),
             helper.make_node("ReduceMean", ["negative", "axes"], ["mean"], keepdims=0),
             helper.make_node("Log", ["mean"], ["logits"])]  # log of a negative number: NaN
    onnx.save(onnx_model(["N", 3, 32, 32], nodes, [axes], output_shape=["N", 3]), str(tmp_path / "nan.onnx"))
    make_image_folder(tmp_path / "abc", "test", classes=["a", "b", "c"], per_class=2)
    result = run("eval", tmp_path / "nan.onnx", "--data", tmp_path / "abc", "--repeats", "1", "--warmup", "0",
                 "--batch-sizes", "1")
    assert_one_line_error(result, "non-finite outputs", "6 images")


def test_16_bit_png_is_scaled_not_clipped_alike_in_training_and_predict(trained_run, tmp_path):
    from PIL import Image

    from cifarx.data.datasets import decode_image
    from cifarx.runtimes.predict import load_images

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((32, 32), 0x4000, np.uint16)).save(path)  # a quarter of the 16-bit range
    assert Image.open(path).mode == "I;16"
    assert decode_image(path).unique().tolist() == [64]  # 0x4000 / 257, rounded; clipping gave 255 (white)
    assert np.unique(np.rint(load_images([path]) * 255)).tolist() == [64.0]


def test_gif_and_tiff_are_read_by_training_as_by_predict_and_other_files_are_named(image_folder):
    from PIL import Image

    from cifarx.data import datasets as data
    from cifarx.runtimes.predict import load_images

    cat = image_folder / "train" / "cat"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name in ("extra.gif", "extra.tif"):
        Image.fromarray(pixels).save(cat / name)
    (cat / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipping 1 file.*notes\.txt"):
        image_set = data.load_split(str(image_folder), "train")
    assert len(image_set) == 96 + 2
    for name in ("extra.gif", "extra.tif"):
        assert np.array_equal(np.rint(load_images([cat / name])[0] * 255), data.decode_image(cat / name).numpy())


def test_non_utf8_file_names_load_and_class_folder_names_are_one_line(image_folder, tmp_path):
    from cifarx.data import datasets as data

    cat = image_folder / "train" / "cat"
    os.rename(cat / "0000.png", os.fsencode(cat) + b"/caf\xe9.png")  # a Latin-1 file name
    assert len(data.load_split(str(image_folder), "train")) == 96
    os.rename(cat, os.fsencode(image_folder / "train") + b"/ch\xe2t")
    result = run(*[a.format(data=image_folder) for a in TRAIN], "--out", tmp_path / "r")
    assert_one_line_error(result, "not valid UTF-8", "ch\\xe2t")
    assert not (tmp_path / "r").exists()


def test_text_that_looks_like_rich_markup_is_printed_as_it_is(tmp_path):
    folder = tmp_path / "d[/x]"
    make_image_folder(folder, "train", classes=["[bold]plane", "car"], per_class=12)
    make_image_folder(folder, "test", classes=["[bold]plane", "car"], per_class=2)
    out, model = tmp_path / "r[/x]", tmp_path / "m[/x].onnx"
    result = run("train", "--data", folder, "--epochs", "1", "--batch-size", "8", "--val-size", "4", "--out", out)
    assert result.exit_code == 0, result.output
    printed = result.output.replace("\n", "")  # rich wraps long lines at spaces
    assert f"images of {folder} (" in printed and f"-> {out}" in printed
    result = run("export", out, "-o", model, "--parity-images", "4")
    assert result.exit_code == 0, result.output
    assert f"wrote {model}" in result.output.replace("\n", "")
    result = run("eval", model, "--data", folder, "--repeats", "1", "--warmup", "0", "--batch-sizes", "1")
    assert result.exit_code == 0, result.output
    assert "[bold]plane" in result.output  # the class name, not a bold "plane"
    image = folder / "test" / "car" / "0000.png"
    result = run("predict", model, image)
    assert result.exit_code == 0, result.output
    assert f"{image}:" in result.output.replace("\n", "") and "[bold]plane" in result.output


def test_flipped_byte_in_the_image_cache_is_noticed_and_the_cache_rebuilt(image_folder):
    from cifarx.data import datasets as data
    from cifarx.data.datasets import default_cache_dir

    first = data.load_split(str(image_folder), "train")
    (cache,) = default_cache_dir().glob("images-*.pt")
    raw = bytearray(cache.read_bytes())
    with zipfile.ZipFile(cache) as archive:
        images = max(archive.infolist(), key=lambda info: info.file_size)
    name_length, extra_length = struct.unpack("<HH", raw[images.header_offset + 26 : images.header_offset + 30])
    raw[images.header_offset + 30 + name_length + extra_length + images.file_size // 2] ^= 0x10  # one pixel's bit
    cache.write_bytes(raw)
    with pytest.warns(UserWarning, match="ignoring unreadable image cache.*checksum"):
        again = data.load_split(str(image_folder), "train")
    assert torch.equal(again.images, first.images)


def test_export_metadata_names_the_opset_that_was_written(trained_run, tmp_path):
    import onnx

    result = run("export", trained_run["run"], "-o", tmp_path / "x.onnx", "--opset", "20", "--parity-images", "4")
    assert result.exit_code == 0, result.output
    model = onnx.load(str(tmp_path / "x.onnx"))
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert written == 20 and metadata["opset"] == "20" and "opset 20" in result.output


def test_a_run_killed_between_best_and_last_checkpoint_can_be_started_again(image_folder, tmp_path):
    """best.pt without last.pt (a kill or a full disk at the first epoch's end): nothing to resume, so the resume
    says to start again, and starting again in the same folder is allowed."""
    run_dir = tmp_path / "run"
    train(tiny_config(image_folder, run_dir, epochs=1))
    (run_dir / "last.pt").unlink()
    (run_dir / "summary.json").unlink()
    assert_one_line_error(run("train", "--resume", run_dir), "nothing to resume", "start it again", str(run_dir))
    again = run("train", "--data", image_folder, "--out", run_dir, "--epochs", 1, "--batch-size", 16, "--val-size", 16)
    assert again.exit_code == 0, again.output
    assert (run_dir / "last.pt").is_file()


def test_combine_refuses_the_same_checkpoint_twice(trained_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run["run"], copy)  # another folder, the same network
    result = run("combine", trained_run["run"], copy, "--out", tmp_path / "pair")
    assert_one_line_error(result, "is the same checkpoint as")
    assert not (tmp_path / "pair").exists()


def test_the_next_write_removes_what_a_killed_write_left_but_not_a_live_writers_file(tmp_path):
    from cifarx import io

    target = tmp_path / "model.onnx"
    stale = tmp_path / ".model.onnx.abc12345.tmp"  # a writer killed mid-write
    stale.write_bytes(b"half")
    other = tmp_path / ".model.onnx.json.abc12345.tmp"  # another target's temporary file
    other.write_bytes(b"x")
    with io.atomic_path(target) as live:
        live.write_bytes(b"being written")
        io.atomic_write_text(target, "a concurrent write of the same target")  # must not remove `live`
        assert live.exists()
    assert not stale.exists() and other.exists() and target.read_bytes() == b"being written"
    assert temporary_files(tmp_path) == [other]


def test_a_data_folder_with_one_class_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "data", "train", classes=["cat"], per_class=32)
    result = run("train", "--data", data, "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 16)
    assert_one_line_error(result, "one class (cat)", "two or more")
    assert not (tmp_path / "run" / "last.pt").exists()
