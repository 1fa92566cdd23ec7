"""The runtimes an exported file ships to: one table, a runtime a row.

ONNX Runtime (the reference) runs in the calling process on one of its providers. Every other runtime is what
applications embed instead: each optional (a pip extra), each a small adapter (`runtimes/adapters/`) run in a
child process (`runtimes/child.py`), so a runtime or converter that crashes, hangs or refuses a file gives a
failed row with its reason instead of taking cifarx down. Measuring, comparing and reporting around a row are
written once. Torch-free: numpy and the runtime only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from cifarx.errors import CifarxError

# ONNX Runtime providers, by the name the CLI takes; the first is the CPU reference every runtime is compared with.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("cuda", "tensorrt")
REFERENCE = "onnxruntime"


@dataclass(frozen=True)
class Runtime:
    """One ship target: how to tell it is installed, what converts a cifarx ONNX file for it, how it is run."""

    name: str  # what --runtime / --runtimes / --to take
    title: str  # for people
    package: str  # the module whose presence means installed
    extra: str | None  # the cifarx extra that installs it (None: a dependency of cifarx itself)
    adapter: str | None  # "module" or "module:Object" with open_runtime (+ convert, versions); None: ONNX Runtime here
    provider: str = "cpu"  # ONNX Runtime rows: the execution provider
    converter: str | None = None  # the tool that writes its artifact; None: it reads the .onnx file itself
    artifact: str = ".onnx"  # the suffix of the file it loads
    threads: str = ""  # how its thread count is set
    embed: str = ""  # how an application loads the artifact (the API names apps use)
    feed: str = "float32 [N,3,32,32], RGB, pixels / 255 (normalisation is inside the model)"  # what the app feeds
    converter_env: str | None = None  # a converter outside this environment: the variable naming its python
    distribution: str | None = None  # the pip distribution whose version is the runtime's, where the module has several
    precision: str = "float32"  # "int8": its converter is the runtime's own quantiser, calibrated on training images


RUNTIMES = {row.name: row for row in (
    Runtime(REFERENCE, "ONNX Runtime (CPU)", "onnxruntime", None, None, threads="SessionOptions.intra_op_num_threads",
            embed="Ort::Session (C++), OrtSession (Kotlin/Java), ORTSession (Swift), onnxruntime.InferenceSession"),
    Runtime("onnxruntime-cuda", "ONNX Runtime (CUDA)", "onnxruntime", None, None, provider="cuda",
            embed="the CUDA provider appended to the session options"),
    Runtime("onnxruntime-tensorrt", "ONNX Runtime (TensorRT)", "onnxruntime", None, None, provider="tensorrt",
            embed="the TensorRT provider, CUDA for the nodes it does not build"),
    Runtime("openvino", "OpenVINO", "openvino", "openvino", "cifarx.runtimes.adapters.openvino",
            threads="INFERENCE_NUM_THREADS", embed="ov::Core::compile_model (C++), openvino.Core (Python)"),
    Runtime("openvino-int8", "OpenVINO int8 (NNCF post-training quantisation)", "nncf", "openvino",
            "cifarx.runtimes.adapters.openvino:Int8", converter="nncf.quantize", artifact=".xml",
            distribution="openvino", precision="int8", threads="INFERENCE_NUM_THREADS",
            embed="ov::Core::compile_model on the int8 IR (.xml + .bin), openvino.Core (Python)"),
    Runtime("opencv", "OpenCV DNN", "cv2", "opencv", "cifarx.runtimes.adapters.opencv", threads="cv2.setNumThreads",
            embed="cv::dnn::readNetFromONNX (C++), org.opencv.dnn.Dnn (Java/Kotlin)"),
    Runtime("ncnn", "ncnn", "ncnn", "ncnn", "cifarx.runtimes.adapters.ncnn", converter="pnnx", artifact=".param",
            threads="Option.num_threads",
            embed="ncnn::Net load_param/load_model + Extractor (C++; Android and iOS builds)",
            feed="one image per extract: float32 [3,32,32] (CHW), RGB, pixels / 255, into blob in0; out0 = logits, "
                 "out1 = probabilities"),
    Runtime("mnn", "MNN", "MNN", "mnn", "cifarx.runtimes.adapters.mnn", converter="MNNConvert", artifact=".mnn",
            threads="numThread of the runtime manager",
            embed="MNN::Express::Module::load (C++), MNN's Java API on Android, MNN.framework on iOS"),
    Runtime("iree", "IREE (llvm-cpu)", "iree.runtime", "iree", "cifarx.runtimes.adapters.iree",
            converter="iree-import-onnx + iree-compile", artifact=".vmfb", distribution="iree-base-runtime",
            threads="--task_topology_max_group_count",
            embed="iree_runtime_session_call_by_name (C API), iree.runtime (Python); compiled for one CPU target"),
    Runtime("litert", "LiteRT (TensorFlow Lite)", "ai_edge_litert", "litert", "cifarx.runtimes.adapters.litert",
            converter="onnx2tf", artifact=".tflite", threads="Interpreter(num_threads=)",
            converter_env="CIFARX_ONNX2TF_PYTHON",
            embed="org.tensorflow.lite.Interpreter / CompiledModel (Kotlin/Java), TFLInterpreter (Swift), "
                  "tflite::Interpreter (C++)"),
    Runtime("executorch", "ExecuTorch (XNNPACK)", "executorch", "executorch", "cifarx.runtimes.adapters.executorch",
            converter="onnx2torch + torch.export + XNNPACK lowering", artifact=".pte",
            threads="the XNNPACK threadpool (process-wide)",
            embed="executorch::extension::Module (C++), org.pytorch.executorch.Module (Kotlin/Java), "
                  "ExecuTorch.framework (Swift)"),
)}


CALIBRATION_IMAGES = 300  # what an int8 row's quantiser calibrates on by default (NNCF's default subset size)


def quantises(runtime: str) -> bool:
    """Whether a row's converter is its runtime's int8 quantiser (it needs calibration images)."""
    return RUNTIMES[runtime].precision == "int8"


def is_gpu(provider: str) -> bool:
    """Whether an ONNX Runtime provider name (`cpu`, `cuda`, `tensorrt`) runs on the GPU."""
    return provider in GPU_PROVIDERS


def torch_device(provider: str, device_id: int = 0) -> str:
    """The PyTorch device that runs where `provider` runs, for side-by-side timings."""
    return f"cuda:{device_id}" if is_gpu(provider) else "cpu"


def parse_runtimes(text: str) -> list[str]:
    """A comma list of runtime names (or `all`), checked against the table (installed or not)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(RUNTIMES)
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        raise CifarxError(f"unknown runtime {', '.join(unknown) or repr(text)}; choose from {', '.join(RUNTIMES)} "
                          "or all")
    return list(dict.fromkeys(names))


def missing(runtime: str) -> str | None:
    """None if `runtime` is installed, else the one line that says how to install it."""
    import os

    row = RUNTIMES[runtime]
    if importlib.util.find_spec(row.package) is None:
        return f"{runtime} is not installed: pip install 'cifarx[{row.extra}]'" if row.extra else f"{runtime} is not installed"
    if row.converter_env and not os.path.isfile(os.environ.get(row.converter_env, "")):
        return f"{runtime}'s converter {row.converter} is not set up: {row.converter_env} names its python (docs/runtimes.md)"
    return None


def require(runtime: str) -> None:
    """Refuse, in one line naming the extra to install, a runtime that is unknown or not installed."""
    parse_runtimes(runtime)
    message = missing(runtime)
    if message:
        raise CifarxError(message)


def version(runtime: str) -> str | None:
    """The installed version of a runtime's package (without importing it), or None."""
    from importlib.metadata import packages_distributions
    from importlib.metadata import version as package_version

    row = RUNTIMES[runtime]
    packages = [row.distribution] if row.distribution else packages_distributions().get(row.package.split(".")[0], [])
    return package_version(packages[0]) if packages else None
