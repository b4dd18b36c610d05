"""The one interface every weight quantizer in this package returns.

Quantizers are pure functions of a float32 matrix W [N out, K in] (plus config, seed and, for data-aware
methods, a Hessian). They never touch files. What they return must be able to say two things honestly:
what the weight decodes to, and every array that has to be stored to decode it (SPEC §4).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class QuantizedWeight(Protocol):
    method: str  # e.g. "sage", "xnor", "billm", "rtn", "gptq"
    shape: tuple[int, int]  # (N, K)
    stats: dict[str, Any]  # JSON-serialisable per-layer stats (time_s, recon_error, ...)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: exactly what the stored tensors decode to (scales already rounded to their stored dtype)."""
        ...

    def stored_tensors(self) -> dict[str, np.ndarray]:
        """Every array a deployment must store to decode this weight, in its stored dtype and packed form.
        True bits (SPEC §4) are 8 * sum(nbytes) / (N*K) of exactly these."""
        ...

    def paper_bits(self) -> dict[str, float]:
        """Paper-style accounting: {"weight_bits": ..., "scale_bits": ...} per weight."""
        ...
