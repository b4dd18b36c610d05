"""Make freed memory go back to the operating system, for runs whose memory must stay bounded.

glibc serves allocations below its mmap threshold from heaps and keeps what is freed there for reuse; the threshold
starts at 128 KB and rises (up to 32 MB) each time a mapped block is freed. A streamed run or an unfolded ONNX
Runtime session allocates and frees buffers of a few MB thousands of times (decoded weights, their unpacking
intermediates), so after the threshold has risen those buffers pile up in fragmented heaps. Measured with
tools/bench_scale.py: the ORT check of the 0.5B qwen2 shape peaked at 12.3 GB with the threshold left alone (code
9bce920) and at 2.9 GB with it fixed at 1 MB (benchmarks/scale.md), the 1.1B llama shape's at 8.6 and 3.1 GB;
that step took 5 % less and 12 % more time.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MAP_AT_BYTES = 1 << 20
_done = False


def map_large_allocations(threshold: int = MAP_AT_BYTES) -> bool:
    """From now on, in this whole process, every allocation of `threshold` bytes or more is its own mapping,
    unmapped when freed (and the threshold no longer rises). False where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    return _done
