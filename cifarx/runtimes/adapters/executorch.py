"""ExecuTorch (PyTorch's edge runtime) with the XNNPACK delegate.

ExecuTorch converts from a PyTorch module, not from ONNX, so `convert` goes ONNX -> PyTorch with onnx2torch,
then torch.export (dynamic batch 1..MAX_BATCH) -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte.
`convert_module` does the same from a torch.nn.Module (e.g. a cifarx checkpoint's model), skipping onnx2torch.

onnx2torch 1.5.15 has no converters for the opset-18 forms the dynamo exporter writes (ReduceMean/ReduceMax with
axes as input, Resize-18, Pad-18, Reshape allowzero=1), so the ONNX graph is first rewritten to opset 17 with the
same arithmetic (onnx.version_converter; Pad without `axes` kept as is; allowzero=1 -> 0 where the target shape
is a constant without zeros; noop_with_empty_axes=0 dropped; negative Reduce axes made positive, since
XNNPACK's amax lowering rejects dim -1/-2). Nothing here imports torch at module import time.
"""

from __future__ import annotations

import json
from pathlib import Path

from cifarx.runtimes.adapters.converting import constants

CONVERTER = "onnx2torch"
MAX_BATCH = 256  # upper bound of the exported batch dimension; ExecuTorch memory-plans for it; run() loops above
TARGET_OPSET = 17
PTE_NAME = "model.pte"
SIDECAR_NAME = "model.json"


def versions() -> dict:
    from importlib.metadata import version

    return {"runtime": version("executorch"), "converter": version("onnx2torch")}


# ------------------------------------------------------------------------------------------------ converting


def _downgrade_onnx(model):
    """The ONNX model rewritten to opset 17 with the same arithmetic, in forms onnx2torch 1.5.15 converts."""
    import onnx
    from onnx import helper, version_converter

    model = onnx.ModelProto.FromString(model.SerializeToString())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TARGET_OPSET)
    if opset > TARGET_OPSET:
        # onnx has no 18->17 adapter for Pad; Pad-18 without its `axes` input means what Pad-13 means: hide it.
        hidden = "cifarx.keep"
        for node in model.graph.node:
            if node.op_type == "Pad" and node.domain in ("", "ai.onnx") and len(node.input) <= 3:
                node.domain = hidden
        model.opset_import.append(helper.make_opsetid(hidden, 1))
        model = version_converter.convert_version(model, TARGET_OPSET)
        for node in model.graph.node:
            if node.domain == hidden:
                node.domain = ""
        for index in reversed([i for i, o in enumerate(model.opset_import) if o.domain == hidden]):
            del model.opset_import[index]
    values = constants(model.graph)
    ranks = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if value.type.tensor_type.HasField("shape"):
                ranks[value.name] = len(value.type.tensor_type.shape.dim)
    except Exception:
        pass
    for node in model.graph.node:
        if node.op_type.startswith("Reduce"):  # the converter leaves this opset-18 attribute (default 0) behind
            kept = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(kept)
            rank = ranks.get(node.input[0])
            for attribute in node.attribute:  # same reduction, axes counted from the front: XNNPACK's amax
                if attribute.name == "axes" and rank and any(a < 0 for a in attribute.ints):  # takes only 2/3
                    normalised = [a + rank if a < 0 else a for a in attribute.ints]
                    del attribute.ints[:]
                    attribute.ints.extend(normalised)
        elif node.op_type == "Reshape":  # allowzero only differs from 0 when the shape holds a 0
            for attribute in node.attribute:
                if attribute.name == "allowzero" and attribute.i == 1:
                    shape = values.get(node.input[1])
                    if shape is not None and not (shape == 0).any():
                        attribute.i = 0
    return model


# ------------------------------------------------------------------ making onnx2torch's graph exportable
# onnx2torch's Reshape/Slice/Pad/Resize modules read their shape arguments from tensors at run time
# (torch.any(shape == 0), .numpy(), .tolist()): torch.export sees those as data-dependent and refuses. The shipped
# files compute these arguments from constants and the batch size only, so they are probed by running the graph at
# three batch sizes, each integer entry fitted as a*N + b, and the modules are replaced by plain torch calls that
# take Python ints (and the input's symbolic batch size N).

def _spec_values(spec, n):
    return [a * n + b for a, b in spec]


def _reshape_op(x, n, spec):
    shape = [x.shape[i] if v == 0 else v for i, v in enumerate(_spec_values(spec, n))]
    return x.reshape(shape)


def _slice_op(x, n, starts, ends, axes, steps):
    import torch

    starts, ends = _spec_values(starts, n), _spec_values(ends, n)
    axes = list(range(len(starts))) if axes is None else [a + x.dim() if a < 0 else a for a in _spec_values(axes, n)]
    steps = [1] * len(starts) if steps is None else _spec_values(steps, n)
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 0:  # ONNX reverse slice = flip, then the mirrored forward slice
            flips.append(axis)
            start, end, step = -start - 1, -end - 1, -step
        index[axis] = slice(start, end, step)
    if flips:
        x = torch.flip(x, dims=flips)
    return x[tuple(index)]


