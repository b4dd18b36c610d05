"""SageLinear: a torch module that computes a packed SAGE layer (docs/sage_binary_gemm.md).

On CUDA tensors it calls the CUDA kernels through ctypes (runtime/kernels.py) on the current stream, reading the
packed bits directly. On CPU tensors it calls the native CPU kernel of the ONNX Runtime custom op the same way
(runtime/ort_op.py), when it is built and no gradient is needed. Elsewhere it decodes Ŵ with torch ops exactly as
format.sage_layout.dequantize does and multiplies in float32: the same numbers as the NumPy reference
(onnx.reference.sage_binary_gemm_packed), only faster.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..format.sage_layout import PackedLinear, decode
from . import kernels, ort_op

_INT_BUFFERS = ("sign_bits", "group_codes", "salient_rowptr", "salient_cols", "salient_q")  # cols: int8 [nnz, 2]
_SCALE_BUFFERS = ("group_scales_bits", "salient_scale_bits", "row_scales_bits")
_KERNEL_DTYPES = {torch.float16: kernels.DTYPE_FLOAT16, torch.float32: kernels.DTYPE_FLOAT32}


class SageLinear(nn.Module):
    """y = x·Ŵᵀ (+ bias) for a PackedLinear. The packed tensors are buffers (they move with .to(device)).

    The three float16 scale tensors are held as their int16 bit patterns, so that model.half()/.float()/.to(dtype)
    never re-round them; `packed()` gives them back as float16 (row_scales may be empty: every r_n = 1, contract
    v3). The bias follows the module's dtype like an nn.Linear bias, and is added in float32."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | np.ndarray | None = None) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.n_groups = packed.n_groups
        self.salient_bits = packed.salient_bits
        if packed.n_groups > kernels.MAX_GROUPS:
            raise ValueError(f"the CUDA kernels support at most {kernels.MAX_GROUPS} groups, got {packed.n_groups}")
        for name in _INT_BUFFERS:
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(getattr(packed, name))))
        for name in ("group_scales", "salient_scale", "row_scales"):
            bits = np.ascontiguousarray(getattr(packed, name)).view(np.int16)
            self.register_buffer(name + "_bits", torch.from_numpy(bits))
        if bias is not None:
            bias = torch.as_tensor(bias).detach().clone()
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", bias)
        # The GEMV3 layout of the weights on the device they were prepared on: derived state, made once on the
        # first CUDA call (not a buffer: it is not saved, and .to() must not carry a stale copy).
        self._prepared: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_groups={self.n_groups}, "
                f"salient_bits={self.salient_bits}, nnz={self.nnz}, bias={self.bias is not None}")

    @property
    def nnz(self) -> int:
        return self.salient_cols.shape[0]  # salient_cols is int8 [nnz, 2] (contract v3)

    def packed(self) -> PackedLinear:
        """The layer as a PackedLinear again (NumPy copies of the buffers)."""
        return PackedLinear.from_tensors(self._numpy_tensors(), in_features=self.in_features,
                                         out_features=self.out_features, n_groups=self.n_groups,
                                         salient_bits=self.salient_bits)

    def _numpy_tensors(self) -> dict[str, np.ndarray]:
        """The eight packed tensors as NumPy arrays (views of CPU buffers, the scales as float16)."""
        tensors = {name: getattr(self, name).cpu().numpy() for name in _INT_BUFFERS}
        for name in ("group_scales", "salient_scale", "row_scales"):
            tensors[name] = getattr(self, name + "_bits").cpu().numpy().view(np.float16)
        return tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if x.is_cuda and kernels.available():
            return self.forward_cuda(x)
        # The native CPU kernel has no backward: with a gradient to compute, decode Ŵ with torch ops instead.
        if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()) and ort_op.available():
            return self.forward_cpu(x)
        return self.forward_reference(x)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """The native CPU kernel (libsage_ort.so, runtime/ort_op.py) straight from the packed buffers: no dense Ŵ
        is made. float16/float32 run as they are; other float dtypes (bfloat16) through a float32 copy."""
        compute_dtype = x.dtype if x.dtype in (torch.float16, torch.float32) else torch.float32
        x2 = x.detach().reshape(-1, self.in_features).to(compute_dtype).contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=compute_dtype)
        bias = None if self.bias is None else self.bias.detach().to(torch.float32).contiguous()
        pointers = {name: pointer_or_null(getattr(self, name)) for name in _INT_BUFFERS}
        pointers.update({name.removesuffix("_bits"): pointer_or_null(getattr(self, name)) for name in _SCALE_BUFFERS})
        args = ort_op.make_args(x2.data_ptr(), y.data_ptr(), x2.shape[0], str(compute_dtype).removeprefix("torch."),
                                pointers, self.nnz, self._attrs(),
                                0 if bias is None else bias.data_ptr())
        ort_op.cpu_gemm(args)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _attrs(self) -> dict[str, int]:
        return {"in_features": self.in_features, "out_features": self.out_features, "n_groups": self.n_groups,
                "salient_bits": self.salient_bits}

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Decode Ŵ (float32) and multiply in float32, on x's device; output in x's dtype."""
        w = self.dense_weight().to(x.device)
        y = x.reshape(-1, self.in_features).to(torch.float32) @ w.T
        if self.bias is not None:
            y = y + self.bias.to(device=x.device, dtype=torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_cuda(self, x: torch.Tensor, path: int = kernels.PATH_AUTO) -> torch.Tensor:
        """The CUDA kernels on torch's current stream. float16/float32 run as they are; other float dtypes
        (bfloat16) are computed from a float32 copy and cast back. `path` forces a kernel (benchmarks, tests)."""
        if not x.is_cuda:
            raise ValueError("forward_cuda needs a CUDA tensor")
        compute_dtype = x.dtype if x.dtype in _KERNEL_DTYPES else torch.float32
        x2 = x.reshape(-1, self.in_features).to(compute_dtype).contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=compute_dtype, device=x.device)
        bias = None
        if self.bias is not None:
            bias = self.bias.to(device=x.device, dtype=compute_dtype).contiguous()
        with torch.cuda.device(x.device):
            args = self.launch_args(x2, y, bias, path)
            kernels.launch(args, torch.cuda.current_stream(x.device).cuda_stream)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """Ŵ as float32 [N, K], decoded exactly as format.sage_layout.dequantize does (on CPU, by it)."""
        if self.sign_bits.device.type == "cpu":  # buffers validated once, when this module was made
            return torch.from_numpy(decode(self.in_features, **self._numpy_tensors()))
        return self._decode_torch()

    def _decode_torch(self) -> torch.Tensor:
        """dense_weight with torch ops on the buffers' device (no copy to the host)."""
        k = self.in_features
        signs = _unpack_bits(self.sign_bits, k).to(torch.float32) * 2 - 1
        groups = torch.zeros_like(signs, dtype=torch.int64)
        for plane in range(self.group_codes.shape[0]):
            groups |= _unpack_bits(self.group_codes[plane], k).to(torch.int64) << plane
        scales = self.group_scales_bits.view(torch.float16).to(torch.float32)
        w = scales[groups] * signs
        if self.row_scales_bits.numel():  # empty: every r_n = 1 (contract v3)
            w *= self.row_scales_bits.view(torch.float16).to(torch.float32)[:, None]
        counts = torch.diff(self.salient_rowptr.to(torch.int64))
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device), counts)
        salient_scale = self.salient_scale_bits.view(torch.float16).to(torch.float32)
        cols = self.salient_cols.view(torch.uint8).to(torch.int64)  # little-endian uint16 per column (v3)
        w[rows, cols[:, 0] + 256 * cols[:, 1]] = salient_scale[rows] * self.salient_q.to(torch.float32)
        return w

    def launch_args(self, x2: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None,
                    path: int = kernels.PATH_AUTO) -> kernels.SageGemmArgs:
        """Kernel arguments for x2 [M, K] -> y [M, N] (contiguous CUDA tensors of one dtype, float16/float32) on
        this layer's buffers; benchmarks launch them repeatedly without the per-call allocations of forward."""
        for name in (*_INT_BUFFERS, *_SCALE_BUFFERS):
            if getattr(self, name).device != x2.device:
                raise ValueError(f"SageLinear buffers are on {getattr(self, name).device}, input on {x2.device}")
        args = self._weight_args(x2, y, bias, path)
        # GEMV3 takes float16 activations only: a float32 caller never pays for the layout.
        prepared = self.prepared_layout(x2.device) if x2.dtype == torch.float16 else None
        if prepared is not None:
            args.prepared, args.prepared_bytes = prepared.data_ptr(), prepared.numel()
        return args

    def prepared_layout(self, device: torch.device) -> torch.Tensor | None:
        """The GEMV3 layout of this layer's weights on `device` (a CUDA device), made on the first call and kept;
        None when GEMV3 cannot take the layer (G > 8, K > 65535 or not a multiple of 8)."""
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._prepared is not None and self._prepared.device == device:
            return self._prepared
        self._prepared = prepared_buffer(self._weight_args(None, None, None, kernels.PATH_AUTO), device)
        return self._prepared

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the prepared layout is re-made where needed
        self._prepared = None
        return super()._apply(fn, recurse)

    def _weight_args(self, x2: torch.Tensor | None, y: torch.Tensor | None, bias: torch.Tensor | None,
                     path: int) -> kernels.SageGemmArgs:
        dtype = _KERNEL_DTYPES[x2.dtype] if x2 is not None else kernels.DTYPE_FLOAT16
        return kernels.SageGemmArgs(
            x=0 if x2 is None else x2.data_ptr(), sign_bits=self.sign_bits.data_ptr(),
            group_codes=self.group_codes.data_ptr(),
            group_scales=self.group_scales_bits.data_ptr(), salient_rowptr=self.salient_rowptr.data_ptr(),
            # The [nnz, 2] bytes are the kernels' uint16 columns; an empty row_scales goes as NULL (r_n = 1).
            salient_cols=pointer_or_null(self.salient_cols), salient_q=pointer_or_null(self.salient_q),
            salient_scale=self.salient_scale_bits.data_ptr(), row_scales=pointer_or_null(self.row_scales_bits),
            bias=0 if bias is None else bias.data_ptr(),
            y=0 if y is None else y.data_ptr(), prepared=0, prepared_bytes=0,
            m=0 if x2 is None else x2.shape[0], nnz=self.nnz, k=self.in_features,
            n=self.out_features, n_groups=self.n_groups, salient_bits=self.salient_bits, x_dtype=dtype,
            bias_dtype=dtype, path=path, reserved=0)


