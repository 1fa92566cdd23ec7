"""Latency in depth: thread x batch sweeps, PyTorch side by side with parity, providers that must not fall back,
the GPU environment block, fp16 graphs and the latency plot."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cifarx.cli.main import cli
from cifarx.errors import CifarxError
from cifarx.measure.evaluate import evaluate_onnx
from cifarx.runtimes.measuring import environment, gpu_environment, predict_logits
from cifarx.runtimes.onnxfile import create_session, model_info

STATS = {"p50_ms", "p90_ms", "p99_ms", "images_per_s", "runs"}
HAS_GPU = Path("/dev/nvidia0").exists()


def test_sweep_has_a_latency_table_per_thread_count_and_batch_size(trained_run):
    result = evaluate_onnx(trained_run["onnx"], data=None, batch_sizes=[1, 3], threads=[1, 2], warmup=0, repeats=2)
    assert set(result["latency_by_threads"]) == {"1", "2"}
    for by_batch in result["latency_by_threads"].values():
        assert set(by_batch) == {"1", "3"}
        assert all(set(stats) == STATS and stats["runs"] == 2 for stats in by_batch.values())
    assert result["threads"] == 1 and result["latency"] == result["latency_by_threads"]["1"]
    single = evaluate_onnx(trained_run["onnx"], data=None, batch_sizes=[2], threads=1, warmup=0, repeats=1)
    assert "latency_by_threads" not in single and set(single["latency"]) == {"2"}


def test_compare_torch_times_pytorch_on_the_same_inputs_with_the_same_threads(trained_run, tmp_path):
    report_path, plots = tmp_path / "e.json", tmp_path / "plots"
    result = CliRunner().invoke(cli, [
        "eval", str(trained_run["onnx"]), "--data", str(trained_run["data"]), "--split", "val", "--batch-sizes", "1,4",
        "--threads", "1,2", "--repeats", "2", "--warmup", "0", "--compare-torch", str(trained_run["run"]),
        "--json", str(report_path), "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert set(report["torch_latency"]) == set(report["latency"]) == {"1", "4"}
    assert set(report["torch_latency"]["4"]) == STATS
    assert set(report["torch_latency_by_threads"]) == set(report["latency_by_threads"]) == {"1", "2"}
    assert report["torch"]["threads"] == report["threads"] == 1 and report["torch"]["same_threads_as_onnxruntime"]
    parity = report["parity"]
    assert parity["images"] == report["images"] == 16
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_delta"] < 1e-3
    assert "torch eager" in result.output and "parity with PyTorch" in result.output
    assert (plots / "model-latency.png").stat().st_size > 1000


def test_compare_torch_without_thread_count_pins_both_runtimes_to_torchs(trained_run):
    import torch

    result = evaluate_onnx(trained_run["onnx"], data=None, batch_sizes=[2], warmup=0, repeats=1,
                           compare_torch=trained_run["run"])
    assert result["threads"] == result["torch"]["threads"] == torch.get_num_threads()
    assert result["parity"]["top1_agreement"] == 1.0


def test_compare_torch_refuses_a_checkpoint_that_was_not_exported(trained_run, tmp_path):
    from cifarx.training.checkpoint import read_checkpoint, save_checkpoint

    payload = read_checkpoint(trained_run["run"] / "best.pt")
    payload["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    other = tmp_path / "other.pt"
    save_checkpoint(other, model_name=payload["model"]["name"], model_kwargs=payload["model"]["kwargs"],
                    class_names=payload["class_names"], state_dict=payload["state_dict"], config=payload["config"],
                    metrics=payload["metrics"])
    with pytest.raises(CifarxError, match="not the checkpoint"):
        evaluate_onnx(trained_run["onnx"], data=None, batch_sizes=[1], warmup=0, repeats=1, compare_torch=other)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the GPU providers can be created here")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_that_cannot_be_created_is_an_error_not_a_fallback(trained_run, tmp_path, provider):
    with pytest.raises(CifarxError, match=f"{provider} provider"):
        create_session(trained_run["onnx"], provider)
    result = CliRunner().invoke(cli, ["eval", str(trained_run["onnx"]), "--provider", provider,
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and f"{provider} provider" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_session_options_are_checked_and_applied(trained_run):
    session = create_session(trained_run["onnx"], graph_optimization="layout", threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(CifarxError, match="cudnn_conv_algo_search"):
        create_session(trained_run["onnx"], "cpu", cudnn_conv_algo_search="FASTEST")
    with pytest.raises(CifarxError, match="optimisation level"):
        create_session(trained_run["onnx"], graph_optimization="maximum")


def test_gpu_block_reads_nvidia_smi_when_present(trained_run, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA A100-SXM4-40GB, 550.54.15'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    gpu = gpu_environment(0)
    assert gpu["name"] == "NVIDIA A100-SXM4-40GB" and gpu["driver"] == "550.54.15"
    from onnxruntime.capi import build_and_package_info

    assert gpu["onnxruntime_cuda"] == getattr(build_and_package_info, "cuda_version", None)
    cpu_env = environment(create_session(trained_run["onnx"]))
    assert "gpu" not in cpu_env and cpu_env["providers_active"] == ["CPUExecutionProvider"]


def test_fp16_graph_keeps_parity_with_the_fp32_graph(trained_run, tmp_path):
    from cifarx.deploy.export import export_onnx

    report = export_onnx(trained_run["run"], tmp_path / "half.onnx", fp16=True, parity_count=16)
    assert report["top1_agreement"] == 1.0
    assert report["max_abs_logit_delta"] <= 1e-2 * max(1.0, report["max_abs_logit"])
    graph = onnx.load(str(tmp_path / "half.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer if t.data_type != onnx.TensorProto.INT64)
    # The same pixels through both graphs on ONNX Runtime CPU: the fp16 graph runs and predicts what fp32 predicts.
    images = np.random.default_rng(0).integers(0, 256, size=(32, 3, 32, 32), dtype=np.uint8)
    outputs = {}
    for name, path in (("fp32", trained_run["onnx"]), ("fp16", tmp_path / "half.onnx")):
        session = create_session(path)
        outputs[name] = predict_logits(session, model_info(session), images)
    assert (outputs["fp32"].argmax(1) == outputs["fp16"].argmax(1)).mean() >= 0.95
    assert np.abs(outputs["fp32"] - outputs["fp16"]).max() <= 2e-2 * max(1.0, np.abs(outputs["fp32"]).max())
