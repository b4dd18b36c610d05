"""The guard of every v2 run (pipeline/guard.py): RTN's true bits match its stored layout, the uniform setting is the
largest at or below the budget, RTN weights are in place exactly while each block runs (in memory and streamed), and
the verdict and the report follow the figures."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sage_export.models import load_model, quantizable_linears
from sage_export.pipeline.guard import (held_out_rows, mean_nll, rtn_true_bits, rtn_while_running, score_after,
                                        score_before, uniform_setting, warning_line)
from sage_export.quant.rtn import quantize_rtn
from sage_export.report.build import guard_section


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def held(loaded):
    torch.manual_seed(0)
    return torch.randint(0, loaded.model.config.vocab_size, (2, 24))


class ConfidentlyWrong(torch.nn.Module):
    """A "model" that always predicts the token after the current one, with near certainty: far worse than any
    quantization of a real model on random held-out tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits.scatter_(-1, ((ids + 1) % self.vocab)[..., None], 30.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("shape,bits,gs", [((64, 64), 3, 64), ((48, 100), 2, 32), ((96, 256), 4, 128)])
def test_rtn_true_bits_count_every_stored_byte(shape, bits, gs):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stored = quantize_rtn(w, bits, gs).stored_tensors()
    n_bytes = sum(a.nbytes for a in stored.values())  # codes and zero-points are stored packed
    assert rtn_true_bits([shape], bits, gs) == pytest.approx(8 * n_bytes / w.size, rel=1e-12)
    assert rtn_true_bits([shape], bits, gs) > bits  # scales and zero-points are counted


def test_uniform_setting_is_the_largest_at_or_below_the_budget():
    shapes = [(896, 896), (4864, 896), (896, 4864)]
    for budget in (2.3, 3.2, 4.2):
        best = uniform_setting(shapes, budget)
        assert best["true_bits"] <= budget
        for b in (2, 3, 4):
            for gs in (32, 64, 128, 256):
                t = rtn_true_bits(shapes, b, gs)
                assert t > budget or t <= best["true_bits"]
    assert uniform_setting(shapes, 1.5) is None
    assert held_out_rows(32) == 4 and held_out_rows(8) == 2


def test_rtn_weights_are_in_place_only_while_a_block_runs(loaded, held):
    before = {n: l.weight.detach().clone() for n, l in quantizable_linears(loaded.model, loaded.architecture).items()}
    seen = {}
    name = "model.layers.1.self_attn.q_proj"
    def grab(module, inputs, output):  # returns None: a hook's return value would replace the output
        seen.setdefault("w", module.weight.detach().clone())

    handle = loaded.model.get_submodule(name).register_forward_hook(grab)
    try:
        with rtn_while_running(loaded, 3, 32):
            nll_rtn = mean_nll(loaded.model, held)
    finally:
        handle.remove()
    want = quantize_rtn(before[name].float().numpy(), 3, 32).dequantize()
    np.testing.assert_allclose(seen["w"].float().numpy(), want, rtol=0, atol=1e-6)
    for n, l in quantizable_linears(loaded.model, loaded.architecture).items():
        assert torch.equal(l.weight, before[n])  # restored
    assert nll_rtn != mean_nll(loaded.model, held)


def test_rtn_is_decoded_once_per_batch_and_batching_keeps_the_loss(loaded, held):
    block = loaded.model.get_submodule(loaded.architecture.blocks)[0]
    calls = []
    handle = block.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        with rtn_while_running(loaded, 3, 32):
            batched = mean_nll(loaded.model, held)
            assert len(calls) == 1  # both rows in one forward call: RTN decoded once, not once per row
            row_by_row = mean_nll(loaded.model, held, batch_tokens=held.shape[1])
            assert len(calls) == 1 + held.shape[0]
    finally:
        handle.remove()
    assert batched == pytest.approx(row_by_row, rel=1e-5)


def test_guard_scores_and_verdict(loaded, held):
    guard = score_before(loaded, held, 4.5)
    assert guard["rtn"] is not None and guard["rtn"]["true_bits"] <= 4.48
    assert guard["fp_ppl"] > 1 and guard["rtn"]["ppl"] > 1
    # A "result" equal to the FP model beats RTN; a much worse one does not and gets one warning line.
    good = score_after(loaded.model, held, guard, 4.4)
    assert good["sage_ppl"] == pytest.approx(good["fp_ppl"]) and good["beats_rtn"] is (good["fp_ppl"] < good["rtn"]["ppl"])
    bad = score_after(ConfidentlyWrong(loaded.model.config.vocab_size), held, guard, 4.4)
    assert bad["beats_rtn"] is False
    line = warning_line(bad)
    assert line.startswith("warning:") and "\n" not in line and f"w{guard['rtn']['bits']}g" in line
    md = "\n".join(guard_section(bad))
    assert "does worse than RTN" in md and f"{bad['sage_ppl']:.3f}" in md and f"{bad['fp_ppl']:.3f}" in md
    assert warning_line(dict(bad, beats_rtn=True)) is None


def test_guard_works_on_a_streamed_model(tiny_llama_dir, loaded, held):
    streamed = load_model(tiny_llama_dir, stream=True)
    assert streamed.streamed
    a, b = score_before(streamed, held, 4.5), score_before(loaded, held, 4.5)
    assert a["fp_ppl"] == pytest.approx(b["fp_ppl"], rel=1e-5)
    assert a["rtn"]["ppl"] == pytest.approx(b["rtn"]["ppl"], rel=1e-5)
