"""Per-architecture declarations: where the decoder blocks are and which Linear layers SAGE-PTQ quantizes.

Adding an architecture means adding one declaration here, nothing else. Everything outside the listed Linear
layers (embeddings, lm_head, norms) stays in floating point.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # config.model_type values (HF) / general.architecture (GGUF)
    blocks: str  # attribute path of the ModuleList of decoder blocks
    linears: tuple[str, ...]  # Linear layers inside one block, in execution order
    final_norm: str = "model.norm"  # applied to the last block's output ...
    lm_head: str = "lm_head"  # ... before this projection to the vocabulary


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

LLAMA = Architecture("llama", ("llama",), "model.layers", _LLAMA_LINEARS)
MISTRAL = Architecture("mistral", ("mistral",), "model.layers", _LLAMA_LINEARS)
QWEN2 = Architecture("qwen2", ("qwen2",), "model.layers", _LLAMA_LINEARS)

ARCHITECTURES: tuple[Architecture, ...] = (LLAMA, MISTRAL, QWEN2)


class UnsupportedArchitecture(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(model_type: str | None) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
    )
