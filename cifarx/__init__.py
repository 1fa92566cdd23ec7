"""cifarx: train CIFAR-10-class models, export self-describing ONNX files, measure them on ONNX Runtime."""

__version__ = "0.1.0"
