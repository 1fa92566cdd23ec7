"""Graph rewrites that let every runtime load an exported file, without changing a single output bit.

GELU: torch's exporter writes `x * (0.5 * (1 + erf(x / sqrt 2)))` (Div, Erf, Add, Mul by 0.5, Mul by x). OpenCV
5.0's ONNX importer (classic and new engine alike) dies with a segmentation fault on exactly that order, while it
takes `(x * (1 + erf(x / sqrt 2))) * 0.5`, the order torch's older exporter wrote. The two are equal bit for bit:
multiplying by 0.5 only lowers the exponent, so it commutes with rounding (outside the subnormal range, ~1e-38).
ONNX Runtime fuses both orders into its own Gelu kernel, OpenVINO into its Gelu op.

Padded 1x1 convolutions: torch's exporter folds a zero Pad into the next Conv's `pads` (onnxscript's FuseConvPad;
shake-shake's shifted shortcut is one). OpenCV 5.0 computes a 1x1 Conv with non-zero pads from uninitialised
memory (errors from 10 to 1e26, changing run to run); an explicit zero Pad before an unpadded Conv is the same
arithmetic, and it runs right everywhere.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of a graph, by name."""
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _is_scalar(values: dict, name: str, expected: float) -> bool:
    value = values.get(name)
    return value is not None and value.size == 1 and float(value.reshape(())) == expected


def reorder_gelu(model: onnx.ModelProto) -> int:
    """Rewrite every `x * (0.5 * (1 + erf(x / c)))` in the main graph as `(x * (1 + erf(x / c))) * 0.5`, in place.

    Only the inputs of the two Muls change (same nodes, same output names); returns how many GELUs were rewritten.
    """
    graph = model.graph
    values = _constants(graph)
    producer = {output: node for node in graph.node for output in node.output}
    consumers = Counter(name for node in graph.node for name in node.input)
    consumers.update(output.name for output in graph.output)
    rewritten = 0
    for outer in graph.node:  # outer = Mul(x, half_times)
        if outer.op_type != "Mul" or len(outer.input) != 2:
            continue
        for x, half_times in (outer.input, reversed(outer.input)):
            half_mul = producer.get(half_times)
            if half_mul is None or half_mul.op_type != "Mul" or consumers[half_times] != 1:
                continue
            # half_mul = Mul(0.5, add) in either order; add = Add(erf, 1); erf = Erf(Div(x, c))
            names = list(half_mul.input)
            if _is_scalar(values, names[0], 0.5):
                half, added = names
            elif _is_scalar(values, names[1], 0.5):
                added, half = names
            else:
                continue
            add = producer.get(added)
            if add is None or add.op_type != "Add" or consumers[added] != 1:
                continue
            erf_out = next((name for name in add.input if producer.get(name) is not None
                            and producer[name].op_type == "Erf"), None)
            if erf_out is None or not any(_is_scalar(values, name, 1.0) for name in add.input if name != erf_out):
                continue
            div = producer.get(producer[erf_out].input[0])
            if div is None or div.op_type != "Div" or div.input[0] != x:
                continue
            half_mul.input[:] = [x, added]  # x * (1 + erf): the node keeps its output name
            outer.input[:] = [half_times, half]  # (x * (1 + erf)) * 0.5
            rewritten += 1
            break
    return rewritten


def unfold_pointwise_conv_pads(model: onnx.ModelProto) -> int:
    """Give every padded 1x1 Conv of the main graph an explicit zero Pad in front and no pads of its own, in place.

    Returns how many convolutions were changed."""
    graph = model.graph
    values = _constants(graph)
    rewritten, nodes = 0, []
    for node in graph.node:
        attributes = {attribute.name: attribute for attribute in node.attribute}
        kernel = values.get(node.input[1]).shape[2:] if node.op_type == "Conv" and node.input[1] in values else None
        pads = list(attributes["pads"].ints) if "pads" in attributes else []
        if kernel is None or any(size != 1 for size in kernel) or not any(pads):
            nodes.append(node)
            continue
        half = len(pads) // 2  # ONNX: [begin of each spatial axis..., end of each spatial axis...]
        pad_name, padded = f"{node.name or node.output[0]}_explicit_pads", f"{node.input[0]}_padded_for_{node.output[0]}"
        graph.initializer.append(numpy_helper.from_array(
            np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], dtype=np.int64), pad_name))
        nodes.append(onnx.helper.make_node("Pad", [node.input[0], pad_name], [padded], mode="constant",
                                           name=f"{node.name or node.output[0]}_pad"))
        node.input[0] = padded
        del attributes["pads"].ints[:]
        attributes["pads"].ints.extend([0] * len(pads))
        nodes.append(node)
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def make_portable(model: onnx.ModelProto) -> dict[str, int]:
    """Every rewrite of this module, in place: how many GELUs and padded 1x1 convolutions each changed."""
    return {"gelu_reordered": reorder_gelu(model), "pointwise_conv_pads_unfolded": unfold_pointwise_conv_pads(model)}


def rewrite_file(path: str | Path, output: str | Path | None = None) -> dict[str, int]:
    """`make_portable` on an ONNX file (metadata untouched), written to `output` (default: in place) atomically."""
    from cifarx.io import atomic_path

    path = Path(path)
    model = onnx.load(str(path))
    counts = make_portable(model)
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(output or path) as temporary:
        onnx.save(model, str(temporary))
    return counts
