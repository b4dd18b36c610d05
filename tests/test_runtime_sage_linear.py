"""SageLinear and the ctypes loader on CPU: the torch fallback decodes exactly what format.sage_layout.dequantize
decodes and matches the NumPy reference; replace_linears swaps modules safely; the loader reports why it cannot
load. The CUDA path is covered by tests/test_gpu_kernels.py (GPU machines) and the kernels by test_plugins_build."""

from __future__ import annotations

import copy
import ctypes

import numpy as np
import pytest
import torch
from torch import nn

from sage_export.format.sage_layout import dequantize
from sage_export.onnx.reference import sage_binary_gemm_packed
from sage_export.runtime import kernels
from sage_export.runtime.sage_linear import SageLinear, replace_linears
from sage_export.runtime.synthetic import random_packed_linear, reference_error_ratio, scramble_salient_bits

LAYERS = {  # (N, K, G, salient fraction)
    "k-not-multiple-of-8": (13, 29, 3, 0.1),
    "g1": (8, 64, 1, 0.05),
    "g16": (24, 40, 16, 0.05),
    "no-salient": (9, 17, 4, 0.0),
    "all-salient": (5, 11, 2, 1.0),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_dense_weight_is_exactly_dequantize(layer: str) -> None:
    n, k, g, fraction = LAYERS[layer]
    p = random_packed_linear(n, k, g, salient_fraction=fraction, seed=3)
    for packed in (p, scramble_salient_bits(p, seed=4)):  # bits at salient positions must not matter
        assert torch.equal(SageLinear(packed).dense_weight(), torch.from_numpy(dequantize(p)))


@pytest.mark.parametrize("row_scales", [True, False])
@pytest.mark.parametrize("layer", LAYERS)
def test_torch_decode_is_exactly_dequantize(layer: str, row_scales: bool) -> None:
    # The decode CUDA buffers get (16-bit columns from two bytes, an empty row_scales as all ones), run on the CPU.
    n, k, g, fraction = LAYERS[layer]
    p = random_packed_linear(n, k, g, salient_fraction=fraction, row_scales=row_scales, seed=3)
    assert p.has_row_scales == row_scales
    assert torch.equal(SageLinear(p)._decode_torch(), torch.from_numpy(dequantize(p)))


def test_wide_layer_decodes_columns_past_32767() -> None:
    # Columns >= 2**15 have the high bit of their second byte set (a negative int8): read unsigned, they land right.
    p = random_packed_linear(2, 40000, 2, salient_fraction=0.01, row_scales=False, seed=9)
    assert p.columns.max() >= 1 << 15
    assert torch.equal(SageLinear(p)._decode_torch(), torch.from_numpy(dequantize(p)))


def test_layer_without_row_scales() -> None:
    # Contract v3: an empty row_scales means every r_n = 1; the module keeps it empty and computes as with ones.
    p = random_packed_linear(13, 29, 3, salient_fraction=0.1, row_scales=False, seed=5)
    layer = SageLinear(p)
    assert layer.row_scales_bits.shape == (0,) and layer.nnz == p.nnz
    assert layer.packed().row_scales.shape == (0,)
    x = torch.randn(3, 29, generator=torch.Generator().manual_seed(1))
    assert reference_error_ratio(layer(x).numpy(), x.numpy(), p) <= 1.0
    np.testing.assert_allclose(layer(x).numpy(), sage_binary_gemm_packed(x.numpy(), p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(29,), (3, 29), (2, 4, 29)])
def test_forward_matches_numpy_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    p = random_packed_linear(13, 29, 3, salient_fraction=0.1, seed=5)
    bias = torch.randn(13, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for b in (None, bias):
        layer = SageLinear(p, b)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 13)
        b_np = None if b is None else b.numpy()
        reference = sage_binary_gemm_packed(x.numpy(), p, b_np)
        assert reference_error_ratio(y.numpy(), x.numpy(), p, b_np) <= 1.0
        if dtype == torch.float32:
            np.testing.assert_allclose(y.numpy(), reference, rtol=1e-5, atol=1e-6)


def test_dtype_casts_leave_the_packed_scales_untouched() -> None:
    p = random_packed_linear(6, 20, 4, salient_fraction=0.2, seed=6)
    layer = SageLinear(p, torch.zeros(6))
    layer.half()
    layer.float()
    layer.to(torch.bfloat16)  # would round float16 scales if they were float buffers
    back = layer.packed()
    for name, array in p.tensors().items():
        assert np.array_equal(getattr(back, name), array), name
    assert layer.bias.dtype == torch.bfloat16  # the bias follows the model, like nn.Linear's


def test_rejects_a_wrong_input_width_and_bias_shape() -> None:
    p = random_packed_linear(6, 20, 2, seed=7)
    with pytest.raises(ValueError, match="last dimension 20"):
        SageLinear(p)(torch.zeros(2, 21))
    with pytest.raises(ValueError, match="bias"):
        SageLinear(p, torch.zeros(5))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20, bias=True)
        self.down = nn.Linear(20, 12, bias=False)
        self.norm = nn.LayerNorm(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x))))


