"""One small module per runtime other than ONNX Runtime: `open_runtime(artifact, threads) -> (run, device)`, and for
runtimes with a converter `convert(onnx_path, out_dir) -> [artifact, ...]` and `versions()`. They run in a child
process (`runtimes/child.py`); the table (`runtimes/table.py`) names them."""
