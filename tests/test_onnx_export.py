"""Export of tiny random LLaMA, Qwen2 and Mistral decoders with SageBinaryGemm nodes, checked by the ONNX checker
and by ONNX Runtime against PyTorch running the same decoded weights (float parts rounded to their stored
float16, as the pipeline does)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from sage_export.format.accounting import summarize
from sage_export.format.sage_layout import PackedLinear, pack_sage
from sage_export.materialize import apply_dequantized
from sage_export.models import load_model, quantizable_linears
from sage_export.onnx import export as export_module
from sage_export.onnx.export import export_quantized_onnx
from sage_export.onnx.function import DOMAIN, OP_TYPE
from sage_export.onnx.ort_check import (check_failures, compare_logits, decoder_feeds, greedy_generate_ort,
                                        greedy_generate_torch, make_session, perplexity_ort, run_checks)
from sage_export.onnx.export import validate_packed_against_model
from sage_export.pipeline.artifact import round_float_params
from sage_export.quant.config import SageConfig
from sage_export.quant.sage import quantize_sage

from conftest import WIKI_TEST

PACKED_DTYPES = {"sign_bits": TensorProto.INT8, "group_codes": TensorProto.INT8, "group_scales": TensorProto.FLOAT16,
                 "salient_rowptr": TensorProto.INT32, "salient_cols": TensorProto.INT8,
                 "salient_q": TensorProto.INT8, "salient_scale": TensorProto.FLOAT16}


def two_band_packed(weight: np.ndarray, salient_fraction: float = 0.02) -> PackedLinear:
    """A simple packing independent of the SAGE quantizer: the top |w| fraction is salient (4-bit, per-row
    least-max scale), the rest is split at the median |w| into two groups whose scale is their mean |w|."""
    magnitude = np.abs(weight)
    salient = magnitude > np.quantile(magnitude, 1 - salient_fraction)
    groups = (magnitude > np.median(magnitude[~salient])).astype(np.int64)
    scales = [magnitude[~salient & (groups == g)].mean() for g in (0, 1)]
    row_scale = np.maximum(np.where(salient, magnitude, 0).max(axis=1), 1e-3) / 7
    q = np.clip(np.round(weight / row_scale[:, None]), -7, 7)
    return pack_sage(weight >= 0, groups, scales, salient, q, row_scale, salient_bits=4)


def pack_model(model, arch, packer=two_band_packed) -> dict[str, PackedLinear]:
    return {name: packer(layer.weight.detach().numpy()) for name, layer in quantizable_linears(model, arch).items()}


def sage_packed(weight: np.ndarray) -> PackedLinear:
    """The project's SAGE quantizer with the search and the graph step fixed, so it is fast and deterministic."""
    return quantize_sage(weight, SageConfig(fixed_rho=0.02, fixed_groups=2), seed=0).packed()


def export_tiny(model_dir, out_dir, float_dtype="float16"):
    """Load, pack (SAGE, fast settings), put the decoded weights and float16-rounded float parts into the torch
    model, export: both sides then compute the same function."""
    loaded = load_model(model_dir)
    packed = pack_model(loaded.model, loaded.architecture, sage_packed)
    apply_dequantized(loaded.model, packed)
    round_float_params(loaded.model, list(packed), float_dtype)
    return loaded, packed, export_quantized_onnx(loaded.model, loaded.architecture, packed, out_dir, float_dtype)


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    return export_tiny(tiny_llama_dir, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def session(exported):
    return make_session(exported[2].onnx_path, constant_folding=True)


def test_files_and_full_checker(exported):
    _, packed, result = exported
    assert result.onnx_path.name == "model.onnx" and result.data_path.name == "model.onnx.data"
    assert result.onnx_path.stat().st_size == result.onnx_bytes
    assert result.data_path.stat().st_size == result.data_bytes > 0
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    assert result.n_sage_nodes == len(packed) == 14
    json.dumps(result.to_dict())


def test_graph_holds_packed_initializers_not_dense_weights(exported):
    loaded, packed, result = exported
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    for name, layer in packed.items():
        assert not any(n.endswith(f"{name}.weight") for n in initializers)
        for tensor, dtype in PACKED_DTYPES.items():
            init = initializers[f"{name}.{tensor}"]
            assert init.data_type == dtype
            assert tuple(init.dims) == layer.tensors()[tensor].shape
    floats = [t for n, t in initializers.items() if n.endswith(("embed_tokens.weight", "norm.weight", "lm_head.weight"))]
    assert len(floats) == 1 + 2 * 2 + 1 + 1 and all(t.data_type == TensorProto.FLOAT16 for t in floats)
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert {n.domain for n in nodes} == {DOMAIN}
    assert {f"{n.name.split('/')[0]}" for n in nodes} == set(packed)
    assert [f.name for f in model.functions] == [OP_TYPE]
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 3


def test_io_names_and_dynamic_axes(exported):
    loaded, _, result = exported
    graph = onnx.load(str(result.onnx_path), load_external_data=False).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.output]}
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert shapes["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert shapes["logits"] == ["batch", "sequence", loaded.model.config.vocab_size]
    assert shapes["present.0.key"][:2] == ["batch", 2] and isinstance(shapes["present.0.key"][2], str)
    assert len(graph.output) == 1 + 2 * 2


def test_true_bits_come_from_the_graph_and_match_the_packed_layers(exported):
    _, packed, result = exported
    expected = summarize({name: (p.out_features, p.in_features, p.tensors()) for name, p in packed.items()})
    assert result.sage_bytes == expected["stored_bytes"]
    assert result.sage_true_bits == pytest.approx(expected["true_bits"], rel=1e-12)


@pytest.mark.parametrize("constant_folding", [True, False])
def test_logits_match_torch(exported, constant_folding):
    loaded, _, result = exported
    session = make_session(result.onnx_path, constant_folding)
    ids = np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, (2, 11))
    figures = compare_logits(session, loaded.model, ids)
    assert figures["rel_l2"] < 1e-3
    assert figures["argmax_agreement"] == 1.0


