"""The packed checkpoint: quantized layers of any method, the float tensors left unquantized, and a manifest.

Directory layout (docs/sage_binary_gemm.md, "Packed checkpoint"):

    packed.safetensors   every stored tensor of every quantized layer, key "<layer>.<tensor>"
    float.safetensors    the tensors kept in floating point, as given (embeddings, norms, lm_head, ...)
    manifest.json        format/version, meta, per-layer method/attrs/tensor specs, sha256 of every tensor and file

Saving is deterministic (sorted keys, no safetensors metadata, stable JSON), so equal inputs give byte-identical
files. Loading verifies every checksum, dtype and shape and reports the first problem as one CheckpointError line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors

from .atomic import atomic_file, atomic_write_text
from .sage_layout import PackedLinear

FORMAT_NAME = "sage-export-checkpoint"
FORMAT_VERSION = 3  # 3: contract v3 (16-bit salient columns, row_scales only where some r_n != 1)
PACKED_FILE = "packed.safetensors"
FLOAT_FILE = "float.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(ValueError):
    """The directory is not a valid packed checkpoint; the message names the file or tensor at fault."""


@dataclass
class LayerRecord:
    """One quantized layer as stored: its method name, its JSON attributes and its arrays (names without dots)."""

    method: str
    attrs: dict[str, Any]
    tensors: dict[str, np.ndarray]


@dataclass
class Checkpoint:
    layers: dict[str, LayerRecord]
    float_tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)

    def packed_linears(self) -> dict[str, PackedLinear]:
        """The layers packed for SageBinaryGemm (method "sage"), validated."""
        result = {}
        for name, record in self.layers.items():
            if record.method != "sage":
                continue
            try:
                result[name] = PackedLinear.from_tensors(record.tensors, **record.attrs)
            except (ValueError, TypeError) as exc:
                raise CheckpointError(f"layer {name}: not a valid SAGE packing: {exc}") from exc
        return result


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _little_endian(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def _tensor_bytes(array: np.ndarray) -> bytes:
    """The bytes a tensor checksum covers: C order, little-endian (what safetensors stores)."""
    return _little_endian(np.ascontiguousarray(array)).tobytes()


def _tensor_spec(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "sha256": _sha256(_tensor_bytes(array))}


def _json_default(value: Any) -> Any:
    # Stats often carry numpy scalars; JSON has no such type.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"meta/attrs value of type {type(value).__name__} is not JSON-serialisable")


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, default=_json_default) + "\n"


# safetensors' codes, and its writer's order: by dtype, larger codes first, then by name. The rank is the
# position of the dtype in the library's Dtype enum (tests/test_checkpoint.py compares against its writer).
_SAFETENSORS_DTYPES = {"bool": ("BOOL", 0), "uint8": ("U8", 4), "int8": ("I8", 5), "int16": ("I16", 9),
                       "uint16": ("U16", 10), "float16": ("F16", 11), "int32": ("I32", 13), "uint32": ("U32", 14),
                       "float32": ("F32", 15), "float64": ("F64", 16), "int64": ("I64", 17), "uint64": ("U64", 18)}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write a safetensors file (no metadata) one tensor at a time, byte for byte what safetensors' own writer
    gives, without first building the whole file in memory (that held a second copy of every packed layer).
    Atomic (atomic_file). Returns the file's {"bytes", "sha256"} for the manifest."""
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}  # 0-d ones become [1], as before
    unknown = sorted({a.dtype.name for a in tensors.values()} - set(_SAFETENSORS_DTYPES))
    if unknown:
        raise ValueError(f"dtype {unknown[0]} cannot be stored in safetensors")
    order = sorted(tensors, key=lambda name: (-_SAFETENSORS_DTYPES[tensors[name].dtype.name][1], name))
    header, offset = {}, 0
    for name in order:
        array = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name][0], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    digest, size = hashlib.sha256(), 0
    with atomic_file(path) as handle:
        for chunk in (len(head).to_bytes(8, "little"), head, *(_little_endian(tensors[n]) for n in order)):
            view = memoryview(chunk if isinstance(chunk, bytes) else chunk.reshape(-1).view(np.uint8))
            handle.write(view)
            digest.update(view)
            size += view.nbytes
    return {"bytes": size, "sha256": digest.hexdigest()}


