"""OpenVINO: reads the ONNX file itself; f32 inference on its CPU plugin."""

from __future__ import annotations

from pathlib import Path


def open_runtime(path: Path, threads: int | None):
    import openvino as ov

    core = ov.Core()
    # f32 asked for explicitly: on CPUs with bf16/AMX units OpenVINO would otherwise pick a lower precision itself.
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(batch):
        result = request.infer({0: batch})
        return [result[output] for output in outputs]

    devices = ", ".join(compiled.get_property("EXECUTION_DEVICES"))
    device = (f"{devices} ({core.get_property('CPU', 'FULL_DEVICE_NAME')}), precision "
              f"{compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}, "
              f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads")
    return run, device