def _pad_op(x, pads, mode, value):
    import torch.nn.functional as F

    half = len(pads) // 2
    torch_pads = []
    for axis in reversed(range(half)):  # ONNX [b1..bk, e1..ek] -> torch (last axis first) [b_k, e_k, ...]
        torch_pads += [pads[axis], pads[axis + half]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # reflect/replicate want only the padded axes
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return F.pad(x, torch_pads, mode=mode, value=value)
    return F.pad(x, torch_pads, mode=mode)


def _resize_op(x, n, sizes, scales, mode, align_corners):
    import torch.nn.functional as F

    if sizes is not None:
        return F.interpolate(x, size=_spec_values(sizes, n)[2:], mode=mode, align_corners=align_corners)
    return F.interpolate(x, scale_factor=[float(s) for s in scales[2:]], mode=mode, align_corners=align_corners)


def _make_exportable(gm):
    """Replace onnx2torch's tensor-argument modules by calls with Python ints; raise if an argument is not
    a function of the batch size alone."""
    import inspect

    import torch
    import torch.fx

    records: dict = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                records.setdefault(node.name, []).append(value.detach().reshape(-1).tolist())
            elif isinstance(value, torch.Tensor) and value.numel() <= 8 and node.op == "get_attr":
                records.setdefault(node.name, []).append(value.detach().reshape(-1).tolist())
            return value

    sizes = (2, 3, 5)
    with torch.no_grad():
        for n in sizes:
            Probe(gm).run(torch.rand(n, 3, 32, 32))

    def spec(arg, what):
        if arg is None:
            return None
        if not isinstance(arg, torch.fx.Node) or arg.name not in records:
            raise RuntimeError(f"{what}: argument {arg} is not a small constant tensor")
        v2, v3, v5 = records[arg.name]
        fitted = []
        for p, q, r in zip(v2, v3, v5):
            a = q - p
            b = p - 2 * a
            if a * 5 + b != r:
                raise RuntimeError(f"{what}: argument {arg.name} is not linear in the batch size ({p}, {q}, {r})")
            fitted.append((int(a), int(b)) if float(a).is_integer() and float(b).is_integer() else (a, b))
        return fitted

    modules = dict(gm.named_modules())
    placeholder = next(node for node in gm.graph.nodes if node.op == "placeholder")
    with gm.graph.inserting_after(placeholder):
        batch_node = gm.graph.call_function(torch.ops.aten.sym_size.int, (placeholder, 0))
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        kind = type(modules[node.target]).__name__
        module = modules[node.target]
        if kind not in ("OnnxReshape", "OnnxSlice", "OnnxPadDynamic", "OnnxResize"):
            continue
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
        params = list(inspect.signature(module.forward).parameters)
        args = [bound.arguments.get(p) for p in params] + [None] * 5
        if kind == "OnnxReshape":
            new_args = (args[0], batch_node, spec(args[1], kind))
            target = _reshape_op
        elif kind == "OnnxSlice":
            new_args = (args[0], batch_node, spec(args[1], kind), spec(args[2], kind), spec(args[3], kind),
                        spec(args[4], kind))
            target = _slice_op
        elif kind == "OnnxPadDynamic":
            fitted = spec(args[1], kind)
            if any(a for a, _ in fitted):
                raise RuntimeError(f"{kind}: pads depend on the batch size")
            value = 0.0
            if args[2] is not None:
                value = float(records[args[2].name][0][0])
            new_args = (args[0], [b for _, b in fitted], module.mode, value)
            target = _pad_op
        elif kind == "OnnxResize":
            from onnx2torch.node_converters.resize import _onnx_mode_to_torch_mode

            mode = _onnx_mode_to_torch_mode(module.onnx_mode, 2)
            scales = spec(args[2], kind)
            new_args = (args[0], batch_node, spec(args[3], kind), None if scales is None else [b for _, b in scales],
                        mode, module.align_corners)
            target = _resize_op
        else:
            continue
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(target, tuple(new_args))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def _lower(module, out_dir: Path, output_names: list[str], max_batch: int = MAX_BATCH) -> list[Path]:
    """torch.export with a dynamic batch, XNNPACK lowering, .pte + a small JSON sidecar in out_dir."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = module.eval()
    example = (torch.rand(2, 3, 32, 32),)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    # With oneDNN/NNPACK enabled, ExecuTorch's passes re-run conv on fake tensors, torch 2.14's conv backend choice
    # guards `batch < 16` on the trace hint (2) and the shape env's range shrinks to [2, 15]: the .pte would then be
    # memory-planned for at most 15 images. Switching both off while converting keeps the declared bound.
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        try:
            program = torch.export.export(module, example, dynamic_shapes=({0: batch},), strict=False)
        except Exception as error:
            raise RuntimeError(f"torch.export failed: {_first_line(error)}") from None
        try:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            left_out = _not_delegated(edge)
            executorch_program = edge.to_executorch()
        except Exception as error:
            raise RuntimeError(f"ExecuTorch lowering failed: {_first_line(error)}") from None
    pte = Path(out_dir) / PTE_NAME
    pte.write_bytes(executorch_program.buffer)
    sidecar = Path(out_dir) / SIDECAR_NAME
    info = {"max_batch": max_batch, "dynamic_batch": True, "outputs": output_names,
            "not_delegated": left_out}
    sidecar.write_text(json.dumps(info) + "\n")
    return [pte, sidecar]


def _not_delegated(edge) -> dict:
    """Ops left outside the XNNPACK delegate (run by ExecuTorch's portable/optimized kernels), with counts."""
    counts: dict = {}
    for node in edge.exported_program().graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target)).split("(")[0]
        if "executorch_call_delegate" in name or "getitem" in name or "sym_size" in name:
            continue
        name = name.split("::")[-1].replace("aten.", "")
        counts[name] = counts.get(name, 0) + 1
    return counts


