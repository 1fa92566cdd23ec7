"""IREE (a compiler runtime): the ONNX importer of iree-base-compiler writes MLIR, `iree-compile` (llvm-cpu) a .vmfb
module, and iree-base-runtime runs it. The batch axis stays dynamic: one .vmfb serves any N (measured on
simple-cnn: no cost against a batch-256-only build).

The module is compiled for the CPU it is built on (`--iree-llvmcpu-target-cpu=host`) and may stop with SIGILL on
an older one; CIFARX_IREE_TARGET_CPU=generic (or x86-64-v3, ...) before converting builds a portable one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cifarx.runtimes.adapters.converting import constants, python_tool, rewritten_copy, run_converter

CONVERTER = "iree-import-onnx + iree-compile"
TARGET_CPU_VARIABLE = "CIFARX_IREE_TARGET_CPU"


def versions() -> dict:
    from importlib.metadata import version

    return {"runtime": version("iree-base-runtime"), "converter": version("iree-base-compiler")}


def reflect_pads_one_axis_each(model) -> int:
    """Each reflect Pad of several axes as a chain of one-axis reflect Pads: reflection is separable, so the values
    are the same. Why: IREE 3.13's llvm-cpu code generation fails on a reflect Pad of H and W together with a
    dynamic batch ("LLVM Translation failed for operation: builtin.unrealized_conversion_cast"); one axis at a
    time compiles."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    values = constants(graph)
    nodes, count = [], 0
    for node in graph.node:
        mode = next((attribute.s for attribute in node.attribute if attribute.name == "mode"), b"constant")
        pads = values.get(node.input[1]) if node.op_type == "Pad" and len(node.input) > 1 else None
        rank = len(pads) // 2 if pads is not None else 0
        axes = [axis for axis in range(rank) if pads[axis] or pads[axis + rank]]
        if mode != b"reflect" or len(axes) < 2 or (len(node.input) > 3 and node.input[3]):
            nodes.append(node)
            continue
        count += 1
        current = node.input[0]
        for k, axis in enumerate(axes):
            one_axis = np.zeros(2 * rank, dtype=np.int64)
            one_axis[axis], one_axis[axis + rank] = pads[axis], pads[axis + rank]
            pads_name = f"{node.output[0]}/pads_axis{axis}"
            graph.initializer.append(numpy_helper.from_array(one_axis, pads_name))
            output = node.output[0] if k == len(axes) - 1 else f"{node.output[0]}/axis{axis}"
            nodes.append(helper.make_node("Pad", [current, pads_name], [output], mode="reflect"))
            current = output
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def convert(onnx_path: Path, out_dir: Path) -> list[Path]:
    artifact = Path(out_dir).resolve() / f"{Path(onnx_path).stem}.vmfb"
    with tempfile.TemporaryDirectory(prefix="cifarx-iree-") as folder:
        source = rewritten_copy(Path(onnx_path), Path(folder), reflect_pads_one_axis_each)
        mlir = Path(folder) / "model.mlir"  # opset 18 files import as they are
        run_converter(python_tool("iree.compiler.tools.import_onnx", str(source), "-o", str(mlir)), "iree-import-onnx")
        run_converter(python_tool("iree.compiler.tools.scripts.iree_compile", str(mlir), "--iree-hal-target-device=local",
                                  "--iree-hal-local-target-device-backends=llvm-cpu",
                                  f"--iree-llvmcpu-target-cpu={os.environ.get(TARGET_CPU_VARIABLE, 'host')}",
                                  "-o", str(artifact)), "iree-compile")
    if not artifact.is_file():
        raise RuntimeError("iree-compile wrote no .vmfb")
    return [artifact]


def open_runtime(artifact: Path, threads: int | None):
    import numpy as np
    import iree.runtime as runtime
    from iree.runtime import _binding

    if threads == 1:  # every dispatch inline on the calling thread
        device, threading = _binding.get_cached_hal_driver("local-sync").create_default_device(), "local-sync, 1 thread"
    else:
        # The worker pool is sized from the flags in force when the local-task driver is first made; the binding
        # caches that driver, so in one process the first thread count asked for holds (the child is one open).
        if threads:
            runtime.flags.parse_flags(f"--task_topology_max_group_count={int(threads)}")
        device = _binding.get_cached_hal_driver("local-task").create_default_device()
        threading = f"local-task, {threads or os.cpu_count()} threads"
    config = runtime.Config(device=device)
    module = runtime.VmModule.mmap(config.vm_instance, str(artifact))
    entry = runtime.load_vm_module(module, config)["main_graph"]  # the importer names it after the ONNX graph

    def run(batch: np.ndarray) -> list[np.ndarray]:
        outputs = entry(np.ascontiguousarray(batch, dtype=np.float32))
        return [np.asarray(output.to_host()) for output in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]

    return run, f"CPU (IREE {versions()['runtime']} llvm-cpu, {threading})"
