"""The GGUF loader (models/gguf_file.py, gguf_model.py) against transformers' own GGUF path: the same config, the
same weights bit for bit, the same tokenizer; and clear one-line errors for files it cannot use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sage_export.models import ModelLoadError, load_model, resolve_source
from sage_export.models.gguf_file import GGUFError, GGUFFile
from sage_export.models.loading import load_gguf_model

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 64, 128, 4, 2, 96, 2


def write_tiny_gguf(path, arch: str = "llama", tied: bool = True, qtype: str = "Q4_1", extra_tensor: bool = False,
                    seed: int = 0):
    """A 2-block decoder as llama.cpp would write it: matrices in `qtype`, norms in F32, one F16 matrix."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(VOCAB)
    w.add_name("tiny")
    q = getattr(gguf.GGMLQuantizationType, qtype)

    def matrix(name, n, k, kind=q):
        data = rng.standard_normal((n, k)).astype(np.float32) * 0.1
        w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    matrix("token_embd.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        matrix(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        matrix(f"blk.{i}.attn_k.weight", HIDDEN // HEADS * KV_HEADS, HIDDEN)
        matrix(f"blk.{i}.attn_v.weight", HIDDEN // HEADS * KV_HEADS, HIDDEN, gguf.GGMLQuantizationType.F16)
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        matrix(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
        if arch == "qwen2":
            for proj, n in (("q", HIDDEN), ("k", HIDDEN // HEADS * KV_HEADS), ("v", HIDDEN // HEADS * KV_HEADS)):
                w.add_tensor(f"blk.{i}.attn_{proj}.bias", (0.1 * rng.standard_normal(n)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    if not tied:
        matrix("output.weight", VOCAB, HIDDEN)
    if extra_tensor:
        w.add_tensor("mystery.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,tied,qtype", [("llama", True, "Q4_1"), ("llama", False, "Q8_0"),
                                             ("qwen2", False, "Q4_1")])
def test_same_config_and_weights_as_transformers(tmp_path, arch, tied, qtype):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied, qtype)
    ours, ref = load_gguf_model(path, torch.float32).eval(), transformers_reference(path)
    a, b = ours.config.to_dict(), ref.config.to_dict()
    diff = {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - {"quantization_config", "dtype", "torch_dtype"}
    assert not diff, {k: (a.get(k), b.get(k)) for k in diff}
    sa, sb = ours.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ids = torch.tensor([[1, 5, 9, 40, 7, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_tensors_are_read_one_at_a_time_as_float32(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    f = GGUFFile(path)
    assert f.architecture == "llama" and f.metadata["llama.block_count"] == LAYERS
    info = f.tensors["blk.0.ffn_down.weight"]
    assert info.shape == (HIDDEN, FFN)
    w = f.read("blk.0.ffn_down.weight")
    assert w.dtype == np.float32 and w.shape == (HIDDEN, FFN) and w.flags.writeable
    assert f.read("blk.0.attn_norm.weight").flags.writeable  # F32 tensors are copied out of the read-only map


def test_embedded_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    src = resolve_source(None)
    ours = load_model(src).tokenizer
    ref = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
    text = "The capital of France is Paris.\n  Salient weights keep 8 bits; the rest — one. <|im_end|>"
    assert ours(text).input_ids == ref(text).input_ids
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == \
        (ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)


def test_truncated_file_is_one_line_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file: .* runs past the end of the file"):
        load_model(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file: .*truncated"):
        resolve_source(head)


def test_unknown_tensor_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", extra_tensor=True)
    with pytest.raises(ModelLoadError, match="'mystery.weight' has no place"):
        load_model(path)


def test_wrong_version_is_refused(tmp_path):
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(GGUFError, match="version 1"):
        GGUFFile(path)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_streamed_model_reads_the_same_weights(tmp_path, arch, tied):
    from sage_export.models import architecture_for, quantizable_linears
    from sage_export.models.loading import streamed_gguf_model
    from sage_export.models.streaming import set_parameter

    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied)
    full = load_gguf_model(path, torch.float32).eval()
    model, reader = streamed_gguf_model(path, architecture_for(arch))
    names = quantizable_linears(model, architecture_for(arch))
    ref = full.state_dict()
    for key, value in model.state_dict().items():
        if key.removesuffix(".weight") in names:
            assert value.is_meta
            w = reader.read(key)
            assert np.array_equal(w, ref[key].numpy()), key  # llama's q/k rows un-permuted as in the full load
            set_parameter(model, key, torch.from_numpy(w))
        else:
            assert torch.equal(value, ref[key]), key
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.tensor([[1, 5, 9, 40, 7, 3]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, full(ids).logits)
