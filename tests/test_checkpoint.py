"""Packed checkpoint: exact round trip, deterministic bytes, every kind of corruption caught; atomic outputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from sage_export.format import atomic
from sage_export.format.atomic import atomic_output_dir, atomic_write_text
from sage_export.format.bits import pack_uint
from sage_export.format.checkpoint import CheckpointError, LayerRecord, load_checkpoint, save_checkpoint
from sage_export.format.sage_layout import PackedLinear, dequantize, pack_sage

FILES = ("packed.safetensors", "float.safetensors", "manifest.json")


def sage_record(seed: int, n: int = 5, k: int = 13, nnz_fraction: float = 0.2) -> LayerRecord:
    rng = np.random.default_rng(seed)
    p = pack_sage(signs=rng.random((n, k)) < 0.5, group_index=rng.integers(0, 3, (n, k)),
                  group_scales=rng.uniform(0.01, 0.2, 3), salient_mask=rng.random((n, k)) < nnz_fraction,
                  salient_q=rng.integers(-7, 8, (n, k)), salient_scale=rng.uniform(0.01, 0.1, n), salient_bits=4)
    return LayerRecord("sage", p.attrs(), p.tensors())


def example_inputs():
    codes = np.random.default_rng(9).integers(0, 8, 6 * 13)
    layers = {
        "model.layers.0.self_attn.q_proj": sage_record(0),
        "model.layers.0.mlp.down_proj": sage_record(1, nnz_fraction=0.0),  # nnz = 0: empty tensors
        "model.layers.1.self_attn.k_proj": LayerRecord(
            "rtn", {"bits": 3, "group_size": 13},
            {"codes": pack_uint(codes, 3), "scales": np.linspace(0.1, 0.6, 6).astype(np.float16)}),
    }
    float_tensors = {"model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(4, 3) / 7,
                     "model.norm.weight": np.linspace(-1, 1, 3).astype(np.float16)}
    meta = {"model": "tiny", "config": {"rho": [0.001, 0.1], "seed": 0}, "stats": {"recon": np.float32(0.25)}}
    return layers, float_tensors, meta


def assert_same_array(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.fixture
def saved(tmp_path) -> Path:
    save_checkpoint(tmp_path / "ckpt", *example_inputs())
    return tmp_path / "ckpt"


def test_round_trip_is_exact(saved):
    layers, float_tensors, _ = example_inputs()
    ckpt = load_checkpoint(saved)
    assert ckpt.meta == {"model": "tiny", "config": {"rho": [0.001, 0.1], "seed": 0}, "stats": {"recon": 0.25}}
    assert set(ckpt.layers) == set(layers)
    for name, record in layers.items():
        assert ckpt.layers[name].method == record.method
        assert ckpt.layers[name].attrs == record.attrs
        assert set(ckpt.layers[name].tensors) == set(record.tensors)
        for tname, array in record.tensors.items():
            assert_same_array(ckpt.layers[name].tensors[tname], array)
    for name, array in float_tensors.items():
        assert_same_array(ckpt.float_tensors[name], array)
    packed = ckpt.packed_linears()
    assert set(packed) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    assert packed["model.layers.0.mlp.down_proj"].nnz == 0
    original = layers["model.layers.0.self_attn.q_proj"]
    np.testing.assert_array_equal(dequantize(packed["model.layers.0.self_attn.q_proj"]),
                                  dequantize(PackedLinear.from_tensors(original.tensors, **original.attrs)))
    manifest = ckpt.manifest
    assert manifest["format"] == "sage-export-checkpoint" and manifest["format_version"] == 3
    assert manifest["files"]["packed.safetensors"]["bytes"] == (saved / "packed.safetensors").stat().st_size


def test_saving_is_deterministic(tmp_path):
    layers, float_tensors, meta = example_inputs()
    save_checkpoint(tmp_path / "a", layers, float_tensors, meta)
    # Same content, reversed insertion order: still the same bytes.
    save_checkpoint(tmp_path / "b", dict(reversed(layers.items())), dict(reversed(float_tensors.items())), meta)
    for fname in FILES:
        assert (tmp_path / "a" / fname).read_bytes() == (tmp_path / "b" / fname).read_bytes(), fname


def test_corrupted_byte_is_caught(saved):
    path = saved / "packed.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="packed.safetensors: sha256 mismatch"):
        load_checkpoint(saved)


def edit_manifest(saved: Path, edit) -> None:
    path = saved / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_edited_file_sha_is_caught(saved):
    edit_manifest(saved, lambda m: m["files"]["float.safetensors"].update(sha256="0" * 64))
    with pytest.raises(CheckpointError, match="float.safetensors: sha256 mismatch"):
        load_checkpoint(saved)


def test_edited_tensor_sha_is_caught(saved):
    def edit(m):
        m["layers"]["model.layers.0.self_attn.q_proj"]["tensors"]["salient_q"]["sha256"] = "f" * 64
    edit_manifest(saved, edit)
    with pytest.raises(CheckpointError, match="tensor model.layers.0.self_attn.q_proj.salient_q sha256 mismatch"):
        load_checkpoint(saved)


def test_edited_dtype_is_caught(saved):
    edit_manifest(saved, lambda m: m["float_tensors"]["model.norm.weight"].update(dtype="float32"))
    with pytest.raises(CheckpointError, match="model.norm.weight dtype mismatch"):
        load_checkpoint(saved)


def rewrite_packed_file(saved: Path, change) -> None:
    """Change the packed file's tensors and re-sign the file entry, so only the tensor-level check can object."""
    path = saved / "packed.safetensors"
    tensors = load_safetensors(path.read_bytes())
    change(tensors)
    blob = save_safetensors(dict(sorted(tensors.items())))
    path.write_bytes(blob)
    edit_manifest(saved, lambda m: m["files"]["packed.safetensors"].update(
        bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()))


