"""What the CPU can do that decides a search's axes: its feature flags, and whether bf16 runs natively (AVX512-BF16
or AMX-BF16) or through slow fallbacks (measured ~20x slower than fp32 on an AVX2-only machine)."""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags in ``cpuinfo`` (default: /proc/cpuinfo); empty when they cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags show AVX512-BF16 or AMX-BF16 (where bf16 matmuls beat fp32)."""
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_FLAGS)


def bf16_slow_reason(cpuinfo: str | None = None) -> str | None:
    """Why bf16 would be slow on this CPU (no AVX512-BF16 or AMX-BF16 kernels: ~20x slower than fp32 measured on an
    AVX2-only machine); None when the CPU has native bf16 or its flags cannot be read."""
    flags = cpu_flags(cpuinfo)
    if not flags or flags & NATIVE_BF16_FLAGS:
        return None
    return "this CPU has no AVX512-BF16 or AMX-BF16 (bf16 ran ~20x slower than fp32 on such a CPU)"


def without_slow_bf16(quantizations: list[str]) -> tuple[list[str], str | None]:
    """``quantizations`` without bf16 where this CPU would run it slowly (and why), when something else is left to
    search; as given otherwise."""
    if "bf16" in quantizations and len(quantizations) > 1 and (why := bf16_slow_reason()):
        return [q for q in quantizations if q != "bf16"], why
    return list(quantizations), None
