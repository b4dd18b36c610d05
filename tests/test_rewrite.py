"""`sage-export rewrite`: an ONNX written by torch.onnx.export (no KV cache) from a tiny random LLaMA gets its
quantized Linears replaced by SageBinaryGemm nodes with onnx-graphsurgeon; its ONNX Runtime logits equal those of
the project's own export of the same checkpoint. Also the Gemm/Transpose/bias forms other exporters write, reading
weights from external data in place, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sage_export.cli import main
from sage_export.format.checkpoint import load_checkpoint
from sage_export.format.sage_layout import TENSOR_NAMES, PackedLinear, dequantize
from sage_export.models import architecture_for
from sage_export.onnx import rewrite
from sage_export.onnx.export import export_quantized_onnx
from sage_export.onnx.function import DOMAIN, OP_TYPE
from sage_export.onnx.ort_check import THRESHOLDS, error_figures, make_session, random_packed
from sage_export.pipeline.artifact import load_quantized

from conftest import make_tiny_llama

# The paper preset with its searches fixed: data-free and about a second of quantizing for the tiny model.
FAST_QUANTIZE = ["--preset", "paper", "--fixed-groups", "2", "--fixed-rho", "0.02", "--jobs", "1"]


def torch_export(model_dir: Path, path: Path) -> Path:
    """What a user without this project would write: torch.onnx.export's TorchScript exporter (dynamo=False) of
    the Hugging Face model, logits only, no KV cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.arange(1, 9)[None]
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(Logits(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes={"input_ids": axes, "attention_mask": axes},
                          opset_version=18, dynamo=False)
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory) -> Path:
    # float32 float parts, so that the torch export's float parts and the checkpoint's are the same numbers.
    out = tmp_path_factory.mktemp("rewrite_ckpt") / "q"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--float-dtype", "float32", *FAST_QUANTIZE]) == 0
    return out / "checkpoint"


@pytest.fixture(scope="module")
def torch_onnx(tiny_llama_dir, tmp_path_factory) -> Path:
    return torch_export(tiny_llama_dir, tmp_path_factory.mktemp("torch_onnx") / "model.onnx")


