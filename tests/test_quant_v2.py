"""The v2 preset's per-matrix pieces: activation-weighted errors, measured options, the priced ρ search and
GPTQ-style compensation with the SAGE codebook. Matrices are small Gaussians whose input channels differ in
energy by orders of magnitude and are correlated, as real activations are."""

from dataclasses import replace

import numpy as np
import pytest

from sage_export.format.sage_layout import dequantize, pack_sage, stored_bytes
from sage_export.quant.common import hessian_error
from sage_export.quant.compensate import compensate_sage, compensate_validated
from sage_export.quant.config import V2_MATRIX
from sage_export.quant.sage import quantize_sage, sage_options
from sage_export.quant.saliency import SaliencyOrder

N, K = 64, 96


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
    # Correlated channels (a few shared directions plus noise), scaled over e^±3, as real activations are.
    x = rng.standard_normal((4 * K, 8)) @ rng.standard_normal((8, K)) + 0.3 * rng.standard_normal((4 * K, K))
    x *= np.exp(rng.uniform(-3, 3, K))
    h = x.T @ x / x.shape[0]
    return w, np.diag(h).copy(), h


def weighted_error(w, w_hat, h_diag):
    return float(np.sum(h_diag[None, :] * (w.astype(np.float64) - w_hat) ** 2))


def test_saliency_follows_the_column_weights(data):
    w, h_diag, _ = data
    top = 200
    order = SaliencyOrder.from_matrix(w, h_diag, top=top)
    cols = order.order[:top] % K
    # The picked entries sit mostly in the energetic columns: their mean h is far above the matrix's.
    assert h_diag[cols].mean() > 5 * h_diag.mean()
    full = SaliencyOrder.from_matrix(w, h_diag)
    np.testing.assert_array_equal(np.sort(order.order[:top]), np.sort(full.order[:top]))


@pytest.mark.parametrize("groups", [2, 4])
def test_weighting_lowers_the_weighted_error(data, groups):
    w, h_diag, _ = data
    cfg = replace(V2_MATRIX, fixed_groups=groups, fixed_rho=0.02)
    aware = quantize_sage(w, cfg, seed=1, col_weight=h_diag)
    blind = quantize_sage(w, cfg, seed=1)
    assert aware.stats["nnz"] == blind.stats["nnz"] and aware.stats["stored_bytes"] == blind.stats["stored_bytes"]
    assert weighted_error(w, aware.dequantize(), h_diag) < 0.8 * weighted_error(w, blind.dequantize(), h_diag)
    assert aware.stats["variant"] == "activation-aware" and blind.stats["variant"] == "data-free"
    assert aware.stats["weighted_error"] == pytest.approx(weighted_error(w, aware.dequantize(), h_diag), rel=1e-3)


def test_options_report_exact_bytes_and_the_errors_quantize_gets(data):
    w, h_diag, _ = data
    rhos = (0.0, 0.01, 0.04)
    options, proposal = sage_options(w, V2_MATRIX, (1, 4), rhos, seed=2, col_weight=h_diag, propose=True)
    assert [(o.n_groups, o.rho) for o in options] == [(g, r) for g in (1, 4) for r in rhos]
    assert proposal is not None and proposal.n_groups >= 1
    for o in options:
        q = quantize_sage(w, replace(V2_MATRIX, fixed_groups=o.n_groups, fixed_rho=o.rho), seed=2, col_weight=h_diag)
        assert o.nbytes == stored_bytes(N, K, o.n_groups, o.nnz) == sum(a.nbytes for a in q.stored_tensors().values())
        assert o.nnz == q.stats["nnz"]
        if o.rho == rhos[0]:  # same start as a fixed-ρ quantization; later ρ start from the previous centres
            assert o.error == pytest.approx(q.stats["weighted_error"], rel=1e-9)
    for g in (1, 4):
        errors = [o.error for o in options if o.n_groups == g]
        assert errors[-1] < errors[0]  # salient entries remove error
    assert min(o.error for o in options if o.n_groups == 4) < min(o.error for o in options if o.n_groups == 1)


def test_each_g_is_measured_as_if_alone(data):
    # Options are measured ρ-major (to drop each ρ's salient fit), yet every G's column must be what measuring
    # that G alone gives: its centres warm-start only from its own previous ρ.
    w, h_diag, _ = data
    rhos = (0.0, 0.005, 0.02)
    together, _ = sage_options(w, V2_MATRIX, (2, 4), rhos, seed=2, col_weight=h_diag)
    alone = [o for g in (2, 4) for o in sage_options(w, V2_MATRIX, (g,), rhos, seed=2, col_weight=h_diag)[0]]
    assert together == alone


