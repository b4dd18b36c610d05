"""Streamed models: quantizable weights read from the file one at a time, quantized layers held packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from sage_export.materialize import apply_dequantized
from sage_export.models import ModelLoadError, load_model, quantizable_linears
from sage_export.pipeline.artifact import float_tensors
from sage_export.pipeline.methods import Method
from sage_export.pipeline.quantize import quantize_model
from sage_export.runtime.sage_linear import SageLinear

PAPER = Method("sage", {"preset": "paper", "fixed_groups": 2, "fixed_rho": 0.05})


def _save_as(src, dst, dtype):
    loaded = load_model(src)
    loaded.model.to(dtype).save_pretrained(dst)
    loaded.tokenizer.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory):
    """Tied embeddings and q/k/v/o biases: the parts a streamed load must fill besides the embedding."""
    return make_tiny_llama(tmp_path_factory.mktemp("biased") / "m", seed=3, attention_bias=True,
                           tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_streamed_load_leaves_only_the_quantizable_weights_in_the_file(tiny_llama_dir, tmp_path, dtype):
    path = _save_as(tiny_llama_dir, tmp_path / "m", dtype)
    streamed, full = load_model(path, stream=True), load_model(path)
    linears = quantizable_linears(streamed.model, streamed.architecture)
    meta = {name for name, p in streamed.model.named_parameters() if p.is_meta}
    assert meta == {f"{name}.weight" for name in linears}
    for name in linears:
        w = streamed.weight(name)
        assert w.dtype == np.float32 and np.array_equal(w, full.weight(name))
    state = full.model.state_dict()
    for key, value in streamed.model.state_dict().items():
        if not value.is_meta:
            assert torch.equal(value, state[key]), key
    streamed.materialize()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.equal(streamed.model(ids).logits, full.model(ids).logits)


def test_streamed_data_free_quantization_matches_in_memory_and_holds_packed_layers(biased_dir):
    streamed, full = load_model(biased_dir, stream=True), load_model(biased_dir)
    q_streamed = quantize_model(streamed, PAPER, seed=4, progress=False, jobs=1)
    q_full = quantize_model(full, PAPER, seed=4, progress=False, jobs=1)
    for name, result in q_streamed.layers.items():
        a, b = result.packed().tensors(), q_full.layers[name].packed().tensors()
        assert all(np.array_equal(a[k], b[k]) for k in a), name
        assert isinstance(streamed.model.get_submodule(name), SageLinear)
    assert not any(p.is_meta for p in streamed.model.parameters())
    # The packed model computes what the decoded dense weights compute.
    dense = load_model(biased_dir)
    apply_dequantized(dense.model, q_full.layers)
    ids = torch.tensor([[1, 7, 2, 30, 11, 4]])
    with torch.no_grad():
        got, ref = streamed.model(ids).logits, dense.model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # A checkpoint's float tensors hold no packed buffer, and the biases of the quantized layers.
    floats = float_tensors(streamed.model, list(q_streamed.layers), "float16")
    assert "model.layers.0.self_attn.q_proj.bias" in floats
    assert not any(k.endswith(("sign_bits", "group_codes", "salient_q", "_bits")) for k in floats)
    assert set(floats) == set(float_tensors(dense.model, list(q_full.layers), "float16"))


def test_calibrated_methods_load_the_streamed_weights_first(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, stream=True)
    calib = torch.randint(3, 200, (2, 16))
    quantize_model(loaded, Method("gptq", {"bits": 3, "group_size": 32}), calib=calib, progress=False, jobs=1)
    assert not loaded.streamed
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_streamed_nan_is_rejected_at_load(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.down_proj.weight[2, 7] = float("inf")
    loaded.model.save_pretrained(tmp_path / "bad")
    loaded.tokenizer.save_pretrained(tmp_path / "bad")
    with pytest.raises(ModelLoadError, match="NaN or Inf: model.layers.1.mlp.down_proj.weight"):
        load_model(tmp_path / "bad", stream=True)


def test_streaming_needs_safetensors(tiny_llama_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    for path in (tmp_path / "m").glob("*.safetensors"):
        path.unlink()
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        load_model(tmp_path / "m", stream=True)