class _Outputs:
    """Wraps a classifier that returns logits into (logits, softmax probabilities), the exported interface."""

    @staticmethod
    def wrap(module):
        import torch

        class LogitsAndProbabilities(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, images):
                logits = self.inner(images)
                return logits, logits.softmax(dim=1)

        return LogitsAndProbabilities(module).eval()


def convert(onnx_path: Path, out_dir: Path) -> list[Path]:
    """ONNX -> (opset-17 rewrite) -> onnx2torch module -> torch.export -> XNNPACK-lowered .pte in out_dir."""
    import onnx

    try:
        model = onnx.load(str(onnx_path))
        output_names = [o.name for o in model.graph.output]
        model = _downgrade_onnx(model)
    except Exception as error:
        raise RuntimeError(f"ONNX opset rewrite failed: {_first_line(error)}") from None
    try:
        from onnx2torch import convert as onnx_to_torch

        module = onnx_to_torch(model).eval()
    except Exception as error:
        raise RuntimeError(f"onnx2torch failed: {_first_line(error)}") from None
    try:
        module = _make_exportable(module)
    except Exception as error:
        raise RuntimeError(f"making the onnx2torch graph exportable failed: {_first_line(error)}") from None
    return _lower(module, Path(out_dir), output_names)


def convert_module(module, out_dir: Path, add_probabilities: bool = True) -> list[Path]:
    """A torch.nn.Module taking [N,3,32,32] floats in [0,1] -> .pte in out_dir (no ONNX, no onnx2torch).

    A module that returns logits only is wrapped to return (logits, softmax probabilities) like the ONNX files;
    pass add_probabilities=False for one that already returns both."""
    if add_probabilities:
        module = _Outputs.wrap(module)
    return _lower(module, Path(out_dir), ["logits", "probabilities"])


# ------------------------------------------------------------------------------------------------ running


def open_runtime(artifact: Path, threads: int | None):
    import numpy as np
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if threads:
        # process-wide XNNPACK/ExecuTorch threadpool; "unsafe" = not while another method is executing
        portable_lib._unsafe_reset_threadpool(int(threads))
    artifact = Path(artifact)
    runtime = Runtime.get()
    if not runtime.backend_registry.is_available("XnnpackBackend"):
        raise RuntimeError("this executorch build has no XnnpackBackend")
    program = runtime.load_program(artifact)
    method = program.load_method("forward")
    planned = method.metadata.input_tensor_meta(0).sizes() if hasattr(method.metadata, "input_tensor_meta") else None
    sidecar = artifact.with_name(SIDECAR_NAME)
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    max_batch = int(info.get("max_batch") or (planned[0] if planned else 1))
    dynamic = bool(info.get("dynamic_batch", False))

    def run_chunk(chunk: np.ndarray) -> list[np.ndarray]:
        count = len(chunk)
        if not dynamic and count < max_batch:  # fixed-batch artifact: pad, then cut
            chunk = np.concatenate([chunk, np.zeros((max_batch - count, *chunk.shape[1:]), chunk.dtype)])
        outputs = method.execute([torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))])
        return [o.detach().numpy()[:count].copy() for o in outputs]

    def run(batch: np.ndarray) -> list[np.ndarray]:
        batch = np.asarray(batch, dtype=np.float32)
        if len(batch) <= max_batch:
            return run_chunk(batch)
        parts = [run_chunk(batch[start:start + max_batch]) for start in range(0, len(batch), max_batch)]
        return [np.concatenate(column) for column in zip(*parts)]

    count = threads or portable_lib._threadpool_get_thread_count()
    device = f"CPU (ExecuTorch {versions()['runtime']} XNNPACK, {count} threads)"
    return run, device
