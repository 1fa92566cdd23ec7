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


CALIBRATION_PRESET = "performance"  # NNCF's default: symmetric int8 weights and activations


class Int8:
    """OpenVINO on an int8 IR made by NNCF's post-training quantisation of the ONNX file (OpenVINO's own quantiser),
    calibrated on training images. As `cifarx quantize` does for ONNX Runtime, the first convolution (`fast`'s
    patch whitening: quantised, its accuracy fell to 43%) and the classifier stay float32."""

    CONVERTER = "nncf.quantize"

    @staticmethod
    def open_runtime(path: Path, threads: int | None):
        run, device = open_runtime(path, threads)
        # the f32 hint is for the layers left in float; the quantised ones run int8 whatever it says
        return run, device.replace("precision f32", "int8 IR (ends f32)")

    @staticmethod
    def versions() -> dict:
        from importlib.metadata import version

        return {"runtime": version("openvino"), "converter": version("nncf")}

    @staticmethod
    def convert(onnx_path: Path, out_dir: Path, calibration) -> list[Path]:
        import nncf
        import numpy as np
        import openvino as ov

        model = ov.Core().read_model(str(onnx_path))
        ops = model.get_ordered_ops()
        ends = [next(op for op in ops if op.get_type_name() == "Convolution"),
                next(op for op in reversed(ops) if op.get_type_name() == "MatMul")]
        images = calibration.astype(np.float32) / np.float32(255)  # what the model takes: [0,1] floats
        quantized = nncf.quantize(model, nncf.Dataset([images[i:i + 1] for i in range(len(images))]),
                                  subset_size=len(images), preset=nncf.QuantizationPreset.PERFORMANCE,
                                  ignored_scope=nncf.IgnoredScope(names=[op.get_friendly_name() for op in ends]))
        xml = Path(out_dir) / f"{Path(onnx_path).stem}.xml"
        ov.save_model(quantized, str(xml))
        return [xml, xml.with_suffix(".bin")]
