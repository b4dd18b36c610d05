"""A GGUF file read in one pass over its header, then one tensor at a time.

Why not transformers' GGUF loader: it parses the whole file two or three times with gguf's reader, which builds a
NumPy view per vocabulary string, and maps tensor names once per module; for the embedded 100 MB SmolLM2 that is
~30 s of a ~40 s load. Here the header (metadata and tensor table) is parsed with `struct` in well under a second,
and each tensor's bytes are dequantized only when asked for, so a caller can hold one tensor at a time.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata
entries (string key, u32 value type, value); tensor infos (string name, u32 n_dims, u64 dims fastest first,
u32 ggml type, u64 offset into the data section); the data section starts at the next multiple of
`general.alignment` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF this reader understands; the message is one line."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order (slowest dimension first), i.e. the file's dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFError(f"truncated header at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"truncated string at byte {self.pos}")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _ARRAY_DTYPES:  # numeric arrays in one read, not element by element
                dtype = np.dtype(_ARRAY_DTYPES[item])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise GGUFError(f"truncated array at byte {self.pos}")
                values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos = end
                return values
            return [self.value(item) for _ in range(count)]
        raise GGUFError(f"unknown metadata value type {kind} at byte {self.pos}")


def _quant_sizes(ggml_type: int) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFError(f"unknown ggml tensor type {ggml_type}") from None


class GGUFFile:
    """`GGUFFile(path).metadata` (key -> value; arrays as lists), `.tensors` (name -> TensorInfo, file order),
    `.read(name)` -> float32 array of that tensor, dequantized."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise GGUFError(f"cannot map {self.path}: {exc}") from None
        cur = _Cursor(self._map)
        if bytes(self._map[:4]) != b"GGUF":
            raise GGUFError("no GGUF magic at the start of the file")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
            raw.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, offset in raw:
            block, block_bytes = _quant_sizes(ggml_type)
            n = int(np.prod(dims, dtype=np.int64))
            if n % block:
                raise GGUFError(f"tensor {name}: {n} values is not a whole number of {block}-value blocks")
            info = TensorInfo(name, dims[::-1], ggml_type, data_start + offset, n // block * block_bytes)
            if info.offset + info.nbytes > len(self._map):
                raise GGUFError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors[name] = info

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError("no general.architecture in the metadata")
        return arch

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 in NumPy order, dequantized the way gguf's reference code does."""
        from gguf import GGMLQuantizationType, dequantize

        info = self.tensors[name]
        # Read through the file, not the mapping: pages touched through a mapping stay in this process's resident
        # set until it is unmapped, so reading a model tensor by tensor would end up holding the whole file.
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            raw = np.frombuffer(f.read(info.nbytes), dtype=np.uint8)
        if raw.size != info.nbytes:
            raise GGUFError(f"tensor {name} runs past the end of the file (truncated?)")
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        values = np.asarray(dequantize(raw.reshape(rows, -1), GGMLQuantizationType(info.ggml_type)), np.float32)
        # float32 tensors come back as views of the read-only file mapping
        return (values if values.flags.writeable else values.copy()).reshape(info.shape)
