"""Reading exported files without torch: checks, metadata and sessions on ONNX Runtime providers.

Used by `evaluate` and `predict`; imports only onnx (optional), onnxruntime and numpy, so consumers can copy it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from cifarx.errors import CifarxError
from cifarx.runtimes.table import PROVIDERS
# "layout" (NCHWc and other layout rewrites) is a level of its own only in recent ONNX Runtime releases.
GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "layout", "all")
CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")  # ORT's default is EXHAUSTIVE


def check_model_file(path: str | Path) -> Path:
    """The file exists, is ONNX, and refers to no external data outside its own folder."""
    path = Path(path)
    if not path.is_file():
        raise CifarxError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise CifarxError(f"model file is empty: {path}")
    try:
        import onnx
    except ImportError:  # the torch-free consumer path may run with onnxruntime alone
        return path
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises several types on garbage input
        raise CifarxError(f"{path} is not a readable ONNX file ({type(error).__name__})") from None
    if not proto.graph.node:
        raise CifarxError(f"{path} is not a readable ONNX file (empty graph)")
    folder = path.parent.resolve()
    function_nodes = [node for function in proto.functions for node in function.node]
    for tensor in _stored_tensors([*proto.graph.node, *function_nodes], proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                target = (folder / entry.value).resolve()
                if not target.is_relative_to(folder):
                    raise CifarxError(f"refusing {path}: tensor {tensor.name!r} points to data outside its folder ({entry.value})")
    return path


def _stored_tensors(nodes, graph=None):
    """Every tensor a model stores: initializers, and tensor attributes of nodes (Constant...), subgraphs included."""
    if graph is not None:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in nodes:
        for attribute in node.attribute:
            yield from [attribute.t, attribute.sparse_tensor.values, attribute.sparse_tensor.indices, *attribute.tensors]
            for subgraph in [attribute.g, *attribute.graphs]:
                yield from _stored_tensors(subgraph.node, subgraph)


def create_session(path: str | Path, provider: str = "cpu", *, threads: int | None = None,
                   graph_optimization: str = "all", device_id: int = 0, cudnn_conv_algo_search: str | None = None,
                   profile_prefix: str | Path | None = None):
    """The one way cifarx opens an ONNX file in ONNX Runtime: an InferenceSession on exactly `provider` (if ONNX
    Runtime silently falls back to CPU, that is an error); `profile_prefix` turns on its per-node profiler."""
    import onnxruntime as ort

    path = check_model_file(path)
    if provider not in PROVIDERS:
        raise CifarxError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise CifarxError(f"unknown graph optimisation level {graph_optimization!r}; choose from {', '.join(GRAPH_OPTIMIZATION)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise CifarxError(
            f"{provider} provider is not available in this ONNX Runtime build (available: {', '.join(available)})"
        )
    options = ort.SessionOptions()
    level = getattr(ort.GraphOptimizationLevel, {
        "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
        "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL",
    }[graph_optimization], None)
    if level is None:
        raise CifarxError(f"ONNX Runtime {ort.__version__} has no {graph_optimization!r} optimisation level; use all")
    options.graph_optimization_level = level
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    options.log_severity_level = 4  # ORT's errors reach us as exceptions (one line each); its log copy stays off stderr
    if cudnn_conv_algo_search is not None and cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCH:
        raise CifarxError(f"unknown cudnn_conv_algo_search {cudnn_conv_algo_search!r}; choose from {', '.join(CUDNN_CONV_ALGO_SEARCH)}")
    cuda_options: dict = {"device_id": device_id}
    if cudnn_conv_algo_search:
        cuda_options["cudnn_conv_algo_search"] = cudnn_conv_algo_search
    if provider == "cuda":
        providers = [(wanted, cuda_options)]
    elif provider == "tensorrt":  # TensorRT hands the nodes it cannot build to CUDA, which gets the same device
        providers = [(wanted, {"device_id": device_id}), (PROVIDERS["cuda"], cuda_options)]
    else:
        providers = [(wanted, {})]
    try:
        # ORT prints an "EP Error ... Falling back" banner to stdout before retrying on CPU; what it made is checked below
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CifarxError(f"ONNX Runtime could not load {path}: {message}") from None
    active = session.get_providers()
    if active[0] != wanted:
        raise CifarxError(
            f"{provider} provider could not be created (ONNX Runtime fell back to {', '.join(active)}; "
            f"available in this build: {', '.join(available)}); check the CUDA/cuDNN install or use --provider cpu"
        )
    return session


def model_info(session) -> dict:
    """Metadata and input description of a cifarx ONNX session; refuses inputs that are not [N,3,32,32]."""
    meta = session.get_modelmeta().custom_metadata_map
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise CifarxError(f"expected a model with one image input, found {len(inputs)} inputs")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [3, 32, 32]:
        raise CifarxError(f"model input must be [N,3,32,32], found {shape}")
    if isinstance(shape[0], int):  # ONNX Runtime refuses every other batch size: eval's sweeps and predict's lists
        raise CifarxError(f"model input has a fixed batch size of {shape[0]}; cifarx needs [N,3,32,32] with a free N "
                          "(cifarx export writes one)")
    try:
        class_names = json.loads(meta["class_names"])
    except (KeyError, ValueError):
        raise CifarxError("model metadata has no class_names: not a cifarx export") from None
    if not isinstance(class_names, list) or not class_names or not all(isinstance(n, str) for n in class_names):
        raise CifarxError(f"model metadata class_names must be a JSON list of names, got {_shorten(meta['class_names'])}")
    if meta.get("input_size", "32") != "32":  # the input is [N,3,32,32] (checked above): any other size is a lie
        raise CifarxError(f"model metadata input_size must be 32 (the input is [N,3,32,32]), got "
                          f"{_shorten(meta['input_size'])}")
    output_names = [o.name for o in session.get_outputs()]
    if len(class_names) != session.get_outputs()[0].shape[-1] and isinstance(session.get_outputs()[0].shape[-1], int):
        raise CifarxError(f"metadata lists {len(class_names)} classes but the model outputs {session.get_outputs()[0].shape[-1]}")
    return {
        "input_name": inputs[0].name,
        # ONNX Runtime's 'tensor(double)' as numpy names it (float64); cifarx feeds float32 or float16 only
        "input_dtype": _numpy_name(inputs[0].type),
        "output_names": output_names,
        "class_names": class_names,
        "metadata": dict(meta),
    }



def recorded_val_split(info: dict) -> dict:
    """The validation split recorded in a model's metadata: {'val_size': int >= 0 or None, 'seed': int or None,
    'digest': the held-out images' digest (16 hex digits) or None}."""
    raw = info["metadata"].get("val_split")
    if raw is None:
        return {"val_size": None, "seed": None, "digest": None}
    try:
        recorded = json.loads(raw)
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise CifarxError(f"model metadata val_split must be a JSON object, got {_shorten(raw)}")
    for key in ("val_size", "seed"):
        value = recorded.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CifarxError(f"model metadata val_split {key} must be a whole number >= 0, got {_shorten(json.dumps(value))}")
    digest = recorded.get("digest")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{16}", digest)):
        raise CifarxError(f"model metadata val_split digest must be 16 hex digits, got {_shorten(json.dumps(digest))}")
    return {"val_size": recorded.get("val_size"), "seed": recorded.get("seed"), "digest": digest}


def _numpy_name(onnx_type: str) -> str:
    """ONNX Runtime's 'tensor(double)' as numpy names it: float64."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)


def _shorten(text: str, limit: int = 60) -> str:
    """Metadata is the file's text, of any length: quote the start of it."""
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
