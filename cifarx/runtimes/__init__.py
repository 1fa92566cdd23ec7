"""Runtimes (torch-free): ONNX files and sessions, the table of runtimes a file ships to, measuring one of them."""
