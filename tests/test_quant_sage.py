"""SAGE-PTQ on whole matrices: packing agrees with the format decoder, ablations are honoured, results repeat."""

import json

import numpy as np
import pytest

from sage_export.format.accounting import sage_paper_bits, true_bits
from sage_export.format.sage_layout import PackedLinear, dequantize, pack_sage
from sage_export.quant.api import QuantizedWeight
from sage_export.quant.config import SageConfig
from sage_export.quant.sage import quantize_sage


def gaussian(seed: int = 0, n: int = 48, k: int = 70) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.02).astype(np.float32)


def q4_1_like(seed: int = 0, n: int = 48, k: int = 64) -> np.ndarray:
    """Each block of 32 weights rounded to 16 levels between its min and max, like a Q4_1 GGUF."""
    blocks = gaussian(seed, n, k).reshape(-1, 32).astype(np.float64)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    return (np.rint((blocks - lo) / ((hi - lo) / 15)) * (hi - lo) / 15 + lo).reshape(n, k).astype(np.float32)


@pytest.fixture(scope="module")
def result():
    return quantize_sage(gaussian(), SageConfig(), seed=3)


def test_result_implements_the_protocol(result):
    assert isinstance(result, QuantizedWeight)
    assert result.method == "sage" and result.shape == (48, 70)
    json.dumps(result.stats)  # manifest-ready


def test_dequantize_equals_the_format_decoder(result):
    packed = pack_sage(result.signs, result.group_index, result.group_scales, result.salient_mask,
                       result.salient_q, result.salient_scale, result.salient_bits)
    np.testing.assert_array_equal(result.dequantize(), dequantize(packed))
    assert isinstance(result.packed(), PackedLinear)
    for name, tensor in result.stored_tensors().items():
        np.testing.assert_array_equal(tensor, packed.tensors()[name])
    assert result.dequantize().dtype == np.float32


def test_stats_describe_what_was_stored(result):
    s, w = result.stats, gaussian()
    residual = w.astype(np.float64) - result.dequantize()
    assert s["recon_error"] == pytest.approx(np.sum(residual ** 2), rel=1e-9)
    assert s["rel_error"] == pytest.approx(s["recon_error"] / np.sum(w.astype(np.float64) ** 2), rel=1e-9)
    # The search's fast error bookkeeping agrees with the decoded matrix at the chosen ρ.
    assert dict((r, e) for r, e in s["brent_evals"])[s["rho"]] == pytest.approx(s["recon_error"], rel=1e-9)
    assert s["n_evals"] == len(s["brent_evals"]) and s["hit_bound"] in (None, "lower", "upper")
    assert abs(s["realised_rho"] - s["rho"]) <= 1 / w.size
    assert s["nnz"] == result.salient_mask.sum() == result.packed().nnz
    assert s["n_groups"] == result.group_scales.shape[0] and str(s["n_groups"]) in s["silhouette"]
    assert s["time_s"] >= s["graph_time_s"] >= 0


def test_group_scales_are_band_means(result):
    w = gaussian().astype(np.float64)
    unsalient = ~result.salient_mask
    for g, alpha in enumerate(result.group_scales):
        band = np.abs(w[unsalient & (result.group_index == g)])
        assert band.size > 0
        assert alpha == np.float16(band.mean())


def test_paper_and_true_bits(result):
    n, k = result.shape
    # no row multipliers are fitted here, so none are stored or counted
    assert result.paper_bits() == sage_paper_bits(n, k, result.stats["nnz"], 4, result.stats["n_groups"], 0)
    assert true_bits(result.stored_tensors(), n, k) > result.paper_bits()["weight_bits"]