def _flatten_layers(layers: dict[str, LayerRecord]) -> dict[str, np.ndarray]:
    flat = {}
    for layer, record in layers.items():
        for tname, array in record.tensors.items():
            if "." in tname or not tname:
                raise ValueError(f"layer {layer}: tensor name {tname!r} must be non-empty and contain no dot")
            flat[f"{layer}.{tname}"] = np.asarray(array)
    return flat


def save_checkpoint(dir: Path, layers: dict[str, LayerRecord], float_tensors: dict[str, np.ndarray],
                    meta: dict[str, Any]) -> None:
    """Write the three checkpoint files into dir (created if missing). Wrap in atomic_output_dir for an
    all-or-nothing directory."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    float_tensors = {name: np.asarray(array) for name, array in float_tensors.items()}
    files = {PACKED_FILE: write_safetensors(dir / PACKED_FILE, _flatten_layers(layers)),
             FLOAT_FILE: write_safetensors(dir / FLOAT_FILE, float_tensors)}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "layers": {
            name: {"method": record.method, "attrs": record.attrs,
                   "tensors": {tname: _tensor_spec(np.asarray(a)) for tname, a in record.tensors.items()}}
            for name, record in layers.items()
        },
        "float_tensors": {name: _tensor_spec(array) for name, array in float_tensors.items()},
        "files": files,
    }
    atomic_write_text(dir / MANIFEST_FILE, _dump_json(manifest))


def load_checkpoint(dir: Path) -> Checkpoint:
    """Read and verify a checkpoint written by save_checkpoint; any mismatch -> CheckpointError."""
    dir = Path(dir)
    manifest = _read_manifest(dir)
    try:
        stored = {fname: _read_verified_file(dir, fname, spec) for fname, spec in manifest["files"].items()}
        for required in (PACKED_FILE, FLOAT_FILE):
            if required not in stored:
                raise CheckpointError(f"{dir / MANIFEST_FILE}: no entry for {required}")
        packed, floats = stored[PACKED_FILE], stored[FLOAT_FILE]
        layers = {}
        expected_keys = set()
        for name, entry in manifest["layers"].items():
            tensors = {}
            for tname, spec in entry["tensors"].items():
                key = f"{name}.{tname}"
                expected_keys.add(key)
                tensors[tname] = _verified_tensor(packed, key, spec, PACKED_FILE)
            layers[name] = LayerRecord(entry["method"], entry["attrs"], tensors)
        float_tensors = {name: _verified_tensor(floats, name, spec, FLOAT_FILE)
                         for name, spec in manifest["float_tensors"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{dir / MANIFEST_FILE}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    _reject_unlisted(packed, expected_keys, PACKED_FILE)
    _reject_unlisted(floats, set(float_tensors), FLOAT_FILE)
    return Checkpoint(layers, float_tensors, manifest["meta"], manifest)


def _read_manifest(dir: Path) -> dict[str, Any]:
    path = dir / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {dir} is not a packed checkpoint")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format is not {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                              f"(this version reads {FORMAT_VERSION})")
    return manifest


def _read_verified_file(dir: Path, fname: str, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    path = dir / fname
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    data = path.read_bytes()
    if len(data) != spec["bytes"]:
        raise CheckpointError(f"{path}: expected {spec['bytes']} bytes, got {len(data)}")
    digest = _sha256(data)
    if digest != spec["sha256"]:
        raise CheckpointError(f"{path}: sha256 mismatch (expected {spec['sha256']}, got {digest})")
    try:
        return load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _verified_tensor(stored: dict[str, np.ndarray], key: str, spec: dict[str, Any], fname: str) -> np.ndarray:
    if key not in stored:
        raise CheckpointError(f"{fname}: tensor {key} listed in the manifest is missing")
    array = stored[key]
    got = _tensor_spec(array)
    for field_name in ("dtype", "shape", "sha256"):
        if got[field_name] != spec[field_name]:
            raise CheckpointError(f"{fname}: tensor {key} {field_name} mismatch "
                                  f"(expected {spec[field_name]}, got {got[field_name]})")
    return array


def _reject_unlisted(stored: dict[str, np.ndarray], expected: set[str], fname: str) -> None:
    extra = sorted(set(stored) - expected)
    if extra:
        raise CheckpointError(f"{fname}: tensor {extra[0]} is not listed in the manifest")
