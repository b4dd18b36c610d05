"""Time quantize_sage on random matrices of SmolLM2-135M's Linear shapes (no files written).

Two kinds of data: Gaussian weights, and Q4_1-like weights (each block of 32 rounded to 16 levels between its min
and max, like the default model's GGUF source, so many magnitudes repeat exactly). Prints seconds per shape and
the projected time for all 210 matrices of the model (30 layers × q, k, v, o, gate, up, down).

    python3 tools/profile_sage.py [--repeats 1] [--kinds gaussian q4_1] [--fixed-groups G] [--fixed-rho R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from sage_export.quant.config import SageConfig
from sage_export.quant.sage import quantize_sage

# (name, N out, K in, how many per decoder layer)
SHAPES = [("q/o", 576, 576, 2), ("k/v", 192, 576, 2), ("gate/up", 1536, 576, 2), ("down", 576, 1536, 1)]
N_LAYERS = 30


def gaussian_matrix(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return (rng.standard_normal((n, k)) * 0.02).astype(np.float32)


def q4_1_matrix(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Round each block of 32 consecutive weights to 16 evenly spaced levels between the block's min and max."""
    blocks = gaussian_matrix(rng, n, k).reshape(-1, 32).astype(np.float64)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 15, 1.0)
    return (np.rint((blocks - lo) / step) * step + lo).reshape(n, k).astype(np.float32)


MAKERS = {"gaussian": gaussian_matrix, "q4_1": q4_1_matrix}


def profile(kind: str, cfg: SageConfig, repeats: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    projected = 0.0
    print(f"\n{kind}: seconds per matrix (median of {repeats})")
    print(f"{'shape':>8} {'N×K':>10} {'time_s':>7} {'graph_s':>7} {'evals':>5} {'G':>2} {'rho':>7} "
          f"{'rel_err':>7} bound")
    for name, n, k, per_layer in SHAPES:
        w = MAKERS[kind](rng, n, k)
        runs = []
        for r in range(repeats):
            start = time.perf_counter()
            result = quantize_sage(w, cfg, seed=seed + r)
            runs.append((time.perf_counter() - start, result.stats))
        seconds = statistics.median(t for t, _ in runs)
        s = runs[-1][1]
        projected += seconds * per_layer * N_LAYERS
        print(f"{name:>8} {f'{n}×{k}':>10} {seconds:7.3f} {s['graph_time_s']:7.3f} {s['n_evals']:5d} "
              f"{s['n_groups']:2d} {s['rho']:7.4f} {s['rel_error']:7.4f} {s['hit_bound'] or '-'}")
    print(f"projected for {N_LAYERS * sum(s[3] for s in SHAPES)} matrices: {projected:.1f} s "
          f"({projected / (N_LAYERS * sum(s[3] for s in SHAPES)):.3f} s per matrix)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", choices=sorted(MAKERS), default=sorted(MAKERS))
    parser.add_argument("--fixed-groups", type=int)
    parser.add_argument("--fixed-rho", type=float)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = SageConfig(fixed_groups=args.fixed_groups, fixed_rho=args.fixed_rho)
    cfg.validate()
    for kind in args.kinds:
        profile(kind, cfg, args.repeats, args.seed)


if __name__ == "__main__":
    main()
