"""The quantization methods the harness can run, each a short declaration: how to call it on one weight matrix and
whether it needs calibration. The math lives in sage_export.quant; this module only wires names to it.

SAGE has two presets (SPEC §2): "paper", the literal data-free reading, quantizes each matrix on its own like
the baselines; "v2" (the product default) spends a model-wide bit budget and runs in pipeline/sage_v2.py. A
SAGE method without a "preset" parameter is the paper reading (so results recorded before v2 keep their names).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

UNIFORM_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Method:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def preset(self) -> str | None:
        """"v2" or "paper" for SAGE, None for the other methods."""
        return self.params.get("preset", "paper") if self.name == "sage" else None

    @property
    def needs_calibration(self) -> bool:
        if self.name == "sage":
            return self.preset == "v2" and self.sage_recipe().needs_calibration
        return self.name in ("billm", "gptq")

    @property
    def streams(self) -> bool:
        """True when the method can run on a streamed model (load_model(stream=True)): every method but the GPTQ
        and BiLLM baselines, whose sequential driver writes dense weights back into the model."""
        return self.name not in ("gptq", "billm")

    @property
    def label(self) -> str:
        """Short unique name for tables, e.g. 'rtn-w3g128', 'sage(fixed_groups=2)', 'sage-v2(bits=3.0)'."""
        if self.name in ("rtn", "gptq"):
            return f"{self.name}-w{self.params['bits']}g{self.params['group_size']}"
        if self.name != "sage":
            return self.name
        params = {k: v for k, v in self.params.items() if k != "preset"}
        name = "sage-v2" if self.preset == "v2" else "sage"
        if not params:
            return name
        return name + "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"

    def sage_recipe(self):
        """The model-level SageRecipe of the v2 preset (None for the paper preset)."""
        from ..quant.config import RECIPE_FIELDS, SageRecipe

        if self.preset != "v2":
            return None
        return SageRecipe.from_fields({k: v for k, v in self.params.items() if k in RECIPE_FIELDS})

    def sage_config(self):
        """The per-matrix SageConfig: SPEC §2's defaults for the paper preset, V2_MATRIX's for v2, each with the
        method's own overrides."""
        from ..quant.config import PRESETS, RECIPE_FIELDS, SageConfig, V2_MATRIX

        if self.preset not in PRESETS:
            raise ValueError(f"unknown SAGE preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        own = {k: v for k, v in self.params.items() if k != "preset" and k not in RECIPE_FIELDS}
        if self.preset == "paper":
            return SageConfig(**own)
        return replace(V2_MATRIX, **own)

    def validate(self) -> None:
        """Cheap checks, run before any long work."""
        if self.name not in _RUNNERS and self.name != "fp":
            raise ValueError(f"unknown method {self.name!r}; choose from fp, {', '.join(sorted(_RUNNERS))}")
        if self.name == "sage":
            self.sage_config().validate()
            if self.preset == "v2":
                self.sage_recipe().validate()
            elif any(k in self.params for k in _recipe_fields()):
                raise ValueError(f"{', '.join(sorted(k for k in self.params if k in _recipe_fields()))}: only "
                                 "the v2 preset has a bit budget and calibration (the paper preset is data-free)")
        if self.name in ("rtn", "gptq"):
            if self.params.get("bits") not in (2, 3, 4) or self.params.get("group_size") not in UNIFORM_GROUP_SIZES:
                raise ValueError(f"{self.name}: code bits must be 2, 3 or 4 and group_size one of "
                                 f"{', '.join(map(str, UNIFORM_GROUP_SIZES))}, got {self.params}")

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params), "label": self.label}


def _recipe_fields() -> frozenset:
    from ..quant.config import RECIPE_FIELDS

    return RECIPE_FIELDS


def _run_sage(m: Method, w: np.ndarray, h, seed: int):
    from ..quant.sage import quantize_sage

    if m.preset == "v2":
        raise ValueError("the v2 preset quantizes a whole model under one budget (pipeline.sage_v2), not one matrix")
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
