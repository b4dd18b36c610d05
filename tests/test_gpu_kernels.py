"""The CUDA kernels against the NumPy reference, through SageLinear (needs a GPU and libsage_kernels.so, e.g.
SAGE_KERNELS_LIB=plugins/build-gpu/libsage_kernels.so; tools/gpu_check.sh runs this). Covers every kernel path,
K % 8 != 0, G in {1, 2, 3, 4, 8, 16}, nnz = 0, batches 1..8, 16, 64 and more, float16/float32, bias, a
non-canonical packing, unaligned pointers and a non-default stream; the decode cases also on the GEMV2 path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sage_export.runtime import kernels
from sage_export.runtime.sage_linear import SageLinear
from sage_export.runtime.synthetic import random_packed_linear, reference_error_ratio, scramble_salient_bits

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

AUTO, GEMV, TILED, GEMV2 = kernels.PATH_AUTO, kernels.PATH_GEMV, kernels.PATH_TILED, kernels.PATH_GEMV2
PATHS = {"gemv": GEMV, "tiled": TILED, "gemv2": GEMV2}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    # A GPU machine without the library is a broken setup, not a reason to pass quietly.
    if not kernels.available():
        pytest.fail(f"CUDA is present but the kernels cannot be loaded: {kernels.unavailable_reason()} "
                    "(build them with tools/build_plugins.sh and point SAGE_KERNELS_LIB at libsage_kernels.so)")


def _check(m: int | tuple[int, ...], k: int, n: int, groups: int, dtype: torch.dtype, *, path: int = AUTO,
           bias: bool = True, fraction: float = 0.03, scrambled: bool = False, seed: int = 0) -> None:
    p = random_packed_linear(n, k, groups, salient_fraction=fraction, seed=seed)
    if scrambled:
        p = scramble_salient_bits(p, seed)
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    layer = SageLinear(p, b).cuda()
    shape = (m,) if isinstance(m, int) else m
    x = torch.randn(*shape, k, generator=gen).to(dtype)
    y = layer.forward_cuda(x.cuda(), path=path)
    torch.cuda.synchronize()
    assert y.dtype == dtype and y.shape == (*shape, n)
    ratio = reference_error_ratio(y.cpu().numpy(), x.numpy(), p, None if b is None else b.numpy())
    assert ratio <= 1.0, f"error {ratio:.2f}x the float32 tolerance"


@pytest.mark.parametrize("path", [AUTO, GEMV2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_decode_batches(m: int, dtype: str, path: int) -> None:
    _check(m, 300, 100, 3, DTYPES[dtype], path=path, bias=m % 2 == 1, seed=m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gemv2_llama_shapes(n: int, k: int, dtype: str) -> None:
    _check(1, k, n, 4, DTYPES[dtype], path=GEMV2, seed=n + k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [17, 64, (3, 50), 257])
def test_prefill_batches(m, dtype: str) -> None:
    _check(m, 1152, 130, 4, DTYPES[dtype], seed=7)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8, 16])
def test_groups(groups: int, path: int) -> None:
    _check(5, 520, 70, groups, torch.float16, path=path, seed=groups)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
@pytest.mark.parametrize("k, n", [(20, 6), (77, 65), (128, 64), (1152, 40), (4099, 77), (4096, 256)])
def test_shapes(k: int, n: int, path: int, dtype: str) -> None:
    _check(9, k, n, 3, DTYPES[dtype], path=path, seed=k + n)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_no_or_only_salient_weights(fraction: float, path: int) -> None:
    _check(6, 100, 40, 2, torch.float32, path=path, fraction=fraction, seed=3)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
def test_non_canonical_packing(path: int) -> None:
    _check(4, 300, 50, 3, torch.float16, path=path, fraction=0.1, scrambled=True, seed=11)


def test_bfloat16_runs_through_float32() -> None:
    p = random_packed_linear(64, 256, 2, seed=5)
    layer = SageLinear(p).cuda()
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer.forward_reference(x.float()).cuda(), rtol=1e-2, atol=1e-2)


def test_runs_on_the_current_stream() -> None:
    p = random_packed_linear(256, 1024, 4, seed=6)
    layer = SageLinear(p).cuda()
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = layer(x)
    stream.synchronize()
    assert reference_error_ratio(y.cpu().numpy(), x.cpu().numpy(), p) <= 1.0


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose storage starts one element past an allocation (so not 16-byte aligned)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
def test_unaligned_pointers(path: int) -> None:
    p = random_packed_linear(40, 1152, 4, seed=9)  # ceil(K/8) % 16 == 0: the aligned fast paths would apply
    layer = SageLinear(p).cuda()
    x = _shifted(torch.randn(8, 1152, device="cuda", dtype=torch.float16))
    y = torch.empty(8, 40, device="cuda", dtype=torch.float16)
    args = layer.launch_args(x, y, None, path)
    keep = [_shifted(layer.sign_bits), _shifted(layer.group_codes)]
    args.sign_bits, args.group_codes = keep[0].data_ptr(), keep[1].data_ptr()
    kernels.launch(args, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert reference_error_ratio(y.cpu().numpy(), x.cpu().numpy(), p) <= 1.0


def test_launch_errors_raise() -> None:
    layer = SageLinear(random_packed_linear(8, 16, 2, seed=1)).cuda()
    x = torch.randn(2, 16, device="cuda")
    y = torch.empty(2, 8, device="cuda")
    args = layer.launch_args(x, y, None)
    args.n_groups = kernels.MAX_GROUPS + 1
    with pytest.raises(kernels.KernelLibraryError):
        kernels.launch(args, torch.cuda.current_stream().cuda_stream)
    assert np.isfinite(layer(x).cpu().numpy()).all()


# GEMV3: float16 X, G <= 8, K a multiple of 8; SageLinear prepares its layout on the first CUDA launch.
GEMV3 = kernels.PATH_GEMV3
MODEL_SHAPES = [(576, 576), (1536, 576), (576, 1536), (896, 896), (4864, 896), (896, 4864), (4096, 4096),
                (11008, 4096), (4096, 11008)]  # (N, K) of SmolLM2-135M, Qwen2-0.5B, LLaMA-2-7B


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 12, 16, 20, (3, 5)])
def test_gemv3_batches(m) -> None:
    _check(m, 1152, 100, 3, torch.float16, path=GEMV3, bias=True, seed=13)


@pytest.mark.parametrize("groups", range(1, 9))
def test_gemv3_groups(groups: int) -> None:
    _check(4, 520, 70, groups, torch.float16, path=GEMV3, seed=groups)


@pytest.mark.parametrize("n, k", MODEL_SHAPES)
def test_gemv3_model_shapes(n: int, k: int) -> None:
    _check(1, k, n, 4, torch.float16, path=GEMV3, seed=n + k)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_gemv3_no_or_only_salient_weights(fraction: float) -> None:
    _check(6, 136, 40, 2, torch.float16, path=GEMV3, fraction=fraction, seed=3)


def test_gemv3_non_canonical_packing() -> None:
    _check(4, 296, 50, 8, torch.float16, path=GEMV3, fraction=0.1, scrambled=True, seed=11)


def test_auto_picks_gemv3_where_it_runs() -> None:
    layer = SageLinear(random_packed_linear(64, 256, 4, seed=2)).cuda()
    for dtype, m, expected in ((torch.float16, 1, GEMV3), (torch.float16, 16, GEMV3), (torch.float16, 17, TILED),
                               (torch.float32, 1, GEMV)):
        x = torch.randn(m, 256, device="cuda", dtype=dtype)
        args = layer.launch_args(x, torch.empty(m, 64, device="cuda", dtype=dtype), None)
        assert kernels.choose_path(args) == expected, (dtype, m)
    prepared = layer.prepared_layout(torch.device("cuda"))
    assert prepared is not None and prepared is layer.prepared_layout(torch.device("cuda"))  # made once
    layer.cpu().cuda()
    assert layer.prepared_layout(torch.device("cuda")) is not prepared  # re-made after a move


def test_gemv3_refuses_an_unaligned_input() -> None:
    layer = SageLinear(random_packed_linear(40, 1152, 4, seed=9)).cuda()
    x = _shifted(torch.randn(2, 1152, device="cuda", dtype=torch.float16))
    args = layer.launch_args(x, torch.empty(2, 40, device="cuda", dtype=torch.float16), None, GEMV3)
    with pytest.raises(kernels.KernelLibraryError):
        kernels.launch(args, torch.cuda.current_stream().cuda_stream)
    assert kernels.choose_path(layer.launch_args(x, torch.empty(2, 40, device="cuda", dtype=torch.float16),
                                                 None)) == GEMV  # AUTO falls back
