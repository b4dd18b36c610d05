import json
import shutil

import pytest
import torch

from sage_export.models import (ModelLoadError, architecture_for, load_model, quantizable_linears,
                                resolve_source, UnsupportedArchitecture)


def test_every_declared_architecture_resolves():
    for t in ("llama", "mistral", "qwen2"):
        assert architecture_for(t).linears[0] == "self_attn.q_proj"
    with pytest.raises(UnsupportedArchitecture, match="supported: llama, mistral, qwen2"):
        architecture_for("gpt2")


def test_tiny_llama_loads_with_all_linears(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    linears = quantizable_linears(loaded.model, loaded.architecture)
    assert len(linears) == 2 * 7
    assert list(linears)[0] == "model.layers.0.self_attn.q_proj"
    assert loaded.source.kind == "hf_dir"


def test_default_model_is_found_without_importing_its_package():
    src = resolve_source(None)
    assert src.kind == "gguf" and src.model_type == "llama" and src.gguf_file.endswith(".gguf")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found"):
        resolve_source(tmp_path / "nope")


def test_unsupported_architecture_is_rejected_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        resolve_source(tmp_path)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\xff" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        resolve_source(bad)


def test_corrupt_safetensors(tiny_llama_dir, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(broken)


def test_nan_weights_are_rejected(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    path = tmp_path / "nan"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    with pytest.raises(ModelLoadError, match="NaN or Inf: model.layers.1.mlp.up_proj.weight"):
        load_model(path)
