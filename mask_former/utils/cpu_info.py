"""What the benchmark tools print beside every figure: the CPU's model name and the flags that
decide the bfloat16 speed (figures compare only on the same CPU)."""
import platform
from typing import List

__all__ = ["BF16_CPU_FLAGS", "cpu_flags", "cpu_model"]

# AVX-512, AVX-512 bf16 instructions, AMX tiles with bf16
BF16_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo_field(name: str) -> str:
    """The value of the first ``name`` line of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo "model name", else ``platform.processor()``)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    """Those of :data:`BF16_CPU_FLAGS` the CPU has, sorted."""
    return sorted(set(_cpuinfo_field("flags").split()) & set(BF16_CPU_FLAGS))