@torch.no_grad()
def test_cache_steps_match_full_sequence(exported, session):
    """Prefill 6 tokens, then 3 single-token steps feeding present -> past: logits equal one full pass."""
    loaded, _, _ = exported
    ids = np.random.default_rng(1).integers(0, loaded.model.config.vocab_size, (2, 9))
    full = loaded.model(torch.from_numpy(ids)).logits.numpy()
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, decoder_feeds(session, ids[:, :6]))))
    steps = [out["logits"]]
    for t in range(6, 9):
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        out = dict(zip(names, session.run(names, decoder_feeds(session, ids[:, t:t + 1], past))))
        steps.append(out["logits"])
    assert out["present.1.key"].shape == (2, 2, 9, 16)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-4 * np.abs(full).max())


def test_greedy_generation_identical(exported, session):
    loaded, _, _ = exported
    prompt = loaded.tokenizer("The quick brown fox", add_special_tokens=False).input_ids
    ort_tokens = greedy_generate_ort(session, prompt, 8)
    assert len(ort_tokens) == 8
    assert ort_tokens == greedy_generate_torch(loaded.model, prompt, 8)


def test_perplexity_matches_torch(exported, session):
    from sage_export.eval.perplexity import perplexity, read_eval_text, tokenize_text

    loaded, _, _ = exported
    ids = tokenize_text(loaded.tokenizer, read_eval_text(WIKI_TEST)[:20000])
    ort_ppl = perplexity_ort(session, ids, ctx=64, n_windows=2)
    torch_ppl = perplexity(loaded.model, ids, ctx=64, n_windows=2, progress=False)
    assert (ort_ppl.n_windows, ort_ppl.n_tokens) == (2, 126)
    assert ort_ppl.ppl == pytest.approx(torch_ppl.ppl, rel=1e-4)


def test_run_checks_reports_every_figure(exported):
    loaded, _, result = exported
    checks = run_checks(result, loaded.model, loaded.tokenizer, eval_text=WIKI_TEST, ctx=32, n_windows=2, n_new=8,
                        memory=True)
    assert checks["failures"] == []
    assert checks["greedy"]["identical"] and checks["logits"]["rel_l2"] < 1e-3
    assert checks["perplexity"]["rel_diff"] < 1e-4
    assert checks["op"]["max_rel_err"]["float32"] < 1e-5
    # bounded memory by default: the native op when it is built, else the function body unfolded
    assert checks["session"].endswith("constant folding off") or checks["sage_runtime"] == "custom_op"
    for way in ("constant_folding", "no_constant_folding"):
        assert checks["memory"][way]["session_load_delta_mb"] > 0
    json.dumps(checks)


def test_run_checks_lets_the_caller_drop_the_torch_model_before_the_session(exported):
    """With release_torch, PyTorch's side is computed first and nothing in run_checks keeps the model alive when
    the callback runs, so the session's packed weights are the only copy in memory."""
    import copy
    import gc
    import weakref

    loaded, _, result = exported
    held = {"model": copy.deepcopy(loaded.model)}
    ref = weakref.ref(held["model"])
    freed = []

    def release():
        held.clear()
        gc.collect()
        freed.append(ref() is None)

    checks = run_checks(result, held["model"], loaded.tokenizer, eval_text=WIKI_TEST, ctx=32, n_windows=2, n_new=8,
                        release_torch=release)
    assert freed == [True]
    assert checks["failures"] == [] and checks["perplexity"]["rel_diff"] < 1e-4


