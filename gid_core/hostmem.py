"""Host memory of training processes: keep freed memory for reuse instead of handing it back.

On the CPU, PyTorch's tensors come from the C library's ``malloc``. glibc serves blocks above its
mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings that go back to the kernel on
``free``, and trims the heap's free top above twice that threshold. A training step frees and
re-allocates the same tens of MiB of temporaries every iteration, so the kernel zero-fills and
faults in every page of them again, every step. The GID step pays most: its ROI-pooled features,
relation Gram blocks and their gradients are such temporaries (docs/benchmarks.md, Speed, sixth
round: kept for reuse, the GID step at K 40 is 6-8 % faster, the student step no faster).

PyTorch's CUDA caching allocator keeps freed blocks for reuse; on the CPU, PyTorch's own launcher
(``python -m torch.backends.xeon.run_cpu``) gets the same by preloading jemalloc or tcmalloc with
their decay turned off. ``retain_freed_memory`` gets it from glibc, with nothing to preload:
``mallopt`` sets the mmap threshold to glibc's maximum (blocks up to 32 MiB come from the heap)
and the trim threshold to 2 GiB (freed heap is kept up to that). The process's resident memory
then stays at its peak, as with the CUDA allocator. The engine calls it in its training and
evaluation processes on the CPU; ``GID_RETAIN_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable

ENV_SWITCH = "GID_RETAIN_FREED_MEMORY"

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit systems)
MMAP_THRESHOLD = 32 << 20
# mallopt takes an int
TRIM_THRESHOLD = (1 << 31) - 1


def retain_wanted() -> bool:
    """``GID_RETAIN_FREED_MEMORY``: unset or "1" (on), "0" (off); anything else is refused."""
    value = os.environ.get(ENV_SWITCH, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_SWITCH} must be 0 or 1, got {value!r}")
    return value == "1"


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """This process's glibc ``mallopt(param, value) -> 1 on success``; None where the C library is
    not glibc (musl, macOS, Windows), which have no such settings."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    mallopt = ctypes.CDLL(None).mallopt  # the process's own glibc
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def retain_freed_memory() -> bool:
    """Makes this process's malloc keep freed memory for reuse (module docstring). Process-wide
    and idempotent. Returns whether it applied: False where turned off (``GID_RETAIN_FREED_MEMORY=0``)
    or without glibc."""
    if not retain_wanted():
        return False
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