def test_replace_linears_swaps_modules_and_keeps_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    expected = copy.deepcopy(model)
    packed = {"0.up": random_packed_linear(20, 12, 3, seed=1), "1.down": random_packed_linear(12, 20, 2, seed=2)}
    assert replace_linears(model, packed) == ["0.up", "1.down"]
    assert isinstance(model[0].up, SageLinear) and isinstance(model[1].down, SageLinear)
    assert isinstance(model[0].down, nn.Linear)
    assert torch.equal(model[0].up.bias, expected[0].up.bias) and model[1].down.bias is None

    # The swapped model equals the original with Ŵ written into its Linear layers.
    with torch.no_grad():
        expected[0].up.weight.copy_(torch.from_numpy(dequantize(packed["0.up"])))
        expected[1].down.weight.copy_(torch.from_numpy(dequantize(packed["1.down"])))
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), expected(x), rtol=1e-5, atol=1e-5)


def test_replace_linears_checks_everything_before_swapping() -> None:
    model = nn.Sequential(_Block())
    good = random_packed_linear(20, 12, 2, seed=1)
    with pytest.raises(KeyError, match="nope"):
        replace_linears(model, {"0.up": good, "0.nope": good})
    with pytest.raises(TypeError, match="LayerNorm"):
        replace_linears(model, {"0.up": good, "0.norm": good})
    with pytest.raises(ValueError, match="20x12"):
        replace_linears(model, {"0.up": good, "0.down": good})
    assert isinstance(model[0].up, nn.Linear)  # nothing was swapped by the failed calls


def test_cpu_tensors_use_the_reference_path_even_with_a_library(monkeypatch: pytest.MonkeyPatch) -> None:
    p = random_packed_linear(6, 20, 2, seed=8)
    layer = SageLinear(p)
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(SageLinear, "forward_cuda", lambda *a, **k: pytest.fail("CUDA path on a CPU tensor"))
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), layer.forward_reference(x))


def test_loader_explains_a_missing_library(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, str(tmp_path / "libsage_kernels.so"))
    try:
        assert kernels.find_library() == tmp_path / "libsage_kernels.so"
        assert not kernels.reload()
        assert "cannot load" in kernels.unavailable_reason()
        with pytest.raises(kernels.KernelLibraryError, match="cannot load"):
            kernels.load()
    finally:
        monkeypatch.undo()
        kernels.reload()


def test_ctypes_struct_mirrors_the_c_header() -> None:
    # 12 pointers, three int64 (m, nnz, prepared_bytes), 8 int32 (sage_gemm_api.h, ABI 5: the layout of ABI 4, with
    # uint16 salient_cols and an optional row_scales), no padding; the loader also compares the size with
    # sage_gemm_args_size().
    assert kernels.ABI_VERSION == 5 and kernels.MAX_K == 65536
    assert kernels.SageGemmArgs.row_scales.offset == 64
    assert kernels.SageGemmArgs.prepared.offset == 88
    assert kernels.SageGemmArgs.m.offset == 96
    assert kernels.SageGemmArgs.nnz.offset == 104
    assert kernels.SageGemmArgs.prepared_bytes.offset == 112
    assert kernels.SageGemmArgs.k.offset == 120
    assert ctypes.sizeof(kernels.SageGemmArgs) == 96 + 3 * 8 + 8 * 4
