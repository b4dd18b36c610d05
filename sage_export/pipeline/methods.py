"""The quantization methods the harness can run, each a short declaration: how to call it on one weight matrix and
whether it needs calibration Hessians. The math lives in sage_export.quant; this module only wires names to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Method:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_calibration(self) -> bool:
        return self.name in ("billm", "gptq")

    @property
    def label(self) -> str:
        """Short unique name for tables, e.g. 'rtn-w3g128' or 'sage(fixed_groups=2)'."""
        if self.name in ("rtn", "gptq"):
            return f"{self.name}-w{self.params['bits']}g{self.params['group_size']}"
        if not self.params or self.name != "sage":
            return self.name
        return "sage(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"

    def sage_config(self):
        from ..quant.config import SageConfig

        return SageConfig(**self.params)

    def validate(self) -> None:
        """Cheap checks, run before any long work."""
        if self.name not in _RUNNERS and self.name != "fp":
            raise ValueError(f"unknown method {self.name!r}; choose from fp, {', '.join(sorted(_RUNNERS))}")
        if self.name == "sage":
            self.sage_config().validate()
        if self.name in ("rtn", "gptq"):
            if self.params.get("bits") not in (2, 3, 4) or self.params.get("group_size") not in (64, 128):
                raise ValueError(f"{self.name}: bits must be 2, 3 or 4 and group_size 64 or 128, got {self.params}")

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params), "label": self.label}


def _run_sage(m: Method, w: np.ndarray, h, seed: int):
    from ..quant.sage import quantize_sage

    return quantize_sage(w, m.sage_config(), seed=seed)


def _run_xnor(m: Method, w: np.ndarray, h, seed: int):
    from ..quant.xnor import quantize_xnor

    return quantize_xnor(w)


def _run_rtn(m: Method, w: np.ndarray, h, seed: int):
    from ..quant.rtn import quantize_rtn

    return quantize_rtn(w, bits=m.params["bits"], group_size=m.params["group_size"])


def _run_gptq(m: Method, w: np.ndarray, h, seed: int):
    from ..quant.rtn import quantize_gptq

    return quantize_gptq(w, h, bits=m.params["bits"], group_size=m.params["group_size"])


def _run_billm(m: Method, w: np.ndarray, h, seed: int):
    from ..quant.billm import quantize_billm

    return quantize_billm(w, h, **m.params)


_RUNNERS: dict[str, Callable] = {
    "sage": _run_sage,
    "xnor": _run_xnor,
    "rtn": _run_rtn,
    "gptq": _run_gptq,
    "billm": _run_billm,
}


def quantize_weight(method: Method, w: np.ndarray, hessian: np.ndarray | None, seed: int):
    return _RUNNERS[method.name](method, w, hessian, seed)