def prepared_buffer(args: kernels.SageGemmArgs, device: torch.device) -> torch.Tensor | None:
    """Allocate the GEMV3 layout of the weights in `args` on `device`, write it (on the current stream) and point
    args.prepared at it; None when GEMV3 cannot take them. The caller keeps the tensor alive."""
    size = kernels.prepared_bytes(args)
    if size == 0:
        return None
    with torch.cuda.device(device):
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        args.prepared, args.prepared_bytes = buf.data_ptr(), size
        kernels.prepare(args, torch.cuda.current_stream(device).cuda_stream)
    return buf


def pointer_or_null(t: torch.Tensor) -> int:
    """The address of t's data, or 0 (NULL) when it is empty: the kernels read an empty row_scales as "every r_n is
    1" only when it is NULL, and torch does not promise 0 for an empty tensor's data_ptr."""
    return t.data_ptr() if t.numel() else 0


def _unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int8 [N, ceil(k/8)] -> bool [N, k], bit j (LSB first) of byte c is column 8c+j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k].bool()


def replace_linears(model: nn.Module, packed: dict[str, PackedLinear]) -> list[str]:
    """Swap each named nn.Linear of `model` for a SageLinear of its packed weight (keeping its bias and device).
    Returns the replaced names; a missing name, a non-Linear module or a shape mismatch raises before any swap."""
    plan = []
    for name, layer in packed.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"{name}: no such submodule") from err
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(module).__name__}")
        if (module.out_features, module.in_features) != layer.shape:
            raise ValueError(f"{name}: Linear is {module.out_features}x{module.in_features}, packed weight is "
                             f"{layer.out_features}x{layer.in_features}")
        plan.append((name, module, layer))
    for name, module, layer in plan:
        bias = None if module.bias is None else module.bias.detach()
        # A streamed model's weights are on the meta device until quantized: its packed layer lives on the CPU.
        device = "cpu" if module.weight.is_meta else module.weight.device
        replacement = SageLinear(layer, bias).to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return [name for name, _, _ in plan]
