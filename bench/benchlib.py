"""What every benchmark here measures the same way: memory of this process, CPU time, and the machine.

Speed is only ever reported as a ratio against a baseline measured in the same run (machines here are shared
and noisy); each result JSON carries `machine()` so that a figure says which CPU and dtype it came from.
"""
from __future__ import annotations

import os
import platform
import resource


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: peak resident set size since start or the last reset_peak_rss(). Not ru_maxrss, which Linux
    carries over from the parent across fork + exec (a child would read at least its parent's RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line (Linux only)")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark VmHWM (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other processes' load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Without it torch's bf16 matmul takes a slow
    path (~30x slower than fp32 was measured on such an AMD EPYC), so bf16 figures there say little."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine() -> dict:
    """The CPU model, its core count and native bf16 support, and the torch build."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    import torch
    return {"cpu": model, "cpus": os.cpu_count(), "native_bf16": native_bf16(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
