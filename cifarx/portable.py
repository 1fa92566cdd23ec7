"""Graph rewrites that let every runtime load an exported file, without changing a single output bit.

GELU: torch's exporter writes `x * (0.5 * (1 + erf(x / sqrt 2)))` (Div, Erf, Add, Mul by 0.5, Mul by x). OpenCV
5.0's ONNX importer (classic and new engine alike) dies with a segmentation fault on exactly that order, while it
takes `(x * (1 + erf(x / sqrt 2))) * 0.5`, the order torch's older exporter wrote. The two are equal bit for bit:
multiplying by 0.5 only lowers the exponent, so it commutes with rounding (outside the subnormal range, ~1e-38).
ONNX Runtime fuses both orders into its own Gelu kernel, OpenVINO into its Gelu op.
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


def rewrite_file(path: str | Path, output: str | Path | None = None) -> int:
    """Apply `reorder_gelu` to an ONNX file (metadata untouched), writing `output` (default: in place) atomically."""
    from cifarx.io import atomic_path

    path = Path(path)
    model = onnx.load(str(path))
    count = reorder_gelu(model)
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(output or path) as temporary:
        onnx.save(model, str(temporary))
    return count
