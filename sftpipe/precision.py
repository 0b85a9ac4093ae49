"""Training precision: what `train.precision` resolves to on this host, and the dtype each precision
computes in. Shared by the stages that train and those that must compute as training does (the
preference reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from .io import PipelineError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# The dtype each training precision computes in, and stores the frozen base weights in.
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Whether `/proc/cpuinfo`'s flags include a native bf16 dot product (AVX512-BF16 or AMX)."""
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str) -> str:
    """`auto` picks bf16 where the hardware runs it natively (CUDA with bf16, or a CPU with AMX or
    AVX512-BF16), else fp16 on CUDA and fp32 on CPU. `bf16` is honoured everywhere (emulated, slowly,
    on a CPU without it)."""
    if precision not in PRECISIONS:
        raise PipelineError(f"config key 'train.precision': '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise PipelineError("config key 'train.precision': fp16 needs CUDA; use bf16 or fp32 on CPU")
        return precision
    return host_precision()


def host_precision(cpuinfo: str | None = None) -> str:
    """What `auto` resolves to on this host (see resolve_precision); on a CPU, from `cpuinfo` (this
    host's /proc/cpuinfo unless given)."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "fp32"
    return "bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"
