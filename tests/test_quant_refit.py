"""Scale re-fit after compensation (quant/refit.py): the codes stay, α and the salient scales reach the least-squares
optimum of the output error, and nothing stored changes size."""

from dataclasses import replace

import numpy as np
import pytest

from sage_export.format.sage_layout import dequantize
from sage_export.quant.common import hessian_error
from sage_export.quant.compensate import compensate_sage
from sage_export.quant.config import V2_MATRIX
from sage_export.quant.refit import refit_compensated, refit_scales
from sage_export.quant.sage import quantize_sage

N, K = 64, 96


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((N, K)) * 0.02 * np.exp(rng.uniform(-0.5, 0.5, N))[:, None]
    x = rng.standard_normal((4 * K, 8)) @ rng.standard_normal((8, K)) + 0.3 * rng.standard_normal((4 * K, K))
    x *= np.exp(rng.uniform(-2, 2, K))
    h = x.T @ x / x.shape[0]
    return w.astype(np.float32), h


def compensated(data, groups=4, **cfg):
    w, h = data
    base = quantize_sage(w, replace(V2_MATRIX, fixed_groups=groups, fixed_rho=0.03, **cfg), seed=0,
                         col_weight=np.diag(h).copy())
    return compensate_sage(w, h, base)


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_refit_lowers_the_output_error_and_keeps_every_code(data, groups):
    w, h = data
    comp = compensated(data, groups)
    refit = refit_scales(w, h, comp)
    assert refit.stats["hessian_error"] < comp.stats["hessian_error"]
    assert refit.stats["hessian_error"] == pytest.approx(hessian_error(w, refit.dequantize(), h))
    for name in ("signs", "group_index", "salient_mask", "salient_q"):
        np.testing.assert_array_equal(getattr(refit, name), getattr(comp, name))
    assert not np.array_equal(refit.group_scales, comp.group_scales)
    assert {k: v.shape for k, v in refit.stored_tensors().items()} == \
           {k: v.shape for k, v in comp.stored_tensors().items()}
    np.testing.assert_array_equal(dequantize(refit.packed()), refit.dequantize())


def test_refit_alpha_is_the_least_squares_optimum_given_its_salient_scales(data):
    """Against an explicit least-squares solve over vec((W − S − Σ α_g B_g) L), H = L Lᵀ."""
    w, h = data
    refit = refit_scales(w, h, compensated(data, 4))
    sign = np.where(refit.signs, 1.0, -1.0) * ~refit.salient_mask
    salient = refit.salient_scale.astype(np.float64)[:, None] * refit.salient_q
    chol = np.linalg.cholesky(h + 1e-9 * np.trace(h) / K * np.eye(K))
    design = np.stack([((refit.group_index == g) * sign @ chol).ravel() for g in range(4)], axis=1)
    alpha, *_ = np.linalg.lstsq(design, ((w - salient) @ chol).ravel(), rcond=None)
    np.testing.assert_allclose(refit.group_scales.astype(np.float64), alpha, rtol=2e-3)


def test_refit_keeps_each_rows_codebook_with_row_multipliers(data):
    w, h = data
    comp = compensated(data, 4, row_multipliers=True)
    refit = refit_scales(w, h, comp)
    assert refit.stats["hessian_error"] < comp.stats["hessian_error"]
    np.testing.assert_array_equal(refit.row_scales, comp.row_scales)
    packed = refit.packed()
    codebook = packed.row_scales.astype(np.float32)[:, None, None] * packed.group_scales.astype(np.float32)
    hit = np.any(np.abs(refit.dequantize())[:, :, None] == codebook, axis=2)
    assert hit[~refit.salient_mask].all()


def test_more_rounds_of_refit_and_compensation_never_raise_the_error(data):
    w, h = data
    comp = compensated(data, 4)
    errors = [refit_compensated(w, h, comp, rounds).stats["hessian_error"] for rounds in (1, 2, 3)]
    assert errors[0] < comp.stats["hessian_error"]
    assert errors[2] <= errors[1] <= errors[0]
    assert refit_compensated(w, h, comp, 3).stats["refit_rounds"] == 3


def test_refit_returns_the_result_itself_when_nothing_improves(data):
    """Under H = 0 every scale fits equally well: the result comes back unchanged, not re-rounded."""
    w, _ = data
    comp = compensated(data, 4)
    assert refit_scales(w, np.zeros((K, K)), comp) is comp
