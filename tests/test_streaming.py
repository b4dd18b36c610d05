"""Streamed models: quantizable weights read from the file one at a time, quantized layers held packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from sage_export.materialize import apply_dequantized
from sage_export.models import ModelLoadError, load_model, quantizable_linears
from sage_export.pipeline.artifact import float_tensors
from sage_export.pipeline.calibration import calibration_tokens
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


V2 = Method("sage", {"preset": "v2", "graph_samples": 500})


def test_streamed_v2_matches_in_memory_from_sampled_calibration_to_packed_bytes(biased_dir):
    """The default preset on a streamed model: the self-sampled calibration ids, every statistic and every packed
    byte equal the in-memory run's, while the model never holds more than one block's unquantized weights."""
    streamed, full = load_model(biased_dir, stream=True), load_model(biased_dir)
    ids_s, _ = calibration_tokens(streamed, None, 4, 24, seed=2, progress=False)
    ids_f, _ = calibration_tokens(full, None, 4, 24, seed=2, progress=False)
    assert torch.equal(ids_s, ids_f)
    assert all(p.is_meta for n, p in streamed.model.named_parameters() if n.endswith("proj.weight"))

    resident_blocks = []
    blocks = streamed.model.model.layers

    def count(_module, _args):  # how many blocks hold a real (not meta) weight while any block runs
        resident_blocks.append(sum(not getattr(b.self_attn.q_proj, "weight", torch.empty(0, device="meta")).is_meta
                                   for b in blocks if hasattr(b.self_attn.q_proj, "weight")))

    handles = [b.register_forward_pre_hook(count) for b in blocks]
    held, _ = calibration_tokens(full, None, 2, 24, seed=3, progress=False)  # the power is chosen on these
    q_streamed = quantize_model(streamed, V2, seed=4, calib=ids_s, progress=False, jobs=1, validation=held)
    for h in handles:
        h.remove()
    q_full = quantize_model(full, V2, seed=4, calib=ids_f, progress=False, jobs=1, validation=held)
    assert q_streamed.budget["activation_power_choice"] == q_full.budget["activation_power_choice"]
    assert resident_blocks and max(resident_blocks) == 1
    assert q_streamed.budget["true_bits"] == q_full.budget["true_bits"]
    for name, result in q_streamed.layers.items():
        a, b = result.packed().tensors(), q_full.layers[name].packed().tensors()
        assert all(np.array_equal(a[k], b[k]) for k in a), name
        assert result.stats["sensitivity"] == q_full.layers[name].stats["sensitivity"]
        assert isinstance(streamed.model.get_submodule(name), SageLinear)
    assert not any(p.is_meta for p in streamed.model.parameters())
    ids = torch.tensor([[1, 7, 2, 30, 11, 4]])
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(ids).logits, full.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_streamed_sequential_inputs_match_in_memory(biased_dir):
    """sequential_inputs runs each quantized block forward before the next block's Hessians: streamed (packed
    SageLinear modules, one block resident) and in memory (decoded dense weights) must still agree byte for byte."""
    method = Method("sage", {**V2.params, "sequential_inputs": True, "compensate_min_tokens_per_column": 0})
    streamed, full = load_model(biased_dir, stream=True), load_model(biased_dir)
    ids, _ = calibration_tokens(full, None, 4, 24, seed=2, progress=False)
    held, _ = calibration_tokens(full, None, 2, 24, seed=3, progress=False)
    q_streamed = quantize_model(streamed, method, seed=4, calib=ids, progress=False, jobs=1, validation=held)
    q_full = quantize_model(full, method, seed=4, calib=ids, progress=False, jobs=1, validation=held)
    assert q_streamed.budget["recipe"]["sequential_inputs"] is True
    for name, result in q_streamed.layers.items():
        a, b = result.packed().tensors(), q_full.layers[name].packed().tensors()
        assert all(np.array_equal(a[k], b[k]) for k in a), name


def test_a_block_that_raises_gives_its_weights_back(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, stream=True)
    block = loaded.model.model.layers[1]
    handle = block.mlp.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), loaded.running_weights(), torch.no_grad():
        loaded.model(torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert all(p.is_meta for n, p in loaded.model.named_parameters() if n.endswith("proj.weight"))


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
