"""The whole `sage-export model` command on the real SmolLM2-135M (default SAGE config), with a short eval."""

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
                 "--ctx", str(CTX), "--eval-windows", str(WINDOWS)]) == 0
    return out


def test_every_artifact_is_there_and_consistent(smollm2_run):
    ckpt = load_checkpoint(smollm2_run / "checkpoint")  # verifies every checksum
    assert len(ckpt.layers) == 210
    rep = json.loads((smollm2_run / "report.json").read_text())
    b = rep["bits"]
    assert b["n_weights"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert b["packed_bytes"] == sum(a.nbytes for r in ckpt.layers.values() for a in r.tensors.values())
    assert b["true_bits"] > b["paper_weight_bits"] + b["paper_scale_bits"]
    assert all(1 <= l["n_groups"] <= 8 for l in rep["layers"])
    assert (smollm2_run / "onnx" / "model.onnx").is_file()
    for png in ("bits_per_layer.png", "groups_rho_per_layer.png", "error_per_layer.png"):
        assert (smollm2_run / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_sage_perplexity_is_finite_and_below_xnor(smollm2_run, smollm2_dir):
    rep = json.loads((smollm2_run / "report.json").read_text())
    sage_ppl = rep["perplexity"]["ppl"]
    assert rep["perplexity"]["n_windows"] == WINDOWS and math.isfinite(sage_ppl)
    loaded = load_model(smollm2_dir)
    quantize_model(loaded, Method("xnor"), progress=False)
    ids = tokenize_text(loaded.tokenizer, read_eval_text(WIKI_TEST))
    xnor_ppl = perplexity(loaded.model, ids, CTX, WINDOWS, progress=False).ppl
    assert sage_ppl < xnor_ppl
