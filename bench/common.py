"""What the benchmarks share: the machine each result was measured on (figures from different hosts
are never comparable, so each JSON carries the CPU, its relevant flags and the library versions) and
the SmolLM2-135M base model they run on."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path

# The flags that decide which kernels run: vector width, fused multiply-add, native bf16.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


# Where `make demo` materializes the base model; a benchmark without it materializes its own copy.
SMOLLM2 = Path("results/models/base/smollm2-135m-instruct")


def smollm2(scratch: Path) -> Path:
    """The SmolLM2-135M-Instruct directory: the demo's, or one materialized under `scratch`."""
    if SMOLLM2.exists():
        return SMOLLM2
    from sftpipe.model import ModelSource, materialize_base_model

    materialize_base_model(ModelSource("packaged:smollm2-135m-instruct"), scratch / "smollm2")
    return scratch / "smollm2"


def host_info() -> dict:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    lines = cpuinfo.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_flags": [flag for flag in RELEVANT_FLAGS if flag in flags],
        "versions": {name: version(name) for name in ("torch", "transformers", "trl", "peft")},
    }
