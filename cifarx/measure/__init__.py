"""Measuring exported files: accuracy, latency, and the models x runtimes matrix."""
