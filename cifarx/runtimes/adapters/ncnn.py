"""ncnn (Tencent's mobile engine): pnnx converts the ONNX file to ncnn's .param (the graph, text) and .bin (the
weights, float32); the ncnn wheel runs it on the CPU.

ncnn has no batch axis (a Mat is one CHW image): the graph is converted at batch 1 and `run` feeds the images one
by one. So before pnnx the exports' test-time augmentation on the batch axis is unrolled into one branch per view
(`views_unrolled`, the same arithmetic: ONNX Runtime gives bit-identical logits on the rewritten graphs of every
shipped file); pnnx refuses a Concat or Slice along the batch axis otherwise.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
from pathlib import Path

from cifarx.runtimes.adapters.converting import constants, rewritten_copy, run_converter

CONVERTER = "pnnx"


def versions() -> dict:
    from importlib.metadata import version

    return {"runtime": version("ncnn"), "converter": version("pnnx")}


def pnnx_executable() -> str:
    """The pnnx program of the PyPI wheel, found without importing the package (which imports torch)."""
    spec = importlib.util.find_spec("pnnx")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "pnnx").is_file():
            return str(Path(folder) / "pnnx")
    return shutil.which("pnnx") or "pnnx"


def convert(onnx_path: Path, out_dir: Path) -> list[Path]:
    import ncnn

    out_dir = Path(out_dir).resolve()
    param, weights = out_dir / f"{Path(onnx_path).stem}.param", out_dir / f"{Path(onnx_path).stem}.bin"
    with tempfile.TemporaryDirectory(prefix="cifarx-pnnx-") as folder:
        scratch = Path(folder)
        try:
            source = rewritten_copy(Path(onnx_path), scratch, views_unrolled, strided_slices_as_pools)
        except ValueError:  # the batch axis used some other way: pnnx gets the file as it is, and says what fails
            source = scratch / "model.onnx"
            shutil.copyfile(onnx_path, source)
        intermediates = {name: scratch / f"model.{name}" for name in ("pnnxparam", "pnnxbin", "pnnxpy", "pnnxonnx",
                                                                       "ncnnpy")}
        output = run_converter([pnnx_executable(), str(source), "inputshape=[1,3,32,32]",
                                "fp16=0",  # pnnx's default rounds the stored weights to float16 (8.4e-4 on p)
                                *(f"{name}={path}" for name, path in intermediates.items()),
                                f"ncnnparam={param}", f"ncnnbin={weights}"], "pnnx", cwd=scratch)
    # pnnx exits 0 even when part of the graph has no ncnn form: its complaints, the layer types it wrote and
    # ncnn's own loader decide
    complaints = sorted({line.strip() for line in output.splitlines() if "not supported" in line})
    if complaints:
        raise RuntimeError(f"pnnx: {'; '.join(complaints)}")
    if not param.is_file() or not weights.is_file():
        raise RuntimeError("pnnx wrote no .param/.bin")
    layer_types = {line.split()[0] for line in param.read_text().splitlines()[2:] if line.split()}
    unknown = sorted(kind for kind in layer_types if ncnn.layer_to_index(kind) < 0)
    if unknown:
        raise RuntimeError(f"pnnx left layers ncnn cannot run: {', '.join(unknown)}")
    return [param, weights]


def open_runtime(artifact: Path, threads: int | None):
    import numpy as np
    import ncnn

    net = ncnn.Net()
    if threads:
        net.opt.num_threads = int(threads)
    # float32 throughout: on CPUs with F16C / AVX512-FP16 ncnn stores and computes in float16 by default
    # (measured: max |delta p| 5e-5 to 2e-4 against ONNX Runtime, no clear speed gain here)
    for option in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                   "use_bf16_packed", "use_vulkan_compute"):
        setattr(net.opt, option, False)
    if net.load_param(str(artifact)) != 0 or net.load_model(str(Path(artifact).with_suffix(".bin"))) != 0:
        raise RuntimeError(f"ncnn could not load {Path(artifact).name}")
    (input_name,) = net.input_names()
    # pnnx names the outputs out0, out1, ... in the ONNX file's order
    outputs = sorted(net.output_names(), key=lambda name: int(re.sub(r"\D", "", name) or 0))

    def run(batch: np.ndarray) -> list[np.ndarray]:
        results = [[] for _ in outputs]
        for image in np.asarray(batch, dtype=np.float32):
            extractor = net.create_extractor()
            extractor.input(input_name, ncnn.Mat(np.ascontiguousarray(image)).clone())  # the Mat owns its pixels
            for values, name in zip(results, outputs):
                status, mat = extractor.extract(name)
                if status != 0:
                    raise RuntimeError(f"ncnn could not compute {name} ({status})")
                values.append(np.array(mat, dtype=np.float32).reshape(-1))
        return [np.stack(values) for values in results]

    return run, f"CPU (ncnn {versions()['runtime']}, {net.opt.num_threads} threads, float32)"


def strided_slices_as_pools(model) -> int:
    """Each Slice that keeps every k-th row or column from the start (x[:, :, ::k, ::k], shake-shake's shortcut) as
    an AveragePool of a 1x1 window with that stride: the same elements. Why: pnnx refuses "slice with step 2"."""
    from onnx import helper

    graph = model.graph
    values = {name: value.reshape(-1).tolist() for name, value in constants(graph).items()}
    nodes, count = [], 0
    for node in graph.node:
        parts = [values.get(name) for name in node.input[1:5]] if node.op_type == "Slice" and len(node.input) == 5 else None
        if parts and None not in parts:
            starts, ends, axes, steps = parts
            by_axis = {axis % 4: (start, end, step) for start, end, axis, step in zip(starts, ends, axes, steps)}
            if (set(by_axis) <= {2, 3} and all(start == 0 and end >= 2**31 - 1 and step > 1
                                               for start, end, step in by_axis.values())):
                strides = [by_axis.get(axis, (0, 0, 1))[2] for axis in (2, 3)]
                nodes.append(helper.make_node("AveragePool", [node.input[0]], list(node.output), kernel_shape=[1, 1],
                                              strides=strides))
                count += 1
                continue
        nodes.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


# ---------------------------------------------------------------------------------------------- the ONNX pre-pass
# 1. Test-time augmentation on the batch axis is unrolled: Concat(axis 0) of views, the shared network on the
#    stacked batch, then Slice(axis 0, at Shape(input)[0]) or Reshape([k,-1,C]) + ReduceMean(axis 0) folding the
#    views back. Every batched tensor is tracked as a list of per-view tensors; per-sample ops are copied once per
#    view (same initializers), Concat/Slice on axis 0 become list operations, and the fold becomes (v0+...+vk-1)/k.
#    Ensembles' member averages (Unsqueeze(0) + Concat(0) + ReduceMean(0)) likewise.
# 2. ReduceMax over the last two axes with keepdims=1 becomes GlobalMaxPool (pnnx has no ReduceMax for ncnn).
INT64_MAX = 2**63 - 1


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def views_unrolled(model) -> int:
    """The graph with its batch-axis test-time augmentation unrolled into one branch per view, and ReduceMax over
    H and W as GlobalMaxPool (see the comment above); ValueError where the graph uses the batch axis otherwise."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    consts = constants(g)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    input_name = g.input[0].name
    views: dict[str, list[str]] = {input_name: [input_name]}
    batch_size_names = set()  # tensors equal to Shape(input)[0:1]
    folded = set()  # ReduceMean nodes already replaced
    stacks: dict[str, list[list[str]]] = {}  # name -> per-member view lists
    out_nodes = []

    def copy(node, inputs, outputs, suffix):
        return helper.make_node(node.op_type, inputs, outputs, name=(node.name or node.op_type) + suffix,
                                domain=node.domain, **_attrs(node))

    for node in g.node:
        batched = [i for i in node.input if i in views]
        if node.op_type == "Shape" and node.input[0] == input_name and _attrs(node).get("start", 0) == 0 \
                and _attrs(node).get("end") == 1:
            batch_size_names.add(node.output[0])
            out_nodes.append(node)
            continue
        if node.output[0] in folded:
            continue
        if node.op_type == "ReduceMax" and len(node.input) > 1 and node.input[1] in consts:
            axes = sorted(int(a) % 4 for a in consts[node.input[1]].reshape(-1))
            if axes == [2, 3] and _attrs(node).get("keepdims", 1) == 1:
                node = helper.make_node("GlobalMaxPool", [node.input[0]], list(node.output),
                                        name=(node.name or "ReduceMax") + "_as_gmp")
        # ensembles stack member outputs on a new leading axis: Unsqueeze(0) + Concat(0) + ReduceMean(0)
        if node.op_type == "Unsqueeze" and batched and node.input[1] in consts \
                and [int(a) for a in consts[node.input[1]].reshape(-1)] == [0]:
            stacks[node.output[0]] = [views[node.input[0]]]
            continue
        if node.op_type == "Concat" and _attrs(node)["axis"] == 0 and node.input[0] in stacks:
            if any(i not in stacks for i in node.input):
                raise ValueError(f"{node.name}: Concat mixes stacked and other tensors")
            stacks[node.output[0]] = [member for i in node.input for member in stacks[i]]
            continue
        if node.op_type == "ReduceMean" and node.input[0] in stacks:
            axes = [int(a) for a in consts[node.input[1]].reshape(-1)] if len(node.input) > 1 else None
            members = stacks[node.input[0]]
            if axes != [0] or _attrs(node).get("keepdims", 1) != 0 or len({len(m) for m in members}) != 1:
                raise ValueError(f"{node.name}: unsupported reduction of stacked members")
            mcount, k = len(members), len(members[0])
            mname = f"{node.output[0]}__m"
            g.initializer.append(numpy_helper.from_array(np.array(float(mcount), dtype=np.float32), mname))
            outs = []
            for j in range(k):
                acc = members[0][j]
                for i in range(1, mcount):
                    nxt = f"{node.output[0]}__v{j}_sum{i}"
                    out_nodes.append(helper.make_node("Add", [acc, members[i][j]], [nxt], name=nxt))
                    acc = nxt
                res = node.output[0] + ("" if k == 1 else f"__v{j}")
                out_nodes.append(helper.make_node("Div", [acc, mname], [res], name=res + "__div"))
                outs.append(res)
            views[node.output[0]] = outs
            continue
        if any(i in stacks for i in node.input):
            raise ValueError(f"{node.name}: {node.op_type} on stacked members")
        if not batched:
            out_nodes.append(node)
            continue
        src = views[batched[0]] if batched else None
        if node.op_type == "Shape":
            out_nodes.append(copy(node, [src[0]], list(node.output), ""))
            continue
        if node.op_type == "Concat" and _attrs(node)["axis"] == 0:
            if any(i not in views for i in node.input):
                raise ValueError(f"{node.name}: batch-axis Concat with a non-batched input")
            views[node.output[0]] = [v for i in node.input for v in views[i]]
            continue
        if node.op_type == "Slice" and len(node.input) >= 4 and node.input[3] in consts \
                and [int(a) for a in consts[node.input[3]].reshape(-1)] == [0]:
            if len(node.input) > 4 and node.input[4] and int(consts[node.input[4]].reshape(-1)[0]) != 1:
                raise ValueError(f"{node.name}: strided Slice on the batch axis")

            def where(name, k):
                if name in batch_size_names:
                    return 1
                v = int(consts[name].reshape(-1)[0])
                if v == 0:
                    return 0
                if v >= INT64_MAX // 2:
                    return k
                raise ValueError(f"{node.name}: Slice on the batch axis at a fixed row {v}")

            k = len(src)
            views[node.output[0]] = src[where(node.input[1], k):where(node.input[2], k)]
            continue
        if node.op_type == "Reshape" and node.input[1] in consts:
            shape = [int(s) for s in consts[node.input[1]].reshape(-1)]
            users = consumers.get(node.output[0], [])
            if len(src) > 1 and shape[0] == len(src) and len(users) == 1 and users[0].op_type == "ReduceMean":
                mean = users[0]
                m_axes = [int(a) for a in consts[mean.input[1]].reshape(-1)] if len(mean.input) > 1 else None
                if m_axes == [0] and _attrs(mean).get("keepdims", 1) == 0 and shape[1] == -1:
                    k = len(src)
                    acc = src[0]
                    for j in range(1, k):
                        nxt = f"{mean.output[0]}__sum{j}"
                        out_nodes.append(helper.make_node("Add", [acc, src[j]], [nxt], name=nxt))
                        acc = nxt
                    kname = f"{mean.output[0]}__k"
                    g.initializer.append(numpy_helper.from_array(np.array(float(k), dtype=np.float32), kname))
                    out_nodes.append(helper.make_node("Div", [acc, kname], [mean.output[0]],
                                                      name=mean.output[0] + "__div"))
                    views[mean.output[0]] = [mean.output[0]]
                    folded.add(mean.output[0])
                    continue
            if len(src) > 1 and shape[0] > 0:
                raise ValueError(f"{node.name}: Reshape of a stacked batch to {shape}")
        # per-sample op: one copy per view
        lengths = {len(views[i]) for i in batched}
        if len(lengths) != 1:
            raise ValueError(f"{node.name}: {node.op_type} mixes batches of {sorted(lengths)} views")
        k = lengths.pop()
        if any(i in batch_size_names for i in node.input):
            raise ValueError(f"{node.name}: {node.op_type} uses the batch size")
        for j in range(k):
            suffix = "" if k == 1 else f"__v{j}"
            ins = [views[i][j] if i in views else i for i in node.input]
            outs = [o + suffix if o else o for o in node.output]
            out_nodes.append(copy(node, ins, outs, suffix))
        for o in node.output:
            if o:
                views[o] = [o + ("" if k == 1 else f"__v{j}") for j in range(k)]

    for o in g.output:
        if o.name in views and views[o.name] != [o.name]:
            if len(views[o.name]) != 1:
                raise ValueError(f"output {o.name} still holds {len(views[o.name])} views")
            out_nodes.append(helper.make_node("Identity", views[o.name], [o.name]))

    # drop nodes whose outputs nobody uses (e.g. the Shape(input) that fed the batch-axis Slices)
    needed = {o.name for o in g.output}
    kept = []
    for n in reversed(out_nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in kept for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return len(kept)
