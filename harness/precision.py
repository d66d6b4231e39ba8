"""Which floating-point precision is fast on this machine: `auto` picks bf16 only where hardware computes it.

bf16 autocast is a large win where the hardware has bf16 arithmetic (CUDA GPUs since Ampere; x86 CPUs with
avx512_bf16 or amx_bf16: a 135M training step ~2.8x faster than fp32) and a disaster where it is emulated
(x86 CPUs with AVX2 only, most laptops and many cloud VMs: a bf16 matmul measured ~75x slower than fp32).
So `train.precision: auto` and the `auto` evaluation dtype ask the hardware: a CUDA device says whether it
supports bf16; an x86 CPU reports its bf16 instructions in its flags (/proc/cpuinfo); any other CPU is
measured with a short matmul probe. `FORGETTING_CPU_BF16=native|emulated` overrides the CPU's answer (tests,
or a CPU whose flags are hidden by a hypervisor).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from forgetting.harness.errors import UserError

FORCE_ENV = "FORGETTING_CPU_BF16"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Bf16Support:
    fast: bool
    reason: str  # how it was decided, for the log and environment.json


def _x86_cpu_flags() -> set[str] | None:
    """The CPU's feature flags on x86 Linux; None where the kernel does not list them."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _probe() -> Bf16Support:
    """Time a 256x256 matmul in bf16 and fp32 (best of 3): emulated bf16 is tens of times slower, native faster."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    fp32, bf16 = best(torch.float32), best(torch.bfloat16)
    return Bf16Support(bf16 <= fp32, f"measured: a bf16 matmul takes {bf16 / fp32:.1f}x the fp32 time")


@functools.cache
def cpu_bf16() -> Bf16Support:
    """Whether this CPU computes bf16 natively (fast) or emulates it (slow)."""
    forced = os.environ.get(FORCE_ENV)
    if forced:
        if forced not in ("native", "emulated"):
            raise UserError(f"{FORCE_ENV}={forced!r}: expected 'native' or 'emulated'")
        return Bf16Support(forced == "native", f"{FORCE_ENV}={forced}")
    flags = _x86_cpu_flags()
    if flags is not None:
        native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
        return Bf16Support(
            bool(native),
            f"CPU flags: {', '.join(native)}" if native else "CPU flags: no avx512_bf16 or amx_bf16 (bf16 is emulated)",
        )
    return _probe()


def device_bf16(device_type: str) -> Bf16Support:
    """bf16 support of the device that computes: cuda, cpu, or anything else (not chosen automatically)."""
    if device_type == "cuda":
        fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return Bf16Support(fast, f"CUDA GPU {'with' if fast else 'without'} bf16")
    if device_type == "cpu":
        return cpu_bf16()
    return Bf16Support(False, f"{device_type}: bf16 is not chosen automatically")


def compute_device_type() -> str:
    """The device training and evaluation run on when nothing else is said: cuda, mps, or the cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_precision(requested: str, device_type: str | None = None) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for `train.precision`; `auto` is bf16 where it is fast, fp32 elsewhere."""
    support = device_bf16(device_type or compute_device_type())
    if requested == "auto":
        return ("bf16" if support.fast else "fp32"), f"auto: {support.reason}"
    if requested == "bf16" and not support.fast:
        return "bf16", f"as configured, although bf16 is slow here ({support.reason}); auto would choose fp32"
    return requested, "as configured"


def resolve_eval_dtype(requested: str, device_type: str | None = None) -> tuple[str, str]:
    """(float32 | bfloat16 | float16, why) for evaluation weights; `auto` is bfloat16 where bf16 is fast."""
    if requested != "auto":
        return requested, "as configured"
    support = device_bf16(device_type or compute_device_type())
    return ("bfloat16" if support.fast else "float32"), f"auto: {support.reason}"
