"""The packed checkpoint directory: what a quantized model is on disk, and how to get a torch model back from it.

Layout of DIR:  packed.safetensors + float.safetensors + manifest.json (sage_export.format.checkpoint),
config.json, generation_config.json (if any) and the tokenizer files, so DIR is self-contained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..format.checkpoint import Checkpoint, CheckpointError, LayerRecord, load_checkpoint, save_checkpoint
from ..materialize import packable
from .quantize import QuantizedModel

FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def deterministic_stats(stats: dict) -> dict:
    """Per-layer stats without wall-clock timings, so the same seed gives a byte-identical manifest."""
    return {k: v for k, v in stats.items() if not k.endswith("time_s")}


def deterministic_info(info: dict | None) -> dict | None:
    """A calibration or budget description without wall-clock timings (for the manifest)."""
    if info is None:
        return None
    return {k: deterministic_info(v) if isinstance(v, dict) else v for k, v in info.items()
            if not k.endswith("time_s") and k != "timings"}


def layer_record(result) -> LayerRecord:
    if packable(result):
        packed = result.packed()
        return LayerRecord("sage", packed.attrs(), packed.tensors())
    n, k = result.shape
    # What a decoder of this method needs besides the tensors (bits, group_size, blocksize where present).
    extra = {a: getattr(result, a) for a in ("bits", "group_size", "blocksize") if hasattr(result, a)}
    return LayerRecord(result.method, {"in_features": k, "out_features": n, **extra}, result.stored_tensors())


def _quantized_key(key: str, quantized: set[str]) -> bool:
    """A state-dict key that belongs to a quantized layer's weight: its dense weight, or any packed buffer of a
    SageLinear standing in for it (only the bias is a float tensor of the model)."""
    module, _, attr = key.rpartition(".")
    return module in quantized and attr != "bias"


def float_tensors(model: torch.nn.Module, quantized: list[str], dtype: str) -> dict[str, np.ndarray]:
    """Every state-dict tensor that is not a quantized weight, in the stored float dtype. Tied weights once."""
    quantized = set(quantized)
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if _quantized_key(key, quantized) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().to(FLOAT_DTYPES[dtype]).numpy().copy()
    return out


@torch.no_grad()
def round_float_params(model: torch.nn.Module, quantized: list[str], dtype: str) -> None:
    """Round the unquantized parameters to their stored dtype in place, so an in-memory quantized model computes
    exactly what its checkpoint will."""
    quantized = set(quantized)
    for key, param in model.state_dict().items():
        if not _quantized_key(key, quantized) and param.is_floating_point():
            param.copy_(param.to(FLOAT_DTYPES[dtype]).to(param.dtype))


def write_checkpoint(out_dir: Path, loaded, qmodel: QuantizedModel, meta: dict, float_dtype: str = "float16") -> None:
    """Write into an existing (temporary) directory; the caller owns atomicity."""
    names = list(qmodel.layers)
    records = {name: layer_record(r) for name, r in qmodel.layers.items()}
    meta = dict(meta, float_dtype=float_dtype,
                layer_stats={name: deterministic_stats(r.stats) for name, r in qmodel.layers.items()})
    save_checkpoint(out_dir, records, float_tensors(loaded.model, names, float_dtype), meta)
    loaded.model.config.save_pretrained(out_dir)
    loaded.tokenizer.save_pretrained(out_dir)


def load_quantized(ckpt_dir: Path):
    """(model, tokenizer, checkpoint): a float32 torch model whose quantized Linears are SageLinear modules
    holding the packed weights (decoded on every call), so memory holds the checkpoint's size, not the dense
    model's."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.streaming import empty_model

    ckpt_dir = Path(ckpt_dir)
    ckpt = load_checkpoint(ckpt_dir)
    config = AutoConfig.from_pretrained(ckpt_dir)
    model = empty_model(config)  # parameters on the meta device until assigned below
    state = {k: torch.from_numpy(v).to(torch.float32) for k, v in ckpt.float_tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatch: torch lists every tensor; the first line names the model
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match its config.json: "
                              f"{_first_mismatch(str(exc))}") from None
    quantized_keys = {f"{n}.weight" for n in ckpt.layers}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    left = set(missing) - quantized_keys - tied
    if left or unexpected:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match its config.json: missing {sorted(left)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    model.eval()
    _apply_records(model, ckpt, ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    return model, tokenizer, ckpt


def _apply_records(model, ckpt: Checkpoint, ckpt_dir: Path) -> None:
    from ..runtime.sage_linear import replace_linears

    packed = ckpt.packed_linears()
    others = {n for n in ckpt.layers if n not in packed}
    if others:
        raise CheckpointError(f"checkpoint holds non-SAGE layers ({ckpt.layers[next(iter(others))].method}); "
                              "only SAGE checkpoints can be exported or evaluated")
    try:
        replace_linears(model, packed)
    except (KeyError, TypeError, ValueError) as exc:  # a packed layer that is not one of the model's Linears
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match its config.json: {exc}") from None
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match its config.json: no weight for {meta[0]}")


def _first_mismatch(message: str) -> str:
    lines = [l.strip() for l in message.splitlines() if "size mismatch" in l]
    return lines[0] if lines else message.strip().splitlines()[0]