@pytest.fixture(scope="module")
def rewritten(torch_onnx, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("rewritten") / "out"
    assert main(["rewrite", str(torch_onnx), str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def project_export(checkpoint, tmp_path_factory) -> Path:
    """The project's own export of the same checkpoint (the `export` command's path, float parts in float32)."""
    model, _, ckpt = load_quantized(checkpoint)
    out = tmp_path_factory.mktemp("project_export")
    return export_quantized_onnx(model, architecture_for(model.config.model_type), ckpt.packed_linears(), out,
                                 float_dtype="float32").onnx_path


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = make_session(path, constant_folding=False)
    return rewrite.prefill_logits(session, "logits", ids)


def test_rewritten_logits_equal_the_project_export(rewritten, project_export):
    ids = np.random.default_rng(0).integers(3, 290, (2, 12))
    got, ref = logits(rewritten / "model.onnx", ids), logits(project_export, ids)
    figures = error_figures(got, ref)
    assert figures["rel_l2"] <= THRESHOLDS["logits_rel_l2"], figures
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= THRESHOLDS["argmax_agreement"]
    # Both compute the same float32 function from the same numbers: only the summation order differs.
    assert figures["rel_l2"] < 1e-5, figures


def test_the_ort_check_against_the_checkpoint_passed(rewritten):
    report = json.loads((rewritten / "check_report.json").read_text())
    checks = report["checks"]
    assert checks["failures"] == []
    assert checks["greedy"]["identical"] and checks["logits"]["argmax_agreement"] == 1.0
    matches = report["rewrite"]["matches"]
    assert len(matches) == 14 and {m["matched_by"] for m in matches} == {"content"}
    # Exported from the float model, matched to the quantized one: the cosine is the quantizer's fidelity.
    assert all(rewrite.MATCH_COS < m["cosine"] < 1 for m in matches)
    q0 = next(m for m in matches if m["layer"] == "model.layers.0.self_attn.q_proj")
    assert q0["nodes"] == ["/model/model/layers.0/self_attn/q_proj/MatMul"] and q0["op"] == "MatMul"


def test_graph_holds_sage_nodes_function_and_no_dense_quantized_weight(rewritten, torch_onnx):
    model = onnx.load(str(rewritten / "model.onnx"), load_external_data=False)
    sage = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    assert len(sage) == 14
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
    attrs = {a.name: helper.get_attribute_value(a) for a in sage[0].attribute}
    assert attrs["plugin_namespace"] == b"sage" and attrs["plugin_version"] == b"3"
    inits = {t.name: t for t in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert [n.name for n in weight_matmuls] == ["/model/lm_head/MatMul"]  # lm_head stays float
    source = {t.name: t for t in onnx.load(str(torch_onnx), load_external_data=False).graph.initializer}
    matched = [m["weight"] for m in json.loads((rewritten / "check_report.json").read_text())["rewrite"]["matches"]]
    assert not set(matched) & set(inits)  # the float32 weights of the quantized layers are gone
    # Inputs 1-8 are the packed tensors.
    packed_bytes = sum(rewrite._nbytes(inits[name]) for node in sage for name in node.input[1:9])
    assert packed_bytes < sum(rewrite._nbytes(source[name]) for name in matched) / 4
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    onnx.checker.check_model(str(rewritten / "model.onnx"), full_check=True)


def test_external_data_is_read_in_place_and_copied(torch_onnx, checkpoint, rewritten, tmp_path):
    """A source whose weights live in an external file (as exporters write models over 2 GB): the result owns
    its data, so deleting the source leaves it runnable, and it computes what the inline source gave."""
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    model = onnx.load(str(torch_onnx))
    onnx.save_model(model, source_dir / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    packed = load_checkpoint(checkpoint).packed_linears()
    plan = rewrite.plan_rewrite(source_dir / "model.onnx", packed)
    out = tmp_path / "out"
    out.mkdir()
    rewrite.write_rewrite(plan, packed, out)
    shutil.rmtree(source_dir)
    ids = np.arange(5, 17)[None]
    np.testing.assert_array_equal(logits(out / "model.onnx", ids), logits(rewritten / "model.onnx", ids))


def densified(sage_onnx: Path, path: Path) -> Path:
    """A dense graph with a KV cache and Optimum's input/output names, standing in for an Optimum export (Optimum's
    exporter does not install beside transformers 5 here): the project's own export with every SageBinaryGemm node
    turned back into MatMul on the decoded weight, and the function removed."""
    model = onnx.load(str(sage_onnx))
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == OP_TYPE]:
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        tensors = {name: numpy_helper.to_array(inits[arg]) for name, arg in zip(TENSOR_NAMES, node.input[1:])}
        weight = dequantize(PackedLinear.from_tensors(tensors, **attrs))
        dense = numpy_helper.from_array(np.ascontiguousarray(weight.T), f"{node.name}/dense")
        model.graph.initializer.append(dense)
        node.CopyFrom(helper.make_node("MatMul", [node.input[0], dense.name], list(node.output), name=node.name))
    del model.functions[:]
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
    return path


def test_a_graph_with_kv_cache_is_rewritten_and_checked_through_its_cache(project_export, checkpoint, tmp_path):
    source = densified(project_export, tmp_path / "dense.onnx")
    out = tmp_path / "out"
    assert main(["rewrite", str(source), str(checkpoint), "--out", str(out)]) == 0
    report = json.loads((out / "check_report.json").read_text())
    assert report["checks"]["failures"] == [] and report["checks"]["greedy"]["identical"]
    assert all(m["cosine"] > 0.999999 for m in report["rewrite"]["matches"])  # the decoded weights themselves
    session = make_session(out / "model.onnx", constant_folding=False)
    assert any(o.name == "present.0.key" for o in session.get_outputs())
    ids = np.random.default_rng(2).integers(3, 290, (1, 10))
    figures = error_figures(logits(out / "model.onnx", ids), logits(project_export, ids))
    assert figures["rel_l2"] < 1e-5, figures


# ----------------------------------------------------------------------------------------------- graph forms


def _gemm_forms_model(layers: dict, bias: np.ndarray) -> onnx.ModelProto:
    """Three ways exporters write a Linear: MatMul through a Transpose of W [N, K]; Gemm(transB=1) with a constant
    C and beta; Gemm(transB=0) on Wᵀ with a C computed in the graph."""
    a, b, c = (dequantize(layers[name]) for name in ("a", "b", "c"))
    k = a.shape[1]
    inits = [numpy_helper.from_array(a, "wa"), numpy_helper.from_array(b, "wb"),
             numpy_helper.from_array(np.ascontiguousarray(c.T), "wc_t"), numpy_helper.from_array(bias, "bias_b")]
    nodes = [
        helper.make_node("Transpose", ["wa"], ["wa_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x3", "wa_t"], ["ya"], name="matmul_a"),
        helper.make_node("Gemm", ["x2", "wb", "bias_b"], ["yb"], name="gemm_b", transB=1, beta=0.5),
        helper.make_node("Relu", ["c_in"], ["c_relu"]),
        helper.make_node("Gemm", ["x2", "wc_t", "c_relu"], ["yc"], name="gemm_c"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "forms", [helper.make_tensor_value_info("x3", f32, [2, 3, k]),
                                               helper.make_tensor_value_info("x2", f32, [4, k]),
                                               helper.make_tensor_value_info("c_in", f32, [c.shape[0]])],
                              [helper.make_tensor_value_info("ya", f32, [2, 3, a.shape[0]]),
                               helper.make_tensor_value_info("yb", f32, [4, b.shape[0]]),
                               helper.make_tensor_value_info("yc", f32, [4, c.shape[0]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_gemm_transpose_and_bias_forms_compute_what_they_did(tmp_path):
    rng = np.random.default_rng(1)
    layers = {name: random_packed(rng, n, 40, g) for name, n, g in (("a", 24, 2), ("b", 16, 4), ("c", 8, 3))}
    bias = rng.standard_normal(16).astype(np.float32)
    source = tmp_path / "forms.onnx"
    onnx.save_model(_gemm_forms_model(layers, bias), source)
    plan = rewrite.plan_rewrite(source, layers)
    assert {m.layer: (m.site.nodes[0].name, m.how) for m in plan.matches} == {
        "a": ("matmul_a", "content"), "b": ("gemm_b", "content"), "c": ("gemm_c", "content")}
    assert all(m.cosine > 0.999999 for m in plan.matches)  # the ONNX holds the decoded weights themselves
    out = tmp_path / "out"
    out.mkdir()
    rewrite.write_rewrite(plan, layers, out)
    result = onnx.load(str(out / "model.onnx"))
    assert sorted(n.op_type for n in result.graph.node) == ["Add", "Relu", OP_TYPE, OP_TYPE, OP_TYPE]
    feeds = {"x3": rng.standard_normal((2, 3, 40)).astype(np.float32),
             "x2": rng.standard_normal((4, 40)).astype(np.float32),
             "c_in": rng.standard_normal(8).astype(np.float32)}
    before = make_session(source).run(["ya", "yb", "yc"], feeds)
    after = make_session(out / "model.onnx").run(["ya", "yb", "yc"], feeds)
    for old, new in zip(before, after):
        assert old.shape == new.shape
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- refusals


def one_line_error(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("sage-export: error:"), lines
    return lines[0]


def test_a_model_that_is_not_the_checkpoints_fails_in_one_line(checkpoint, tmp_path, capsys):
    other = torch_export(make_tiny_llama(tmp_path / "other", seed=1), tmp_path / "other.onnx")
    capsys.readouterr()  # transformers' progress bars while saving the other model
    assert main(["rewrite", str(other), str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert "no weight in the ONNX matches it" in line and "model.layers." in line
    assert not (tmp_path / "out").exists()


def _with_duplicate_weight(torch_onnx: Path, path: Path) -> str:
    """A copy of layer 0's q_proj weight feeding a second MatMul: two weights then match that layer."""
    model = onnx.load(str(torch_onnx))
    node = next(n for n in model.graph.node if n.name == "/model/model/layers.0/self_attn/q_proj/MatMul")
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    copy = onnx.TensorProto()
    copy.CopyFrom(weight)
    copy.name = "duplicate_q_proj"
    model.graph.initializer.append(copy)
    model.graph.node.append(helper.make_node("MatMul", [node.input[0], copy.name], ["unused"], name="duplicate"))
    onnx.save_model(model, path)
    return node.name


def test_an_ambiguous_layer_fails_and_a_name_map_decides(torch_onnx, checkpoint, tmp_path, capsys):
    source = tmp_path / "dup.onnx"
    q_node = _with_duplicate_weight(torch_onnx, source)
    assert main(["rewrite", str(source), str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert "model.layers.0.self_attn.q_proj: 2 weights in the ONNX match it" in line and "--name-map" in line
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"model.layers.0.self_attn.q_proj": q_node}))
    assert main(["rewrite", str(source), str(checkpoint), "--out", str(tmp_path / "out"), "--name-map",
                 str(names)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj -> MatMul " + q_node in printed and "by name map" in printed
    result = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert "duplicate" not in [n.name for n in result.graph.node]  # the unused copy is cleaned up


def _opset17(torch_onnx: Path, path: Path) -> Path:
    model = onnx.load(str(torch_onnx))
    model.opset_import[0].version = 17
    onnx.save_model(model, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("opset", "uses opset 17; SageBinaryGemm's function needs opset >= 18"),
    ("not_checkpoint", "not a packed checkpoint"),
    ("existing_out", "already exists; pass --force"),
    ("bad_name_map", "is not a quantized layer of the checkpoint"),
    ("missing_onnx", "ONNX model not found"),
])
def test_bad_input_fails_in_one_line_before_any_work(case, message, torch_onnx, checkpoint, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setattr(rewrite, "write_rewrite", lambda *a, **k: pytest.fail("the rewrite started"))
    onnx_path, ckpt, extra = torch_onnx, checkpoint, []
    out = tmp_path / "out"
    if case == "opset":
        onnx_path = _opset17(torch_onnx, tmp_path / "old.onnx")
    elif case == "not_checkpoint":
        ckpt = tmp_path
    elif case == "existing_out":
        out.mkdir()
    elif case == "bad_name_map":
        (tmp_path / "names.json").write_text(json.dumps({"model.layers.9.mlp.up_proj": "x"}))
        extra = ["--name-map", str(tmp_path / "names.json")]
    elif case == "missing_onnx":
        onnx_path = tmp_path / "absent.onnx"
    assert main(["rewrite", str(onnx_path), str(ckpt), "--out", str(out), *extra]) == 2
    assert message in one_line_error(capsys)
    assert case == "existing_out" or not out.exists()