def test_missing_tensor_is_caught(saved):
    rewrite_packed_file(saved, lambda t: t.pop("model.layers.1.self_attn.k_proj.scales"))
    with pytest.raises(CheckpointError, match="tensor model.layers.1.self_attn.k_proj.scales .* missing"):
        load_checkpoint(saved)


def test_unlisted_tensor_is_caught(saved):
    rewrite_packed_file(saved, lambda t: t.update({"stray.tensor": np.zeros(2, np.int8)}))
    with pytest.raises(CheckpointError, match="stray.tensor is not listed"):
        load_checkpoint(saved)


def test_missing_manifest_or_file(saved, tmp_path):
    with pytest.raises(CheckpointError, match="manifest.json not found"):
        load_checkpoint(tmp_path)
    (saved / "float.safetensors").unlink()
    with pytest.raises(CheckpointError, match="float.safetensors is missing"):
        load_checkpoint(saved)


def test_wrong_version_is_caught(saved):
    edit_manifest(saved, lambda m: m.update(format_version=2))  # contract v2 layers stored int32 columns
    with pytest.raises(CheckpointError, match="format_version 2 is not supported"):
        load_checkpoint(saved)


def test_invalid_sage_layer_is_caught(tmp_path):
    record = sage_record(4)
    record.attrs["n_groups"] = 5  # needs 3 planes, 2 are stored
    save_checkpoint(tmp_path / "c", {"layer": record}, {}, {})
    with pytest.raises(CheckpointError, match="layer layer: not a valid SAGE packing: group_codes"):
        load_checkpoint(tmp_path / "c").packed_linears()


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_tensor_names_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no dot"):
        save_checkpoint(tmp_path / "d", {"l": LayerRecord("rtn", {}, {"a.b": np.zeros(1)})}, {}, {})


# atomic outputs


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_leaves_nothing_on_exception(tmp_path, error):
    with pytest.raises(error):
        with atomic_output_dir(tmp_path / "out", force=False) as temp:
            (temp / "half.bin").write_bytes(b"x")
            raise error()
    assert leftovers(tmp_path) == []


