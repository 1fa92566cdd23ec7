"""The command line: each command parses its options, calls one library function and prints with rich."""

from cifarx.cli.main import main

__all__ = ["main"]
