"""report.json + report.md (+ plots) for a `sage-export model` run. The JSON is the record; the markdown is
what a person reads: headline figures and plots up top, per-layer-type summaries instead of 210 rows."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from ..format.accounting import true_bits
from .plots import write_plots

FLOAT_NOTE = "Embeddings, lm_head and norms stay in floating point (not counted in bits per weight)."
STREAMED_NOTE = ("Streamed: the quantizable weights stayed in the model file and were read one block or one "
                 "matrix at a time where needed; the quantized layers are held packed and PyTorch decodes each on "
                 "every call, so the greedy sample below is one prompt of 16 tokens.")


def layer_rows(layers: dict[str, object]) -> list[dict]:
    rows = []
    for name, result in layers.items():
        n, k = result.shape
        paper = result.paper_bits()
        stored = result.stored_tensors()
        row = {"name": name, "out_features": n, "in_features": k, "method": result.method,
               "true_bits": true_bits(stored, n, k),
               "stored_bytes": sum(int(a.nbytes) for a in stored.values()),
               "bytes_by_tensor": {t: int(a.nbytes) for t, a in stored.items()},
               "paper_weight_bits": paper["weight_bits"], "paper_scale_bits": paper["scale_bits"]}
        row.update({k: v for k, v in result.stats.items() if k not in row})
        rows.append(row)
    return rows


def bits_summary(rows: list[dict]) -> dict:
    numel = sum(r["out_features"] * r["in_features"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    by_tensor = defaultdict(int)
    for r in rows:
        for t, nbytes in r["bytes_by_tensor"].items():
            by_tensor[t] += nbytes
    return {
        "true_bits_by_tensor": {t: 8 * nbytes / numel for t, nbytes in sorted(by_tensor.items())},
        "n_layers": len(rows),
        "n_weights": numel,
        "true_bits": 8 * stored / numel,
        "paper_weight_bits": sum(r["paper_weight_bits"] * r["out_features"] * r["in_features"] for r in rows) / numel,
        "paper_scale_bits": sum(r["paper_scale_bits"] * r["out_features"] * r["in_features"] for r in rows) / numel,
        "packed_bytes": stored,
        "fp16_bytes": 2 * numel,
    }


def _by_type(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["name"].rsplit(".", 1)[-1]].append(r)
    return groups


def _mean(rows, key) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else float("nan")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def variant_line(method: dict, calibration: dict | None, budget: dict | None) -> str:
    """Preset, calibration source and budget of a result, in one sentence."""
    params = method.get("params", {})
    if method["name"] != "sage":
        what = f"method {method['name']}"
    else:
        what = f"SAGE preset **{params.get('preset', 'paper')}**"
    if budget:
        what += (f", budget {budget['budget_bits']:.2f} true bits per weight (achieved {budget['true_bits']:.3f}, "
                 f"price {budget['price']:.3g} per byte)")
    if calibration is None:
        return what + ", data-free (no calibration)."
    if calibration.get("source") == "text":
        src = f"text `{calibration['text']}`"
    else:
        src = "text the model sampled itself"
    extra = f", {calibration['time_s']:.0f} s" if "time_s" in calibration else ""
    return (what + f", calibrated on {src} ({calibration['samples']} × {calibration['seqlen']} tokens, "
            f"seed {calibration.get('seed', 0)}{extra}).")


def render_markdown(rep: dict, plots: list[str]) -> str:
    b = rep["bits"]
    out = [f"# sage-export report: {rep['model']['description']}", "",
           f"Variant `{rep['method']['label']}`, seed {rep['seed']}: "
           + variant_line(rep["method"], rep.get("calibration"), rep.get("budget")), "", FLOAT_NOTE, "",
           *([STREAMED_NOTE, ""] if rep["model"].get("streamed") else []),
           "| accounting | bits per weight |", "|---|---|",
           f"| true storage (every stored byte) | **{b['true_bits']:.3f}** |",
           f"| paper: weight bits | {b['paper_weight_bits']:.3f} |",
           f"| paper: scale bits | {b['paper_scale_bits']:.3f} |", "",
           "Where the true bits go (all quantized layers): "
           + ", ".join(f"`{t}` {v:.3f}" for t, v in b["true_bits_by_tensor"].items()) + ".", "",
           f"Quantized layers: {b['n_layers']} matrices, {b['n_weights']:,} weights: "
           f"{_mb(b['packed_bytes'])} packed vs {_mb(b['fp16_bytes'])} in float16 "
           f"({b['fp16_bytes'] / b['packed_bytes']:.1f}× smaller).", ""]
    if rep.get("files"):
        out += ["| file | bytes |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in rep["files"].items()] + [""]
    if (rep.get("budget") or {}).get("activation_power_choice"):
        out += power_choice_section(rep["budget"]["activation_power_choice"])
    if rep.get("guard"):
        out += guard_section(rep["guard"])
    if rep.get("perplexity"):
        p = rep["perplexity"]
        out += [f"Perplexity on {p['text']}, ctx {p['ctx']}, {p['n_windows']} windows: **{p['ppl']:.3f}** "
                f"(PyTorch, decoded quantized weights)", ""]
    if rep.get("samples"):
        out += ["## Does it still talk? (greedy, quantized model)", ""]
        out += [f"- *{s['prompt']}* → {_quote(s['continuation'])}" for s in rep["samples"]] + [""]
    if rep.get("onnx"):
        out += ["## ONNX Runtime check", "", _check_verdict(rep["onnx"].get("checks", {})), "",
                "```json", json.dumps(rep["onnx"], indent=1, sort_keys=True), "```", ""]
    if rep.get("trt"):
        out += ["## TensorRT", "", "```json", json.dumps(rep["trt"], indent=1, sort_keys=True), "```", ""]
    out += ["## Per layer type (means over blocks)", "",
            "| layer | shape N×K | G used | G graph proposes | ρ realised | Brent evals | rel. error | true bits |",
            "|---|---|---|---|---|---|---|---|"]
    for kind, rows in _by_type(rep["layers"]).items():
        r0 = rows[0]
        out.append(f"| {kind} | {r0['out_features']}×{r0['in_features']} | {_mean(rows, 'n_groups'):.2f} | "
                   f"{_mean(rows, 'graph_groups'):.2f} | {_mean(rows, 'realised_rho'):.4f} | "
                   f"{_mean(rows, 'n_evals'):.1f} | {_mean(rows, 'rel_error'):.4f} | {_mean(rows, 'true_bits'):.3f} |")
    bounds = [r["name"] for r in rep["layers"] if r.get("hit_bound")]
    if bounds:
        out += ["", f"The ρ search ended on a bound of its interval for {len(bounds)} of {len(rep['layers'])} layers "
                "(error monotone in ρ there); per-layer detail in report.json."]
    out += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    peaks = rep.get("peak_rss_mb", {})
    out += ["", "## Timings and memory", "",
            "Peak memory is the resident set of the process and its workers while the step ran (sampled every "
            "0.2 s).", "", "| step | seconds | peak memory (MB) |", "|---|---|---|"]
    out += [f"| {k} | {v:.1f} | {peaks[k]:,.0f} |" if k in peaks else f"| {k} | {v:.1f} | |"
            for k, v in rep.get("timings", {}).items()]
    return "\n".join(out) + "\n"


def power_choice_section(choice: dict) -> list[str]:
    """Which activation power the validation rows chose (SageRecipe.activation_power_candidates), with each score."""
    scores = ", ".join(f"a = {c['activation_power']:g}: {c['validation_ppl']:.3f}" for c in choice["candidates"])
    return [f"Activation power **{choice['chosen']:g}**, chosen by the perplexity of each power's uncompensated "
            f"result at {choice['budget_bits']:g} bits on {choice['tokens_scored']} validation tokens "
            f"({choice['validation_rows']} self-sampled rows that no statistic and not the guard used): {scores}.",
            ""]


def guard_section(guard: dict) -> list[str]:
    """The three guard figures (pipeline/guard.py) as a small table, and the verdict in words."""
    held, rtn = guard["held_out"], guard.get("rtn")
    rows = [("FP (unquantized)", "32", guard["fp_ppl"]),
            ("this result (SAGE v2)", f"{guard['sage_true_bits']:.3f}", guard["sage_ppl"])]
    if rtn:
        rows.append((f"RTN w{rtn['bits']}g{rtn['group_size']}", f"{rtn['true_bits']:.3f}", rtn["ppl"]))
    out = ["## Guard: SAGE against plain RTN on held-out calibration tokens", "",
           f"{held['rows']} calibration rows ({held['tokens_scored']:,} scored tokens) were held out of the "
           f"calibration and scored by each model ({guard['time_s']:.0f} s).", "",
           "| model | true bits | perplexity |", "|---|---|---|"]
    out += [f"| {name} | {bits} | {ppl:.3f} |" for name, bits, ppl in rows] + [""]
    if rtn is None:
        out += ["No uniform RTN setting stores as few bits as this budget: no comparison.", ""]
    elif guard["beats_rtn"]:
        out += ["SAGE beats RTN at equal or fewer bits here.", ""]
    else:
        out += ["**SAGE does worse than RTN at equal or fewer bits here**: on this model, prefer "
                f"`--method rtn --code-bits {rtn['bits']} --group-size {rtn['group_size']}` or a higher budget.", ""]
    return out


def _check_verdict(checks: dict) -> str:
    if "failures" not in checks:
        return "Not judged (report written before thresholds existed)."
    if checks["failures"]:
        return "**FAILED**: " + "; ".join(checks["failures"]) + "."
    lg = checks["logits"]
    return (f"**Passed** ({checks['session']}): logits rel. L2 {lg['rel_l2']:.1e}, argmax agreement "
            f"{lg['argmax_agreement']:.3f}, greedy tokens {'identical' if checks['greedy']['identical'] else 'differ'}"
            + (f", perplexity rel. diff {checks['perplexity']['rel_diff']:.1e}" if "perplexity" in checks else "")
            + "; thresholds in the JSON below.")


def _quote(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "⏎") + "`"


def write_report(out_dir: Path, rep: dict) -> None:
    sage = rep["layers"] and rep["method"]["name"] == "sage"
    target = rep["budget"]["budget_bits"] if rep.get("budget") else None
    plots = write_plots(rep["layers"], out_dir / "plots", target) if sage else []
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1, sort_keys=True, default=float) + "\n")
    (out_dir / "report.md").write_text(render_markdown(rep, plots))