def test_options_on_a_row_sample_estimate_the_whole(data):
    w, h_diag, _ = data
    full, _ = sage_options(w, V2_MATRIX, (2,), (0.01,), seed=2, col_weight=h_diag)
    half, _ = sage_options(w, V2_MATRIX, (2,), (0.01,), seed=2, col_weight=h_diag, rows=N // 2)
    assert half[0].nbytes == full[0].nbytes  # bytes are always the whole matrix's
    assert half[0].error == pytest.approx(full[0].error, rel=0.3)


def test_bit_price_buys_fewer_salient_entries(data):
    w, h_diag, _ = data
    free = quantize_sage(w, replace(V2_MATRIX, fixed_groups=4), seed=0, col_weight=h_diag)
    unit = free.stats["weighted_error"] / free.stats["stored_bytes"]
    priced = quantize_sage(w, replace(V2_MATRIX, fixed_groups=4, rho_price=50 * unit), seed=0, col_weight=h_diag)
    assert priced.stats["nnz"] < free.stats["nnz"]
    assert priced.stats["stored_bytes"] < free.stats["stored_bytes"]


def test_compensation_lowers_output_error_and_keeps_every_size(data):
    w, h_diag, h = data
    base = quantize_sage(w, replace(V2_MATRIX, fixed_groups=4, fixed_rho=0.02), seed=0, col_weight=h_diag)
    for act_order in (True, False):
        comp = compensate_sage(w, h, base, act_order=act_order)
        assert comp.stats["hessian_error"] < 0.9 * hessian_error(w, base.dequantize(), h)
        np.testing.assert_array_equal(comp.salient_mask, base.salient_mask)
        np.testing.assert_array_equal(comp.group_scales, base.group_scales)
        np.testing.assert_array_equal(comp.salient_scale, base.salient_scale)
        assert {k: v.shape for k, v in comp.stored_tensors().items()} == \
               {k: v.shape for k, v in base.stored_tensors().items()}
        packed = pack_sage(comp.signs, comp.group_index, comp.group_scales, comp.salient_mask, comp.salient_q,
                           comp.salient_scale, comp.salient_bits)
        np.testing.assert_array_equal(dequantize(packed), comp.dequantize())


def test_compensation_shrink_interpolates_between_full_feedback_and_none(data):
    """shrink scales only H's off-diagonal part: at 1 no error is fed forward, exactly as under diag(H); between,
    the output error lies between full compensation's and none's."""
    w, h_diag, h = data
    base = quantize_sage(w, replace(V2_MATRIX, fixed_groups=4, fixed_rho=0.02), seed=0, col_weight=h_diag)
    none = compensate_sage(w, h, base, shrink=1.0)
    diagonal = compensate_sage(w, np.diag(np.diag(h)), base)
    np.testing.assert_array_equal(none.dequantize(), diagonal.dequantize())
    full, half = compensate_sage(w, h, base), compensate_sage(w, h, base, shrink=0.5)
    assert full.stats["hessian_error"] < half.stats["hessian_error"] < none.stats["hessian_error"]
    assert half.stats["compensate_shrink"] == 0.5


def test_validated_compensation_keeps_the_candidate_with_the_lowest_held_out_error(data):
    """Each shrink is tried (1: the uncompensated result itself) and the lowest tr(ΔW·H_v·ΔWᵀ) wins; validation
    tokens unlike the calibration ones can make no compensation the winner."""
    w, h_diag, h = data
    base = quantize_sage(w, replace(V2_MATRIX, fixed_groups=4, fixed_rho=0.02), seed=0, col_weight=h_diag)
    same = compensate_validated(w, h, h, base, (0.0, 0.5, 1.0))  # validated on the calibration's own XᵀX
    assert same.stats["compensate_shrink"] == 0.0 and same.stats["compensated"]
    np.testing.assert_array_equal(same.dequantize(), compensate_sage(w, h, base).dequantize())
    errors = same.stats["validation_errors"]
    assert set(errors) == {"0", "0.5", "1"} and errors["0"] == min(errors.values())
    assert errors["1"] == pytest.approx(hessian_error(w, base.dequantize(), h))
    # Validation inputs whose energy sits in the channels the calibration barely used: that is where the feedback
    # put the error, so the uncompensated result wins and is returned as it was.
    other = compensate_validated(w, h, np.diag(1.0 / h_diag), base, (0.0, 0.5, 1.0))
    assert other.stats["compensate_shrink"] == 1.0 and not other.stats["compensated"] and other is base


def test_compensation_zeroes_dead_columns(data):
    w, h_diag, h = data
    h = h.copy()
    h[:, 5] = h[5, :] = 0.0
    base = quantize_sage(w, replace(V2_MATRIX, fixed_groups=2, fixed_rho=0.0), seed=0, col_weight=h_diag)
    given = h.copy()
    comp = compensate_sage(w, h, base)
    assert comp.stats["compensated"] and np.isfinite(comp.dequantize()).all()
    np.testing.assert_array_equal(h, given)  # read, not copied and not changed


# ------------------------------------------------------------------ row multipliers (contract v2's row_scales)

@pytest.fixture(scope="module")
def uneven(data):
    """The same matrix with rows whose sizes differ over e^±1, as real q/o/down_proj rows do."""
    w, h_diag, h = data
    sizes = np.exp(np.random.default_rng(5).uniform(-1, 1, N)).astype(np.float32)
    return w * sizes[:, None], h_diag, h


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_row_multipliers_follow_uneven_rows(uneven, groups):
    w, h_diag, _ = uneven
    cfg = replace(V2_MATRIX, fixed_groups=groups, fixed_rho=0.01)
    plain = quantize_sage(w, cfg, seed=1, col_weight=h_diag)
    rows = quantize_sage(w, replace(cfg, row_multipliers=True), seed=1, col_weight=h_diag)
    assert weighted_error(w, rows.dequantize(), h_diag) < 0.8 * weighted_error(w, plain.dequantize(), h_diag)
    assert rows.stats["weighted_error"] == pytest.approx(weighted_error(w, rows.dequantize(), h_diag), rel=1e-5)
    # The multipliers cost their 2N bytes; without them nothing is stored (contract v3).
    assert rows.stats["stored_bytes"] == plain.stats["stored_bytes"] + 2 * N
    assert rows.stats["stored_bytes"] == stored_bytes(N, K, groups, rows.stats["nnz"], row_scaled=True)
    assert plain.packed().row_scales.shape == (0,)
    packed = rows.packed()
    assert np.unique(packed.row_scales).size > N // 2
    np.testing.assert_array_equal(dequantize(packed), rows.dequantize())
    # Off the salient set every value is ±r_n·α_g exactly.
    alpha = packed.group_scales.astype(np.float32)[rows.group_index]
    expected = np.where(rows.signs, 1, -1) * alpha * packed.row_scales.astype(np.float32)[:, None]
    np.testing.assert_array_equal(rows.dequantize()[~rows.salient_mask], expected[~rows.salient_mask])


def test_row_multipliers_are_priced_as_the_plain_problem_and_never_worse(data, uneven):
    # Options (what the budget chooses from) are the plain problem's; building then only lowers the error, on
    # uneven rows and on even ones alike.
    w, h_diag, _ = uneven
    cfg = replace(V2_MATRIX, row_multipliers=True)
    plain, _ = sage_options(w, V2_MATRIX, (2, 4), (0.0, 0.01), seed=2, col_weight=h_diag)
    rows, _ = sage_options(w, cfg, (2, 4), (0.0, 0.01), seed=2, col_weight=h_diag)
    assert [replace(o, nbytes=o.nbytes - 2 * w.shape[0]) for o in rows] == plain  # + the multipliers' bytes
    for matrix in (w, data[0]):
        for o in plain:
            fixed = dict(fixed_groups=o.n_groups, fixed_rho=o.rho)
            built = quantize_sage(matrix, replace(cfg, **fixed), seed=2, col_weight=h_diag)
            base = quantize_sage(matrix, replace(V2_MATRIX, **fixed), seed=2, col_weight=h_diag)
            assert weighted_error(matrix, built.dequantize(), h_diag) <= weighted_error(matrix, base.dequantize(), h_diag)


@pytest.mark.parametrize("groups", [1, 4])
def test_unit_gain_scales_keep_the_output_gain_at_one(uneven, groups):
    # Least-squares α shrinks the layer's output along W by the bands' relative spread; unit_gain does not, and
    # the error it reports is that of the values it stores.
    w, h_diag, _ = uneven
    cfg = replace(V2_MATRIX, fixed_groups=groups, fixed_rho=0.01)
    plain = quantize_sage(w, cfg, seed=1, col_weight=h_diag)
    unit = quantize_sage(w, replace(cfg, unit_gain=True), seed=1, col_weight=h_diag)

    def gain(q):
        unsalient = ~plain.salient_mask
        return float((q * w * h_diag)[unsalient].sum() / (w * w * h_diag)[unsalient].sum())

    assert gain(plain.dequantize()) < 0.99
    assert gain(unit.dequantize()) == pytest.approx(1.0, abs=2e-3)
    assert weighted_error(w, plain.dequantize(), h_diag) < weighted_error(w, unit.dequantize(), h_diag)
    assert unit.stats["weighted_error"] == pytest.approx(weighted_error(w, unit.dequantize(), h_diag), rel=1e-5)
    assert unit.stats["stored_bytes"] == plain.stats["stored_bytes"]


def test_compensation_keeps_the_row_multipliers(uneven):
    w, h_diag, h = uneven
    base = quantize_sage(w, replace(V2_MATRIX, fixed_groups=4, fixed_rho=0.02, row_multipliers=True), seed=0,
                         col_weight=h_diag)
    comp = compensate_sage(w, h, base)
    assert comp.stats["hessian_error"] < 0.9 * hessian_error(w, base.dequantize(), h)
    np.testing.assert_array_equal(comp.row_scales, base.row_scales)
    packed = comp.packed()
    np.testing.assert_array_equal(dequantize(packed), comp.dequantize())
    # Every unsalient value is still in the row's codebook ±r_n·α_g.
    unsalient = ~comp.salient_mask
    codebook = packed.row_scales.astype(np.float32)[:, None, None] * packed.group_scales.astype(np.float32)
    values = np.abs(comp.dequantize())[:, :, None]
    hit = np.any(values == codebook, axis=2)
    assert hit[unsalient].all()