def test_check_failures_name_each_missed_threshold():
    good = {"op": {"max_rel_err": {"float32": 1e-7, "float16": 0.0}},
            "logits": {"rel_l2": 1e-6, "argmax_agreement": 1.0}, "greedy": {"identical": True, "first_mismatch": None},
            "perplexity": {"rel_diff": 0.0}}
    assert check_failures(good) == []
    bad = {**good, "logits": {"rel_l2": float("nan"), "argmax_agreement": 0.5},
           "greedy": {"identical": False, "first_mismatch": 3}, "perplexity": {"rel_diff": 0.2},
           "op": {"max_rel_err": {"float32": 0.1, "float16": 0.0}}}
    failures = check_failures(bad)
    assert len(failures) == 5 and "float32" in failures[0] and "greedy tokens differ from token 3" in failures[3]


# ------------------------------------------------------------------------------------------ mismatches


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if export work starts: mismatches must be caught before."""
    def refuse(*args, **kwargs):
        raise AssertionError("export started before validation")
    monkeypatch.setattr(export_module, "export_decoder_onnx", refuse)


def test_missing_layer_is_refused_before_export(exported, tmp_path, no_export):
    loaded, packed, _ = exported
    partial = dict(packed)
    del partial["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj' missing \(1 missing\)"):
        export_quantized_onnx(loaded.model, loaded.architecture, partial, tmp_path)
    assert not any(tmp_path.iterdir())


def test_wrong_shape_is_refused_before_export(exported, tmp_path, no_export):
    loaded, packed, _ = exported
    swapped = dict(packed)
    swapped["model.layers.0.mlp.up_proj"] = packed["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj: packed shape \[N=68, K=164\] does not "
                                         r"match the model's weight \[N=164, K=68\]"):
        export_quantized_onnx(loaded.model, loaded.architecture, swapped, tmp_path)


def test_unknown_layer_is_refused(exported):
    loaded, packed, _ = exported
    extra = {**packed, "model.layers.7.self_attn.q_proj": packed["model.layers.0.self_attn.q_proj"]}
    with pytest.raises(ValueError, match="'model.layers.7.self_attn.q_proj' is not a quantizable layer"):
        validate_packed_against_model(loaded.model, loaded.architecture, extra)


# ------------------------------------------------------------------------------------------ other architectures


def make_tiny(kind: str, path, **overrides):
    """A 2-block random Qwen2 (q/k/v biases, tied embeddings) or Mistral (sliding window of 4 tokens), biases
    made large so that a dropped bias would show."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    cfg = dict(hidden_size=68, intermediate_size=164, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **cfg))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=4, tie_word_embeddings=False, **cfg))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_architectures_with_left_padding_match_torch(kind, tmp_path):
    loaded, _, result = export_tiny(make_tiny(kind, tmp_path / kind), tmp_path)
    session = make_session(result.onnx_path, constant_folding=False)
    ids = np.random.default_rng(0).integers(3, loaded.model.config.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # row 1 is left-padded: its real tokens must not see the padding
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    feeds = dict(decoder_feeds(session, ids), attention_mask=mask, position_ids=positions)
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = loaded.model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           position_ids=torch.from_numpy(positions)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() < 1e-5 * np.abs(ref).max()
    names = {i.name for i in onnx.load(str(result.onnx_path), load_external_data=False).graph.initializer}
    biases = {n for n in names if n.endswith(".bias")}
    assert (len(biases) == 2 * 3) if kind == "qwen2" else not biases


def test_float32_float_parts_on_request(tiny_llama_dir, tmp_path):
    loaded, packed, result = export_tiny(tiny_llama_dir, tmp_path, float_dtype="float32")
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    embed = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
    assert embed.data_type == TensorProto.FLOAT and result.float_dtype == "float32"
    ids = np.random.default_rng(2).integers(0, loaded.model.config.vocab_size, (1, 7))
    assert compare_logits(make_session(result.onnx_path), loaded.model, ids)["rel_l2"] < 1e-5


def test_initializers_are_packed_bytes_plus_float16_float_parts(exported):
    """Nothing dense, nothing float32: the stored bytes are the packed layers, every float parameter once in
    float16, and a few small constants (rotary frequencies, shapes)."""
    from sage_export.onnx.export import _tensor_bytes

    loaded, packed, result = exported
    state = loaded.model.state_dict()
    floats = {n: t for n, t in state.items() if not n.endswith(tuple(f"{name}.weight" for name in packed))}
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    by_kind = {"packed": 0, "float": 0, "constant": 0}
    for init in model.graph.initializer:
        kind = "float" if init.name in floats else "packed" if init.name.rsplit(".", 1)[0] in packed else "constant"
        by_kind[kind] += _tensor_bytes(init)
        assert kind != "constant" or _tensor_bytes(init) < 1024, init.name
    assert by_kind["packed"] == result.sage_bytes
    assert by_kind["float"] == 2 * sum(t.numel() for t in floats.values())
    assert result.data_bytes <= sum(by_kind.values()) + 64 * len(model.graph.initializer)