def test_same_seed_same_arrays():
    w = q4_1_like(1)
    a, b = quantize_sage(w, SageConfig(), seed=11), quantize_sage(w, SageConfig(), seed=11)
    for name in ("signs", "group_index", "group_scales", "salient_mask", "salient_q", "salient_scale"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    strip = lambda s: {k: v for k, v in s.items() if not k.endswith("time_s")}
    assert strip(a.stats) == strip(b.stats)


def test_q4_1_like_data_quantizes():
    w = q4_1_like(2)
    r = quantize_sage(w, SageConfig(), seed=0)
    assert 1 <= r.stats["n_groups"] <= 8
    np.testing.assert_array_equal(r.dequantize(), dequantize(r.packed()))


def test_all_equal_matrix_is_exact():
    r = quantize_sage(np.full((8, 16), 0.25, dtype=np.float32), SageConfig(), seed=0)
    assert r.stats["n_groups"] == 1
    # Unsalient weights are exact (α = 0.25); salient ones carry only the float16 rounding of 0.25/7.
    np.testing.assert_array_equal(r.dequantize()[~r.salient_mask], 0.25)
    np.testing.assert_allclose(r.dequantize(), 0.25, rtol=1e-3)


def test_fixed_rho_skips_the_search():
    r = quantize_sage(gaussian(), SageConfig(fixed_rho=0.02), seed=0)
    assert r.stats["rho"] == 0.02 and r.stats["n_evals"] == 1 and r.stats["hit_bound"] is None
    assert r.stats["nnz"] == round(0.02 * 48 * 70)


def test_fixed_groups_skips_the_graph():
    r = quantize_sage(gaussian(), SageConfig(fixed_groups=5), seed=0)
    assert r.stats["n_groups"] == 5 and r.stats["silhouette"] == {}
    assert r.packed().group_codes.shape[0] == 3
    r1 = quantize_sage(gaussian(), SageConfig(fixed_groups=1, fixed_rho=0.0), seed=0)
    assert r1.stats["n_groups"] == 1 and r1.stats["nnz"] == 0


def test_bands_are_nearest_centre_groups():
    r = quantize_sage(gaussian(), SageConfig(fixed_groups=4, lloyd_steps=0), seed=0)
    w = np.abs(gaussian().astype(np.float64))
    unsalient = ~r.salient_mask
    g = r.group_index[unsalient]
    # Bands are intervals of |w| in scale order: every band's values lie below the next band's.
    for lower in range(3):
        if np.any(g == lower) and np.any(g == lower + 1):
            assert w[unsalient][g == lower].max() <= w[unsalient][g == lower + 1].min()


def test_gaussian_threshold_and_regraph_options_run():
    for cfg in (SageConfig(threshold="gaussian"), SageConfig(regraph_in_search=True)):
        r = quantize_sage(gaussian(4, 24, 40), cfg, seed=0)
        np.testing.assert_array_equal(r.dequantize(), dequantize(r.packed()))


def test_per_row_mode_is_not_exportable():
    w = gaussian()
    r = quantize_sage(w, SageConfig(scale_mode="per_row"), seed=0)
    assert r.stats["exportable"] is False and r.stats["n_groups"] == 0
    with pytest.raises(ValueError, match="per_row"):
        r.packed()
    n, k = w.shape
    assert set(r.stored_tensors()) == {"sign_bits", "row_scales", "salient_rowptr", "salient_cols", "salient_q",
                                       "salient_scale"}
    assert r.paper_bits()["scale_bits"] == 16 * (n + n) / (n * k)
    # Off the salient set each row is its own row scale times the sign.
    deq = r.dequantize()
    expected = np.where(w >= 0, 1, -1) * r.row_scales.astype(np.float32)[:, None]
    np.testing.assert_array_equal(deq[~r.salient_mask], expected[~r.salient_mask])
    residual = w.astype(np.float64) - deq
    assert r.stats["recon_error"] == pytest.approx(np.sum(residual ** 2), rel=1e-12)


def test_beats_xnor_on_a_gaussian_matrix(result):
    w = gaussian().astype(np.float64)
    xnor = np.sign(w) * np.abs(w).mean(axis=1, keepdims=True)
    assert result.stats["recon_error"] < 0.5 * np.sum((w - xnor) ** 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected(bad):
    w = gaussian()
    w[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_sage(w, SageConfig(), seed=0)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        quantize_sage(np.zeros(5), SageConfig(), seed=0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_sage(np.zeros((0, 4)), SageConfig(), seed=0)


def test_config_round_trip_and_defaults():
    cfg = SageConfig(fixed_groups=3, rho_bounds=(0.01, 0.2))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert SageConfig.from_dict(data) == cfg
    assert SageConfig().group_candidates == (2, 3, 4, 5, 6, 7, 8) and SageConfig().salient_bits == 4
    assert SageConfig().exportable and not SageConfig(scale_mode="per_row").exportable
    SageConfig().validate()
    assert SageConfig().graph_rho == pytest.approx(0.0505)
    assert SageConfig(rho_bounds=(0.06, 0.1)).graph_rho == pytest.approx(0.08)
    assert SageConfig(rho_init=0.03, fixed_rho=0.2).graph_rho == 0.2
    with pytest.raises(ValueError, match="unknown SAGE config keys: bogus"):
        SageConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("params, field", [
    ({"threshold": "median"}, "threshold"),
    ({"scale_mode": "per_col"}, "scale_mode"),
    ({"rho_bounds": (0.2, 0.1)}, "rho_bounds"),
    ({"rho_init": 0.5}, "rho_init"),
    ({"salient_bits": 9}, "salient_bits"),
    ({"group_candidates": (1, 2)}, "group_candidates"),
    ({"group_candidates": ()}, "group_candidates"),
    ({"fixed_rho": 1.0}, "fixed_rho"),
    ({"fixed_groups": 0}, "fixed_groups"),
    ({"knn_k": 0}, "knn_k"),
    ({"graph_samples": 1.5}, "graph_samples"),
    ({"brent_xatol": 0.0}, "brent_xatol"),
    ({"lloyd_steps": -1}, "lloyd_steps"),
    ({"unit_gain": 1}, "unit_gain"),
])
def test_validate_names_the_bad_field_in_one_line(params, field):
    with pytest.raises(ValueError, match=field) as info:
        SageConfig(**params).validate()
    assert "\n" not in str(info.value)


def test_compact_result_decodes_stores_and_counts_as_the_full_result():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((40, 96)) * rng.gamma(1.0, 1.0, (1, 96))).astype(np.float32)
    full = quantize_sage(w, SageConfig(fixed_groups=3, fixed_rho=0.05), seed=1)
    small = full.compact()
    assert small.shape == full.shape and small.method == "sage" and not small.per_row
    np.testing.assert_array_equal(small.dequantize(), full.dequantize())
    assert small.paper_bits() == full.paper_bits()
    for name, tensor in full.stored_tensors().items():
        np.testing.assert_array_equal(small.stored_tensors()[name], tensor)
    assert small.stats is full.stats and small.compact() is small
    per_row = quantize_sage(w, SageConfig(scale_mode="per_row", fixed_rho=0.05), seed=1)
    assert per_row.compact() is per_row  # no packed form: kept whole
