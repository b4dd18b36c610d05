"""`--preset paper` must stay SPEC §2's data-free reading, bit for bit: the packed tensors of a fixed matrix hash to
the value the pre-v2 tree (commit 1392f38, before presets existed) produced for the same matrix and seed."""

from __future__ import annotations

import hashlib

import numpy as np

from sage_export.pipeline.methods import Method, quantize_weight

PRE_V2_SHA256 = "b87cc32387924b88c0f6acd78cb56e6d751f440ac5d72b563e15d954a4d9aa63"


def test_paper_preset_is_bitwise_the_pre_v2_quantizer():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((48, 160)) * rng.gamma(1.0, 1.0, (1, 160))).astype(np.float32) * 0.05
    result = quantize_weight(Method("sage", {"preset": "paper"}), w, None, 123)
    tensors = result.packed().tensors()
    # Contract v2 added row_scales, which the paper preset leaves at 1.0 (stored empty since v3), and v3 narrowed
    # the columns to 16 bits: widened back to v1's int32, the v1 tensors are unchanged.
    assert tensors.pop("row_scales").shape == (0,)
    tensors["salient_cols"] = result.packed().columns.astype(np.int32)
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor).tobytes())
    assert digest.hexdigest() == PRE_V2_SHA256
