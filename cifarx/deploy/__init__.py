"""Deployment: checkpoint -> ONNX with metadata and parity, portable rewrites, model cards, int8 quantisation."""
