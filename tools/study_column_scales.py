#!/usr/bin/env python3
"""Matrix-level study (issue 21): would per-input-channel scales help SAGE's matrix-wide codebook?

SAGE stores one set of α_g per matrix, so a matrix whose input columns differ widely in magnitude (outlier channels,
folded AWQ scales) is quantized with levels that fit no column well; RTN's per-group scales follow that spread. A
column scale s_k (AWQ-style, s = h^(a/2), h the column's input energy) can be folded into the preceding RMSNorm or
into the producing matrix's row scales, so it needs no change to the op. This measures, before building any of that,
what it would buy: the activation-weighted error Σ_k h_k Σ_n (w_nk − q_nk)² / Σ_k h_k Σ_n w_nk² of

- SAGE at fixed G and ρ, plain;
- SAGE on W·diag(s), each quantized value mapped back by 1/s_k (the weights the quantizer sees are h/s², so its own
  objective is this error);
- RTN w3g64 and w3g128 (what SAGE must beat),

for a few blocks of a model, from input energies collected on a dev text (WikiText-2 valid). Example:

    python tools/study_column_scales.py --model qwen.gguf --blocks 0 13 27 --out benchmarks/column_scales_qwen.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_quality import git_commit, machine_name  # noqa: E402
from sage_export.format.accounting import true_bits  # noqa: E402
from sage_export.models import load_model, quantizable_linears  # noqa: E402
from sage_export.pipeline.calibration import calibration_tokens  # noqa: E402
from sage_export.pipeline.layer_stats import block_hessians, collect_layer_stats  # noqa: E402
from sage_export.quant.config import V2_MATRIX  # noqa: E402
from sage_export.quant.rtn import quantize_rtn  # noqa: E402
from sage_export.quant.sage import quantize_sage  # noqa: E402

DEV_TEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"


def weighted_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    return float(((w - q) ** 2 * h).sum() / (w ** 2 * h).sum())


def output_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray) -> float:
    """tr(E XᵀX Eᵀ) / tr(W XᵀX Wᵀ): the error of the layer's outputs, cross terms of the columns included (what
    the diagonal weighting above leaves out)."""
    e = (w - q).astype(np.float64)
    w = w.astype(np.float64)
    return float(((e @ hessian) * e).sum() / ((w @ hessian) * w).sum())


def errors(w: np.ndarray, q: np.ndarray, h: np.ndarray, hessian: np.ndarray | None) -> dict:
    out = {"error": weighted_error(w, q, h)}
    if hessian is not None:
        out["output_error"] = output_error(w, q, hessian)
    return out


def column_scales(h: np.ndarray, a: float) -> np.ndarray:
    """s = h^(a/2), normalised to geometric mean 1 (the scale of s is absorbed by α_g anyway)."""
    log_s = 0.5 * a * np.log(np.maximum(h, 1e-12 * h.max()))
    return np.exp(log_s - log_s.mean())


def sage_row(w: np.ndarray, h: np.ndarray, hessian: np.ndarray | None, groups: int, rho: float, a: float) -> dict:
    cfg = replace(V2_MATRIX, fixed_groups=groups, fixed_rho=rho)
    s = column_scales(h, a) if a else np.ones_like(h)
    result = quantize_sage(w * s, cfg, 0, h / s ** 2)
    q = result.dequantize() / s
    # Folding s into the previous RMSNorm or the producer's row scales stores no extra bytes in this matrix.
    return {**errors(w, q, h, hessian), "true_bits": true_bits(result.stored_tensors(), *w.shape)}


def rtn_row(w: np.ndarray, h: np.ndarray, hessian: np.ndarray | None, bits: int, group_size: int) -> dict:
    result = quantize_rtn(w, bits, group_size)
    return {**errors(w, result.dequantize(), h, hessian), "true_bits": true_bits(result.stored_tensors(), *w.shape)}


def study(args) -> dict:
    loaded = load_model(args.model)
    calib, calib_info = calibration_tokens(loaded, DEV_TEXT, args.calib_samples, args.calib_seqlen, 0)
    calib_info["text"] = "wikitext2/wiki.valid.tokens"
    stats = collect_layer_stats(loaded.model, loaded.architecture, calib, sensitivity=False,
                                keep_inputs=args.output_error, block_weights=loaded.block_weights)
    hessians = {}
    for b in args.blocks if args.output_error else ():
        hessians.update(block_hessians(loaded.model, loaded.architecture, stats, b, loaded.block_weights))
    blocks = loaded.architecture.blocks
    names = [n for n in quantizable_linears(loaded.model, loaded.architecture)
             if any(n.startswith(f"{blocks}.{b}.") for b in args.blocks)]
    rows = []
    for name in names:
        w = loaded.weight(name).astype(np.float32)
        h = stats.input_energy[name].astype(np.float64)
        hessian = hessians.get(name)
        row = {"matrix": name, "shape": list(w.shape),
               "h_spread": float(np.sqrt(np.percentile(h, 99) / max(np.median(h), 1e-30))),
               "rtn-w3g64": rtn_row(w, h, hessian, 3, 64), "rtn-w3g128": rtn_row(w, h, hessian, 3, 128)}
        for a in args.alphas:
            row[f"sage-G{args.groups}-a{a:g}"] = sage_row(w, h, hessian, args.groups, args.rho, a)
        rows.append(row)
        print(name, {k: [round(e, 4) for m, e in v.items() if m in METRICS] for k, v in row.items()
                     if isinstance(v, dict)}, flush=True)
    model = Path(args.model).name if args.model else "SmolLM2-135M-Instruct (embedded)"
    return {"rows": rows, "calibration": calib_info, "model": model, "groups": args.groups, "rho": args.rho,
            "alphas": args.alphas}


METRICS = {"error": "diagonal weighting, Σ h (W − Q)² / Σ h W² (what the quantizer minimises)",
           "output_error": "layer outputs, tr(E XᵀX Eᵀ) / tr(W XᵀX Wᵀ) with every cross term of XᵀX"}


def metric_table(doc: dict, metric: str, variants: list[str], bits: dict) -> list[str]:
    out = [f"Relative error, {METRICS[metric]}:", "",
           "| matrix | h spread | " + " | ".join(f"{v} ({bits[v]:.2f} b)" for v in variants) + " |",
           "|---|---|" + "---|" * len(variants)]
    for r in doc["rows"]:
        best = min(r[v][metric] for v in variants)
        cells = [f"**{r[v][metric]:.4f}**" if r[v][metric] == best else f"{r[v][metric]:.4f}" for v in variants]
        out.append(f"| {r['matrix']} | {r['h_spread']:.1f} | " + " | ".join(cells) + " |")
    gm = {v: float(np.exp(np.mean([np.log(r[v][metric]) for r in doc["rows"]]))) for v in variants}
    return out + ["| geometric mean | | " + " | ".join(f"{gm[v]:.4f}" for v in variants) + " |", ""]


def render(doc: dict) -> str:
    first = doc["rows"][0]
    variants = [k for k in first if isinstance(first[k], dict)]
    bits = {v: np.mean([r[v]["true_bits"] for r in doc["rows"]]) for v in variants}
    inputs = "h and XᵀX" if "output_error" in first[variants[0]] else "h"
    out = ["# Column scales for SAGE's matrix-wide codebook (tools/study_column_scales.py)", "",
           f"Model {doc['model']}; input energies {inputs} from {doc['calibration'].get('text', 'a dev text')} "
           f"({doc['calibration'].get('samples')}×{doc['calibration'].get('seqlen')} tokens). Each cell is one "
           "matrix's relative error (lower is better) at the variant's mean true bits; *a*: column scales "
           "s = h^(a/2) folded in, a = 0 is plain SAGE at fixed G and ρ. *h spread*: √(p99 / median) of h.", ""]
    for metric in METRICS:
        if metric in first[variants[0]]:
            out += metric_table(doc, metric, variants, bits)
    out += [f"Measured with `{doc['command']}` ({doc['machine']}, {doc['date']}, commit {doc['commit']}, "
            f"{doc['time_s']:.0f} s)."]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF file or HF folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--blocks", type=int, nargs="+", default=[0])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--rho", type=float, default=0.003)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--output-error", action="store_true",
                   help="also the error of the layer's outputs under the full XᵀX (keeps every block's inputs)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    start = time.perf_counter()
    doc = study(args)
    doc.update(machine=machine_name(), date=dt.date.today().isoformat(), commit=git_commit(),
               time_s=time.perf_counter() - start,
               command="python tools/study_column_scales.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    args.out.with_suffix(".md").write_text(render(doc))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
