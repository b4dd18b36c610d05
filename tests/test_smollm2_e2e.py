"""The whole `sage-export model` command on the real SmolLM2-135M: the default v2 preset and budget, on less
self-sampled calibration text than the default (CI time), with a short eval."""

import json
import math

import pytest

from conftest import WIKI_TEST
from sage_export.cli import main
from sage_export.eval.perplexity import perplexity, read_eval_text, tokenize_text
from sage_export.format.checkpoint import load_checkpoint
from sage_export.models import load_model
from sage_export.pipeline.methods import Method
from sage_export.pipeline.quantize import quantize_model

pytestmark = pytest.mark.slow
CTX, WINDOWS = 512, 2


@pytest.fixture(scope="module")
def smollm2_run(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "run"
    assert main(["model", str(smollm2_dir), "--out", str(out), "--eval-text", str(WIKI_TEST),
                 "--ctx", str(CTX), "--eval-windows", str(WINDOWS), "--calib-samples", "8", "--calib-seqlen", "64"]) == 0
    return out


def test_every_artifact_is_there_and_consistent(smollm2_run):
    ckpt = load_checkpoint(smollm2_run / "checkpoint")  # verifies every checksum
    assert len(ckpt.layers) == 210
    rep = json.loads((smollm2_run / "report.json").read_text())
    b = rep["bits"]
    assert b["n_weights"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert b["packed_bytes"] == sum(a.nbytes for r in ckpt.layers.values() for a in r.tensors.values())
    assert b["true_bits"] > b["paper_weight_bits"] + b["paper_scale_bits"]
    assert all(1 <= l["n_groups"] <= 16 for l in rep["layers"])
    assert abs(b["true_bits"] - 3.2) <= 0.02 and rep["budget"]["budget_bits"] == 3.2
    assert rep["onnx"]["checks"]["failures"] == []
    assert (smollm2_run / "onnx" / "model.onnx").is_file()
    for png in ("bits_per_layer.png", "groups_rho_per_layer.png", "error_per_layer.png"):
        assert (smollm2_run / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_default_beats_rtn_with_more_bits(smollm2_run, smollm2_dir):
    """The default (3.2 true bits) against RTN 3-bit in groups of 64 (3.30 true bits), same windows."""
    rep = json.loads((smollm2_run / "report.json").read_text())
    sage_ppl = rep["perplexity"]["ppl"]
    assert rep["perplexity"]["n_windows"] == WINDOWS and math.isfinite(sage_ppl)
    loaded = load_model(smollm2_dir)
    quantize_model(loaded, Method("rtn", {"bits": 3, "group_size": 64}), progress=False)
    ids = tokenize_text(loaded.tokenizer, read_eval_text(WIKI_TEST))
    rtn_ppl = perplexity(loaded.model, ids, CTX, WINDOWS, progress=False).ppl
    assert sage_ppl < rtn_ppl
