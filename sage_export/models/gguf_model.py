"""What a GGUF file's metadata and tensor names mean for a transformers decoder (llama, mistral, qwen2).

The config and the weights come out exactly as transformers' own GGUF loader makes them (the same keys, the same
dequantization, the same un-permutation of llama's q/k rows; tests/test_gguf_loading.py compares the two
bitwise), but the file is parsed once and each tensor is dequantized, copied into the model and dropped before
the next one is read.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .gguf_file import GGUFError, GGUFFile

# GGUF metadata key (after "<arch>.") -> transformers config key, for the architectures declared in
# architectures.py. qwen2 files carry rope.dimension_count too, but its config derives head_dim itself.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_NO_HEAD_DIM = ("qwen2",)
_TOKEN_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp stores llama's q/k rows in the order its rotary code wants; transformers' rotary wants them back.
_PERMUTED_ARCHITECTURES = ("llama",)


def config_dict(gguf: GGUFFile) -> dict:
    """Keyword arguments for AutoConfig.for_model, as transformers derives them from the same file."""
    arch, meta = gguf.architecture, gguf.metadata
    out = {"model_type": arch, "tie_word_embeddings": "output.weight" not in gguf.tensors}
    if "general.name" in meta:
        out["_model_name_or_path"] = meta["general.name"]
    for key, name in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta and not (name == "head_dim" and arch in _NO_HEAD_DIM):
            out[name] = meta[f"{arch}.{key}"]
    out.update({name: meta[key] for key, name in _TOKEN_IDS.items() if key in meta})
    if "vocab_size" not in out and "tokenizer.ggml.tokens" in meta:
        out["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    return out


def hf_name(gguf_name: str) -> str:
    """transformers' parameter name for a GGUF tensor name; GGUFError for a tensor this loader does not know."""
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in _TOP_TENSORS:
        return f"{_TOP_TENSORS[parts[0]]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{kind}"
    raise GGUFError(f"tensor {gguf_name!r} has no place in a llama/mistral/qwen2 decoder")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the rotary halves of q/k rows (its convert script's permute)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_tensor(gguf: GGUFFile, config: dict, name: str) -> np.ndarray:
    """One GGUF tensor as float32, in transformers' row order."""
    w = gguf.read(name)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if gguf.architecture in _PERMUTED_ARCHITECTURES and heads and kv_heads and (".attn_q." in name or
                                                                                ".attn_k." in name):
        w = unpermute_rows(w, heads if ".attn_q." in name else kv_heads)
    return w


def tensors(gguf: GGUFFile, config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name, float32 array) for every tensor, one at a time, in file order."""
    for name in gguf.tensors:
        yield hf_name(name), read_tensor(gguf, config, name)
