"""Process-wide switches, set once where a cifarx process starts (the CLI entry point, a benchmark's main), never
at import time and never inside a library function that a test imports."""

from __future__ import annotations

import ctypes
import os
import platform
import sys


def configure_process() -> None:
    """Switches every cifarx command wants: figures are written to files, so matplotlib never needs a display."""
    os.environ.setdefault("MPLBACKEND", "Agg")


def quiet_onnxruntime() -> None:
    """ONNX Runtime's own multi-line log warnings stay off the terminal: cifarx checks what it made and reports
    problems in one line (sessions also get log_severity_level 4, in onnxfile.create_session)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS; True if it took.

    A training step's activations are blocks of tens to hundreds of MB. glibc serves each from a fresh mmap and
    unmaps it when freed, so every step faults all those pages in again: for `fast` at batch 1024 on the 2-core
    machine, 740,000 page faults and 1.5 s of kernel time per 5 s step. No mmap for large blocks and no heap
    trimming (what LD_PRELOAD=jemalloc does, without a system package) makes the heap settle at the step's peak.
    Process-wide, so set where the process starts (`cifarx train`, a benchmark's main), never at import or
    by a library function; a no-op where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols, glibc's among them (find_library would run ldconfig)
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from glibc's <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# The vector instruction sets that decide how fast these CPUs train and run models (machines of one kind differ:
# some have AVX-512 with VNNI, others AVX2 only), as /proc/cpuinfo names them.
ISA_FLAGS = ("avx512_vnni", "avx_vnni", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx2")


def cpu_info(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """The CPU's model name with its family and model numbers, and its flags, from /proc/cpuinfo (or the text
    given); the platform's name and no flags where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():  # the first processor's lines; every core of one machine is alike
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        # Virtual machines often name only "Intel(R) Xeon(R) Processor": the model number tells those apart
        # (two with the same name and flags trained bfloat16 1.6x apart, docs/benchmarks.md).
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name, set(fields.get("flags", "").split())


def cpu_description() -> dict:
    """The CPU model, its ISA flags and cores (no torch import: `cifarx eval` records it too)."""
    name, flags = cpu_info()
    return {"cpu": name, "isa_flags": [flag for flag in ISA_FLAGS if flag in flags], "cores": os.cpu_count()}


def machine() -> dict:
    """What a training time was measured on: the CPU description and the threads torch computes with."""
    import torch

    return {**cpu_description(), "threads": torch.get_num_threads()}


def end_process(code: int) -> None:
    """Exit with `code`; a torchrun rank (WORLD_SIZE > 1) skips the interpreter's finalization.

    A rank's gloo worker threads can still be dropping the last collective's tensors when the main thread exits;
    freeing a tensor that has a Python object takes the GIL, and a thread that asks for it while the interpreter
    finalizes is ended by a forced unwind that aborts the process (SIGABRT, "terminate called without an active
    exception"; 3 of 170 runs of the two-rank test on a 2-core machine that 2-3 busy processes loaded; a core dump
    shows the stack). destroy_process_group does not stop those threads, since DistributedDataParallel keeps the
    group alive. By now every file is written and closed, so the rank flushes its output and leaves by os._exit."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    sys.exit(code)
