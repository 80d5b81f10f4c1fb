"""What the benchmark tools print beside every figure: the CPU's model name, family and model
numbers (one name can stand for several CPUs), the flags that decide the bfloat16 speed (figures
compare only on the same CPU), and whether PyTorch's allocator uses huge pages (which changes the
cost of large fresh tensors, see "Transparent huge pages" in docs/speed.md)."""
import os
import platform
from typing import List

import torch

__all__ = ["BF16_CPU_FLAGS", "cpu_flags", "cpu_model", "cpu_family_model", "huge_pages", "cpu_runs_bf16_fast",
           "no_bf16_kernels_note", "cpu_has_avx512_kernels", "cpu_has_avx2_kernels"]

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


def cpu_family_model() -> str:
    """"family F model M" from /proc/cpuinfo ("unknown" where it has no such fields)."""
    # "model" followed by its tab, so that the "model name" line does not match
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model\t")
    return f"family {family} model {model}" if family and model else "unknown"


def huge_pages() -> str:
    """"on" when PyTorch's CPU allocator backs large tensors with transparent huge pages
    (``THP_MEM_ALLOC_ENABLE=1``, which ``import mask_former`` sets unless it is set), else "off"."""
    return "on" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "off"


def cpu_runs_bf16_fast() -> bool:
    """Whether PyTorch's oneDNN computes bfloat16 on this CPU in its own instructions (AVX-512, with
    or without AVX-512 bf16 / AMX). Where it does not (AVX2 CPUs), bfloat16 convolutions and matrix
    products are converted to and from float32 around float32 kernels: an R50 MaskFormer at 512 x 512
    in bf16 took 4.4x the time of fp32 on an AVX2 AMD EPYC (family 25 model 1), see docs/speed.md."""
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if is_supported is not None:
        return bool(is_supported())
    return "avx512f" in cpu_flags()


def no_bf16_kernels_note() -> str:
    """What the warnings about bfloat16 on a CPU where :func:`cpu_runs_bf16_fast` is False say
    about the CPU (after "... on "), naming its vector instructions."""
    return (
        "a CPU for which PyTorch has no bfloat16 kernels (its vector instructions: "
        f"{torch.backends.cpu.get_cpu_capability()}): bfloat16 is converted to float32 around every product"
    )


def cpu_has_avx512_kernels() -> bool:
    """Whether PyTorch runs its AVX-512 kernels on this CPU (``torch.backends.cpu.get_cpu_capability()``;
    CPUs with AMX report AVX512 too). Channels-last training pays on such CPUs and not on AVX2 ones
    (``MODEL.TRAIN_CHANNELS_LAST``)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def cpu_has_avx2_kernels() -> bool:
    """Whether PyTorch runs its AVX2 kernels on this CPU, not AVX-512 ones (``get_cpu_capability()``
    is "AVX2"; not on Arm). NNPACK's Winograd 3x3 convolutions were measured to pay on such a CPU
    (``MODEL.WINOGRAD_CONV``)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"
