"""PNG plots of per-layer figures, for report.md. matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _short(name: str) -> str:
    # "model.layers.12.mlp.down_proj" -> "12.down"
    parts = name.split(".")
    return f"{parts[2]}.{parts[-1].split('_')[0]}" if len(parts) > 3 else name


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    # Fixed metadata keeps the PNG bytes reproducible for the same numbers.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_bits(layers: list[dict], path: Path, target: float | None = None) -> None:
    x = range(len(layers))
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.bar(x, [l["true_bits"] for l in layers], width=1.0, color="#4c72b0", label="true storage")
    ax.plot(x, [l["paper_weight_bits"] + l["paper_scale_bits"] for l in layers], "k.", ms=3,
            label="paper accounting (weight + scale bits)")
    if target is not None:
        ax.axhline(target, color="#c44e52", lw=1, ls="--", label=f"budget (model average) {target:g}")
    ax.set_xlabel("quantized layer (block order)")
    ax.set_ylabel("bits per weight")
    ax.set_title("Bits per weight, per layer")
    ax.set_xlim(-1, len(layers))
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_groups_rho(layers: list[dict], path: Path) -> None:
    x = range(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 4.8), sharex=True)
    top.step(x, [l.get("n_groups", 0) for l in layers], where="mid", color="#55a868", label="G used")
    if any("graph_groups" in l for l in layers):
        top.plot(x, [l.get("graph_groups", float("nan")) for l in layers], "k.", ms=3, label="G the kNN graph proposes")
        top.legend(loc="upper right", fontsize=8)
    top.set_ylabel("groups G")
    # Fixed axes from 0: a flat line at G = 2 or ρ = 0.0999 must look flat, not like noise around an offset.
    top.set_ylim(0, max(8, max(max(l.get("n_groups", 0), l.get("graph_groups", 0)) for l in layers)) + 0.5)
    top.set_title("Unsalient group count and chosen saliency ratio, per layer")
    bottom.plot(x, [l.get("realised_rho", 0.0) for l in layers], ".-", ms=3, color="#c44e52")
    bottom.set_ylabel("salient fraction ρ")
    bottom.set_ylim(0, 1.15 * max(max(l.get("realised_rho", 0.0) for l in layers), 1e-3))
    bottom.set_xlabel("quantized layer (block order)")
    _save(fig, path)


def plot_error(layers: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.semilogy(range(len(layers)), [l["rel_error"] for l in layers], ".-", ms=3, color="#8172b2")
    ax.set_xlabel("quantized layer (block order)")
    ax.set_ylabel("‖W−Ŵ‖² / ‖W‖²")
    ax.set_title("Relative reconstruction error, per layer")
    step = max(1, len(layers) // 15)
    ax.set_xticks(range(0, len(layers), step), [_short(l["name"]) for l in layers][::step], rotation=45, fontsize=7)
    _save(fig, path)


def write_plots(layers: list[dict], out_dir: Path, target_bits: float | None = None) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_bits(layers, out_dir / "bits_per_layer.png", target_bits)
    plot_groups_rho(layers, out_dir / "groups_rho_per_layer.png")
    plot_error(layers, out_dir / "error_per_layer.png")
    return ["bits_per_layer.png", "groups_rho_per_layer.png", "error_per_layer.png"]