def test_atomic_dir_success_moves_into_place(tmp_path):
    with atomic_output_dir(tmp_path / "out", force=False) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".out.tmp-")
        (temp / "a.txt").write_text("new")
    assert leftovers(tmp_path) == ["out"]
    assert (tmp_path / "out" / "a.txt").read_text() == "new"


def test_atomic_dir_cleans_up_after_a_killed_run(tmp_path, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process id that no longer exists
    (tmp_path / f".out.tmp-{dead}-0badc0de").mkdir()
    (tmp_path / f".out.tmp-{dead}-0badc0de" / "model.onnx.data").write_bytes(b"half")
    (tmp_path / f".out.tmp-{os.getpid()}-0000beef").mkdir()  # a writer still alive: not ours to remove
    with atomic_output_dir(tmp_path / "out", force=False) as temp:
        (temp / "a.txt").write_text("new")
    assert leftovers(tmp_path) == [f".out.tmp-{os.getpid()}-0000beef", "out"]
    assert f"removed .out.tmp-{dead}-0badc0de" in capsys.readouterr().out


def test_atomic_dir_refuses_existing_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="pass --force"):
        with atomic_output_dir(tmp_path / "out", force=False):
            pytest.fail("must not be entered")
    assert (tmp_path / "out" / "old.txt").read_text() == "old"


def test_atomic_dir_force_replaces_and_failure_keeps_old(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out", force=True):
            raise RuntimeError()
    assert leftovers(tmp_path / "out") == ["old.txt"]
    with atomic_output_dir(tmp_path / "out", force=True) as temp:
        (temp / "new.txt").write_text("new")
    assert leftovers(tmp_path) == ["out"]
    assert leftovers(tmp_path / "out") == ["new.txt"]


def test_atomic_dir_unwritable_parent(tmp_path, monkeypatch):
    # Faked: the tests may run as root, for whom every directory is writable.
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="cannot write into"):
        with atomic_output_dir(tmp_path / "out", force=False):
            pytest.fail("must not be entered")
    assert leftovers(tmp_path) == []


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "f.json", "one")
    atomic_write_text(tmp_path / "f.json", "two")
    assert (tmp_path / "f.json").read_text() == "two"
    assert leftovers(tmp_path) == ["f.json"]


def test_streamed_writer_matches_safetensors_byte_for_byte(tmp_path):
    """write_safetensors writes one tensor at a time; the file must be the library's, for every dtype, empty
    and 0-d tensors, big-endian input and non-contiguous views, and the returned size and sha256 the file's."""
    from sage_export.format.checkpoint import _SAFETENSORS_DTYPES, write_safetensors

    rng = np.random.default_rng(5)
    cases = [{}, {"only": np.arange(7, dtype=np.uint8)}]
    for trial in range(6):
        tensors = {}
        for i, dtype in enumerate(rng.permutation(sorted(_SAFETENSORS_DTYPES))):
            shape = [(), (0,), (3,), (2, 5), (4, 1, 3)][rng.integers(5)]
            value = (rng.random(shape) < 0.5) if dtype == "bool" else (rng.standard_normal(shape) * 50)
            tensors[f"t{trial}.{rng.integers(100)}_{i}"] = np.asarray(value).astype(dtype)
        tensors["strided"] = np.arange(40, dtype=np.int32).reshape(5, 8)[:, ::3]
        tensors["big_endian"] = np.arange(6, dtype=">f4")
        cases.append(tensors)
    for i, tensors in enumerate(cases):
        path = tmp_path / f"{i}.safetensors"
        spec = write_safetensors(path, tensors)
        data = path.read_bytes()
        assert data == save_safetensors({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())})
        assert spec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(ValueError, match="complex64 cannot be stored"):
        write_safetensors(tmp_path / "x.safetensors", {"c": np.zeros(2, np.complex64)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.safetensors" for i in range(len(cases)))
